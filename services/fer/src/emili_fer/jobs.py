"""Offline FER jobs run by the worker: analyse a session's stored frames; ingest an uploaded video.

Outputs are keyed by content (the frames' keys and ETags, the model and the pipeline settings), so
a retried or redelivered job finds its finished output instead of writing a second one. A deleted session
(its tombstone, :mod:`emili_core.deletion`) gets nothing written: the job does nothing, and removes what it
wrote if the deletion happened while it ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2

from emili_core.deletion import SessionDeleted, guard_written, session_deleted
from emili_core.errors import FailedPrecondition, InvalidInput, NotFound
from emili_core.keys import capture_time_of, check_session_id, fer_readings_key, frame_key, frames_prefix
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.records import HashReader, session_consent
from emili_fer.engine import FerEngine, FrameInput, Reading

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
CHUNK_FRAMES = 64


def check_frames_consent(store: ObjectStore, session_id: str, client: HashReader | None, what: str) -> None:
    """Refuse (FailedPrecondition) unless the session's user consented to storing face frames (its record in
    object storage, or chat's Redis hash while it is live); nothing is stored or analysed without it."""
    consent = session_consent(store, session_id, client)
    if consent is None:
        raise FailedPrecondition(
            f"cannot {what}: session {session_id} has no session record, so no consent to store face frames"
        )
    if not consent.store_frames:
        raise FailedPrecondition(
            f"cannot {what}: the user of session {session_id} did not consent to storing face frames"
        )


def analyze_session_frames(
    engine: FerEngine,
    store: ObjectStore,
    session_id: str,
    progress: Progress = lambda done, total: None,
    client: HashReader | None = None,
) -> dict[str, object]:
    """Write ``<session>/fer/readings-<hash>.jsonl`` (one reading per stored frame, in time order); only for a
    session whose user consented to storing frames (``client``: Redis, for a live session's consent)."""
    check_session_id(session_id)
    if session_deleted(store, session_id):
        log.info("session %s was deleted: its frames are not analysed", session_id)
        return {"session_id": session_id, "deleted": True}
    entries = store.list_entries(Bucket.FRAMES, frames_prefix(session_id))
    if not entries:
        raise NotFound(f"session {session_id} has no stored frames under {frames_prefix(session_id)}")
    check_frames_consent(store, session_id, client, "analyse stored frames")
    fingerprint = hashlib.sha256(
        json.dumps([entries, engine.manifest.id, engine.options.model_dump(mode="json")], sort_keys=True).encode()
    ).hexdigest()[:16]
    out_key = fer_readings_key(session_id, fingerprint)
    result: dict[str, object] = {"session_id": session_id, "key": out_key, "frames": len(entries)}
    if store.exists(Bucket.SESSIONS, out_key):
        log.info("readings for %s already exist at %s", session_id, out_key)
        return {**result, "reused": True}
    faces = 0
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as out:
        for start in range(0, len(entries), CHUNK_FRAMES):
            chunk = entries[start : start + CHUNK_FRAMES]
            frames = [FrameInput(store.get_bytes(Bucket.FRAMES, key)) for key, _ in chunk]
            for (key, _), reading in zip(chunk, engine.analyze_sync(frames), strict=True):
                record: dict[str, object] = {"capture_time_ms": capture_time_of(key), "frame_key": key}
                if isinstance(reading, Reading):
                    faces += reading.face_found
                    record.update(reading.to_json())
                else:
                    record["error"] = str(reading)
                out.write(json.dumps(record) + "\n")
            progress(min(start + CHUNK_FRAMES, len(entries)), len(entries))
    path = Path(out.name)
    try:
        store.put_file(Bucket.SESSIONS, out_key, path, content_type="application/x-ndjson")
    finally:
        path.unlink(missing_ok=True)
    try:
        guard_written(store, session_id, [(Bucket.SESSIONS, out_key)])
    except SessionDeleted:
        return {"session_id": session_id, "deleted": True}
    return {**result, "faces": faces, "reused": False}


def ingest_video(
    engine: FerEngine,
    store: ObjectStore,
    session_id: str,
    video_key: str,
    fps: float,
    max_frames: int,
    progress: Progress = lambda done, total: None,
    client: HashReader | None = None,
) -> dict[str, object]:
    """Sample an uploaded video (frames bucket) at ``fps``, store the frames, then analyse them; refused
    (nothing stored) unless the session's user consented to storing frames."""
    check_session_id(session_id)
    if session_deleted(store, session_id):
        log.info("session %s was deleted: its video is not ingested", session_id)
        return {"session_id": session_id, "deleted": True, "video_key": video_key}
    check_frames_consent(store, session_id, client, "ingest a video")
    written: list[tuple[Bucket, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = store.get_file(Bucket.FRAMES, video_key, Path(tmp) / Path(video_key).name)
        capture = cv2.VideoCapture(str(path))
        if not capture.isOpened():
            raise InvalidInput(f"{video_key} is not a video OpenCV can read")
        try:
            native_fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
            total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
            if native_fps <= 0:
                raise InvalidInput(f"{video_key} has no frame rate")
            step = max(1.0, native_fps / fps)
            index, next_sample, stored = 0, 0.0, 0
            while stored < max_frames and capture.grab():
                if index >= next_sample:
                    ok, image = capture.retrieve()
                    if not ok:
                        break
                    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
                    key = frame_key(session_id, round(index * 1000.0 / native_fps))
                    if not store.exists(Bucket.FRAMES, key):
                        store.put_bytes(Bucket.FRAMES, key, jpeg.tobytes(), content_type="image/jpeg")
                        written.append((Bucket.FRAMES, key))
                    stored += 1
                    next_sample += step
                    progress(index, total)
                index += 1
        finally:
            capture.release()
    try:
        guard_written(store, session_id, written)
    except SessionDeleted:
        return {"session_id": session_id, "deleted": True, "video_key": video_key}
    if stored == 0:
        raise InvalidInput(f"{video_key} has no decodable frames")
    analysis = analyze_session_frames(engine, store, session_id, progress, client)
    return {**analysis, "video_key": video_key, "sampled_frames": stored}
