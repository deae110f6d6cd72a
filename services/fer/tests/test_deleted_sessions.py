"""Offline FER jobs write nothing for a session whose data were deleted (its tombstone), even when the deletion
happens while the job runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from emili_core.deletion import write_tombstone
from emili_core.keys import frame_key, session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_fer import jobs
from emili_fer.engine import FerEngine

pytestmark = pytest.mark.integration


def store_frames(store: ObjectStore, session_id: str, jpeg: bytes) -> None:
    # The user consented to storing frames (the FER jobs refuse a session without it).
    store.put_json(Bucket.SESSIONS, session_record_keys(session_id)["session.json"], {"store_frames": True})
    for i in range(3):
        store.put_bytes(Bucket.FRAMES, frame_key(session_id, 1_700_000_000_000 + 1000 * i), jpeg)


def test_a_deleted_session_is_not_analysed(
    loaded_engine: FerEngine, object_store: ObjectStore, face_jpeg: bytes
) -> None:
    store_frames(object_store, "fer-deleted", face_jpeg)
    write_tombstone(object_store, "fer-deleted")
    assert jobs.analyze_session_frames(loaded_engine, object_store, "fer-deleted") == {
        "session_id": "fer-deleted",
        "deleted": True,
    }
    assert object_store.list_keys(Bucket.SESSIONS, "fer-deleted/") == ["fer-deleted/session.json"]


def test_readings_written_as_the_session_is_deleted_are_removed(
    loaded_engine: FerEngine, object_store: ObjectStore, face_jpeg: bytes
) -> None:
    store_frames(object_store, "fer-racing", face_jpeg)
    put_file = object_store.put_file

    def deleted_meanwhile(bucket: Bucket, key: str, path: Path, content_type: str = "") -> str:
        digest = put_file(bucket, key, path, content_type)
        write_tombstone(object_store, "fer-racing")  # Chat deletes the session while the readings upload.
        return digest

    object_store.put_file = deleted_meanwhile  # type: ignore[method-assign]
    result = jobs.analyze_session_frames(loaded_engine, object_store, "fer-racing")
    assert result["deleted"] is True
    assert object_store.list_keys(Bucket.SESSIONS, "fer-racing/") == ["fer-racing/session.json"]
