"""The session record: a session's Redis event log copied to object storage.

    emili-sessions/<session>/events.jsonl   every event, in order
    emili-sessions/<session>/fer.jsonl      the FER time series (one reading per line)
    emili-sessions/<session>/session.json   the session's metadata, counts, and the last event id copied

Idempotent: the output is a function of the event log, and a run that finds session.json already at
the log's last event id does nothing. A deleted session (its tombstone, :mod:`emili_core.deletion`) is never
written: the run does nothing, and removes what it wrote if the deletion happened while it ran.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import redis

from emili_chat.retention import apply_retention
from emili_chat.store import read_events, read_session
from emili_core.deletion import SessionDeleted, guard_written, session_deleted
from emili_core.errors import NotFound
from emili_core.keys import check_session_id, session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import RetentionSettings
from emili_session.events import EventKind

log = logging.getLogger(__name__)


def persist_session(
    client: redis.Redis, store: ObjectStore, session_id: str, retention: RetentionSettings | None = None
) -> dict[str, Any]:
    """Copy the session's Redis event log to object storage; then (``retention``) its Redis stream and hash get
    their expiry (:mod:`emili_chat.retention`): the record stays, the live data go."""
    check_session_id(session_id)
    skipped = {"session_id": session_id, "deleted": True, "events": 0, "reused": False}
    if session_deleted(store, session_id):
        log.info("session %s was deleted: not persisted", session_id)
        return skipped
    try:
        record = read_session(client, session_id)
    except NotFound:
        if session_deleted(store, session_id):  # Deleted between the check and the read.
            return skipped
        raise
    events = read_events(client, session_id)
    keys = session_record_keys(session_id)
    last_event_id = events[-1].event_id if events else ""
    summary: dict[str, Any] = {"session_id": session_id, "events": len(events), "last_event_id": last_event_id}
    if store.exists(Bucket.SESSIONS, keys["session.json"]):
        existing = store.get_json(Bucket.SESSIONS, keys["session.json"])
        if existing.get("last_event_id") == last_event_id and existing.get("state") == record.state:
            if retention is not None:
                summary["expires_in_s"] = apply_retention(client, session_id, retention)
            return {**summary, "reused": True}
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        events_path, fer_path = Path(tmp) / "events.jsonl", Path(tmp) / "fer.jsonl"
        with events_path.open("w") as all_events, fer_path.open("w") as fer:
            for event in events:
                counts[str(event.kind)] = counts.get(str(event.kind), 0) + 1
                line = json.dumps(event.to_json(), separators=(",", ":")) + "\n"
                all_events.write(line)
                if event.kind == EventKind.FER_READING:
                    fer.write(line)
        store.put_file(Bucket.SESSIONS, keys["events.jsonl"], events_path, content_type="application/x-ndjson")
        store.put_file(Bucket.SESSIONS, keys["fer.jsonl"], fer_path, content_type="application/x-ndjson")
    manifest = {
        **{k: v for k, v in vars(record).items()},
        "last_event_id": last_event_id,
        "counts": counts,
        "objects": {name: f"s3://{store.bucket(Bucket.SESSIONS)}/{key}" for name, key in keys.items()},
    }
    # Written last: its presence with this event id means the whole record is complete.
    store.put_json(Bucket.SESSIONS, keys["session.json"], manifest)
    try:
        guard_written(store, session_id, [(Bucket.SESSIONS, key) for key in keys.values()])
    except SessionDeleted:
        log.info("session %s was deleted while it was persisted: its record was removed again", session_id)
        return skipped
    log.info("persisted session %s: %d events", session_id, len(events))
    if retention is not None:
        summary["expires_in_s"] = apply_retention(client, session_id, retention)
    return {**summary, "reused": False, "counts": counts}
