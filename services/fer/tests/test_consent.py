"""The offline FER jobs store and analyse face frames only for a session whose user consented to storing them
(its record's ``store_frames``, or chat's Redis hash while the session is live); otherwise they refuse with
FailedPrecondition and store nothing."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis

from emili_core.errors import FailedPrecondition
from emili_core.keys import frame_key, frames_prefix, session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.records import CHAT_SESSION_HASH
from emili_fer import jobs
from emili_fer.engine import FerEngine

pytestmark = pytest.mark.integration


def _video(store: ObjectStore, face_jpeg: bytes, tmp_path: Path, key: str) -> None:
    face = cv2.imdecode(np.frombuffer(face_jpeg, np.uint8), cv2.IMREAD_COLOR)
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (face.shape[1], face.shape[0]))
    for _ in range(10):
        writer.write(face)
    writer.release()
    store.put_file(Bucket.FRAMES, key, path)


def _record(store: ObjectStore, session_id: str, store_frames: bool) -> None:
    keys = session_record_keys(session_id)
    store.put_json(Bucket.SESSIONS, keys["session.json"], {"store_frames": store_frames, "use_for_training": True})


def test_ingest_video_refuses_a_session_without_consent_and_stores_nothing(
    loaded_engine: FerEngine, object_store: ObjectStore, face_jpeg: bytes, tmp_path: Path
) -> None:
    _video(object_store, face_jpeg, tmp_path, "uploads/consent-clip.avi")
    with pytest.raises(FailedPrecondition, match="no session record"):
        jobs.ingest_video(loaded_engine, object_store, "fer-no-record", "uploads/consent-clip.avi", 2.0, 100)
    _record(object_store, "fer-no-consent", store_frames=False)
    with pytest.raises(FailedPrecondition, match="did not consent to storing face frames"):
        jobs.ingest_video(loaded_engine, object_store, "fer-no-consent", "uploads/consent-clip.avi", 2.0, 100)
    for session_id in ("fer-no-record", "fer-no-consent"):
        assert object_store.list_keys(Bucket.FRAMES, frames_prefix(session_id)) == []
        assert object_store.list_keys(Bucket.SESSIONS, f"{session_id}/fer/") == []


def test_analysis_refuses_frames_of_a_session_without_consent(
    loaded_engine: FerEngine, object_store: ObjectStore, face_jpeg: bytes
) -> None:
    _record(object_store, "fer-frames-no-consent", store_frames=False)
    object_store.put_bytes(Bucket.FRAMES, frame_key("fer-frames-no-consent", 1_700_000_000_000), face_jpeg)
    with pytest.raises(FailedPrecondition, match="did not consent"):
        jobs.analyze_session_frames(loaded_engine, object_store, "fer-frames-no-consent")
    assert object_store.list_keys(Bucket.SESSIONS, "fer-frames-no-consent/fer/") == []


def test_a_live_sessions_consent_is_read_from_redis(
    loaded_engine: FerEngine, object_store: ObjectStore, face_jpeg: bytes, tmp_path: Path, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.hset(
        CHAT_SESSION_HASH.format("fer-live"),
        mapping={"store_frames": json.dumps(True), "use_for_training": json.dumps(False)},
    )
    _video(object_store, face_jpeg, tmp_path, "uploads/live-clip.avi")
    with pytest.raises(FailedPrecondition):  # Without Redis, the record is not found yet.
        jobs.ingest_video(loaded_engine, object_store, "fer-live", "uploads/live-clip.avi", 2.0, 100)
    result = jobs.ingest_video(
        loaded_engine, object_store, "fer-live", "uploads/live-clip.avi", 2.0, 100, client=client
    )
    assert result["sampled_frames"] == 2 and result["frames"] == 2
    assert len(object_store.list_keys(Bucket.FRAMES, frames_prefix("fer-live"))) == 2
