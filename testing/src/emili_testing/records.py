"""A session record as chat's persist writes it once the session has ended, without running a session: for tests of
what reads recorded sessions (the loop's eligible sessions)."""

from __future__ import annotations

from typing import Any

from emili_core.keys import session_record_keys
from emili_core.objectstore import Bucket, ObjectStore

# Per-kind event counts of a short, finished session: both surveys and replies, so it can be labelled.
LABELLABLE_COUNTS = {"pre_survey": 1, "user_message": 2, "assistant_message": 2, "post_survey": 1}


def record_ended_session(store: ObjectStore, session_id: str, **fields: Any) -> None:
    """An ended, consented, non-synthetic, labellable session's record (``session.json`` and an empty event log);
    ``fields`` override any field of ``session.json``."""
    manifest = {
        "session_id": session_id,
        "state": "ended",
        "use_for_training": True,
        "synthetic": False,
        "counts": LABELLABLE_COUNTS,
        **fields,
    }
    keys = session_record_keys(session_id)
    store.put_bytes(Bucket.SESSIONS, keys["events.jsonl"], b"")
    store.put_json(Bucket.SESSIONS, keys["session.json"], manifest)
