"""Deleting a person's data: session tombstones and the deletion audit log (both in bucket ``sessions``).

    tombstones/<session>.json                 {"session_id", "deleted_ms"}: this session's data were deleted
    audit/deletions/<YYYY-MM-DD>/<id>.json    one record per deletion: which service, who asked, which sessions,
                                              what was removed (counts and key names), when; no personal content

A tombstone is written before anything is deleted and never removed. Every job that writes a session's data
checks it before writing and again after (``guard_written``), deleting what it wrote if the session was deleted
meanwhile; with S3's read-after-write consistency, either the job sees the tombstone or the deleter's listing
(made after the tombstone) sees the job's object, so a job queued before a deletion cannot bring data back.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from emili_core.errors import NotFound
from emili_core.keys import deletion_audit_key, session_tombstone_key
from emili_core.objectstore import Bucket, ObjectStore

log = logging.getLogger(__name__)
MAX_REASON_CHARS = 200


class SessionDeleted(NotFound):
    """The session's data were deleted (at its owner's or an admin's request): nothing more is written for it."""


def now_ms() -> int:
    return int(time.time() * 1000)


def tombstone(store: ObjectStore, session_id: str) -> dict[str, Any] | None:
    """The session's tombstone, or None when its data were never deleted."""
    try:
        return dict(store.get_json(Bucket.SESSIONS, session_tombstone_key(session_id)))
    except NotFound:
        return None


def session_deleted(store: ObjectStore, session_id: str) -> bool:
    return store.exists(Bucket.SESSIONS, session_tombstone_key(session_id))


def check_not_deleted(store: ObjectStore, session_id: str) -> None:
    if session_deleted(store, session_id):
        raise SessionDeleted(f"session {session_id} was deleted at its owner's request; nothing is written for it")


def write_tombstone(store: ObjectStore, session_id: str, deleted_ms: int | None = None) -> tuple[str, bool]:
    """Mark the session deleted (the first deletion's time is kept); returns the key and whether it was there."""
    key = session_tombstone_key(session_id)
    if store.exists(Bucket.SESSIONS, key):
        return key, True
    store.put_json(Bucket.SESSIONS, key, {"session_id": session_id, "deleted_ms": deleted_ms or now_ms()})
    return key, False


def guard_written(store: ObjectStore, session_id: str, written: Iterable[tuple[Bucket, str]]) -> None:
    """After writing a session's objects: if the session was deleted meanwhile, delete them and raise."""
    if session_deleted(store, session_id):
        for bucket, key in written:
            store.delete(bucket, key)
        raise SessionDeleted(f"session {session_id} was deleted while this job ran; what it wrote was removed")


def audit_deletion(
    store: ObjectStore,
    *,
    service: str,
    action: str,
    requested_by: str,
    session_ids: Iterable[str],
    removed: Mapping[str, Any],
    reason: str = "",
    time_ms: int | None = None,
) -> str:
    """Append one record to the deletion audit log; returns its key. Give ids and counts only, never content."""
    stamp = time_ms or now_ms()
    sessions = sorted(set(session_ids))
    day = time.strftime("%Y-%m-%d", time.gmtime(stamp / 1000))
    audit_id = f"{stamp:013d}-{service}-{uuid.uuid4().hex[:12]}"
    key = deletion_audit_key(day, audit_id)
    record = {
        "id": audit_id,
        "time_ms": stamp,
        "service": service,
        "action": action,
        "requested_by": requested_by,
        "reason": reason[:MAX_REASON_CHARS],
        "session_ids": sessions,
        "removed": dict(removed),
    }
    store.put_json(Bucket.SESSIONS, key, record)
    log.info(
        "deletion audited: %s %s by %s, %d sessions (%s)",
        service,
        action,
        requested_by,
        len(sessions),
        key,
    )
    return key
