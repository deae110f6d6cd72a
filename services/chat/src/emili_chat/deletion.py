"""Deleting sessions' data from object storage, and the plain types the engine returns for a deletion.

What chat deletes for a session (the engine removes its Redis hash, event stream and index entry first):

    emili-sessions/<session>/...   everything but labels/ (the record, FER readings; labels are the labeler's,
                                   removed by ``labeler.forget_sessions``)
    emili-frames/<session>/...     every stored face frame, and uploaded videos

A tombstone (:mod:`emili_core.deletion`) is written before anything is removed, and each deletion is audited.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from emili_core.errors import NotFound
from emili_core.keys import session_record_keys
from emili_core.objectstore import Bucket, ObjectStore

LABELS = "labels/"


@dataclass(frozen=True)
class DeletedSession:
    session_id: str
    already_deleted: bool  # A tombstone was there before: an earlier call deleted it (this one swept again).
    redis_keys: tuple[str, ...]
    events: int
    record_objects: int
    frames: int
    tombstone_key: str
    deleted_ms: int

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "redis_keys": list(self.redis_keys)}


@dataclass(frozen=True)
class Deletion:
    user_id: str  # Whose sessions (DeleteUserData); the owner, when known, for one session.
    sessions: tuple[DeletedSession, ...]
    audit_key: str

    def totals(self) -> dict[str, int]:
        """What the audit log records: counts only."""
        return {
            "sessions": len(self.sessions),
            "already_deleted": sum(s.already_deleted for s in self.sessions),
            "redis_keys": sum(len(s.redis_keys) for s in self.sessions),
            "events": sum(s.events for s in self.sessions),
            "record_objects": sum(s.record_objects for s in self.sessions),
            "frames": sum(s.frames for s in self.sessions),
        }


def persisted_owner(store: ObjectStore, session_id: str) -> str | None:
    """The owner named in the session's persisted record, or None when there is none."""
    try:
        manifest = store.get_json(Bucket.SESSIONS, session_record_keys(session_id)["session.json"])
    except NotFound:
        return None
    owner = manifest.get("user_id") if isinstance(manifest, dict) else None
    return str(owner) if owner else None


def sweep_objects(store: ObjectStore, session_id: str) -> tuple[int, int]:
    """Delete the session's objects (all but its labels) and its frames; returns (record objects, frames)."""
    prefix = f"{session_id}/"
    record = [k for k in store.list_keys(Bucket.SESSIONS, prefix) if not k.startswith(prefix + LABELS)]
    frames = store.list_keys(Bucket.FRAMES, prefix)
    for key in record:
        store.delete(Bucket.SESSIONS, key)
    for key in frames:
        store.delete(Bucket.FRAMES, key)
    return len(record), len(frames)
