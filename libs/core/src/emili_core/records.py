"""Reading the session records the chat service persists (bucket ``sessions``): the shared contract between
the chat service, which writes them, and the labeler, trainer and pipeline, which read them."""

from __future__ import annotations

import json
from typing import Any

from emili_core.errors import NotFound
from emili_core.keys import check_session_id, session_record_keys
from emili_core.objectstore import Bucket, ObjectStore


def load_session(store: ObjectStore, session_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A persisted session record: its manifest and its events."""
    check_session_id(session_id)
    keys = session_record_keys(session_id)
    try:
        manifest = store.get_json(Bucket.SESSIONS, keys["session.json"])
    except NotFound:
        raise NotFound(f"session {session_id} has no record in object storage (is it ended and persisted?)") from None
    lines = store.get_bytes(Bucket.SESSIONS, keys["events.jsonl"]).decode().splitlines()
    return manifest, [json.loads(line) for line in lines if line.strip()]


def recorded_sessions(store: ObjectStore) -> list[str]:
    """Ids of every persisted session, sorted."""
    return sorted(k.split("/")[0] for k in store.list_keys(Bucket.SESSIONS, "") if k.endswith("/session.json"))
