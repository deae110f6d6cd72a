"""The FER Celery worker through real Redis and S3 servers: results, redelivery after SIGKILL, video ingest."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from celery import Celery

from emili_core.keys import frame_key, session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import REPO_ROOT, CommonSettings
from emili_core.tasks import create_celery_app
from emili_testing.plugin import EntryPointProcess, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FACE = REPO_ROOT / "var" / "artifacts" / "samples" / "face_640x480.jpg"
# Short limits so that a message of a killed worker comes back within the test's patience.
TIME_LIMIT, VISIBILITY = 8, 10


class Worker(EntryPointProcess):
    def __init__(self, env: dict[str, str], log: Path) -> None:
        super().__init__("emili-fer-worker", env, log)


@pytest.fixture
def worker_env(stack: Stack, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        **os.environ,
        **stack.env(),
        "EMILI_FER__WORKER__METRICS_PORT": "0",
        "EMILI_TASK_TIME_LIMIT_SECONDS": str(TIME_LIMIT),
        "EMILI_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY),
        "EMILI_LOG_LEVEL": "INFO",
    }
    for key, value in env.items():
        if key.startswith("EMILI_"):
            monkeypatch.setenv(key, value)  # The producer (this process) must agree on the broker options.
    return env


@pytest.fixture
def producer(worker_env: dict[str, str]) -> Iterator[Celery]:
    app = create_celery_app("tests", CommonSettings())
    yield app
    app.close()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def _start_worker(workers: list[Worker], env: dict[str, str], tmp_path: Path) -> Worker:
    worker = Worker(env, tmp_path / f"worker-{len(workers)}.log")
    workers.append(worker)
    return worker


def _consent(store: ObjectStore, session_id: str) -> None:
    """The session's record says its user consented to storing frames (FER refuses a session without it)."""
    store.put_json(Bucket.SESSIONS, session_record_keys(session_id)["session.json"], {"store_frames": True})


def _store_frames(store: ObjectStore, session_id: str, count: int) -> None:
    _consent(store, session_id)
    face = FACE.read_bytes()
    noise = cv2.imencode(".jpg", np.random.default_rng(1).integers(0, 255, (480, 640), np.uint8))[1].tobytes()
    for i in range(count):
        store.put_bytes(
            Bucket.FRAMES, frame_key(session_id, 1_700_000_000_000 + 1000 * i), noise if i % 5 == 4 else face
        )


def _readings(store: ObjectStore, session_id: str) -> list[str]:
    return store.list_keys(Bucket.SESSIONS, f"{session_id}/fer/")


def test_task_result_through_a_real_worker(
    producer: Celery, workers: list[Worker], worker_env: dict[str, str], object_store: ObjectStore, tmp_path: Path
) -> None:
    _store_frames(object_store, "sess-basic", 10)
    _start_worker(workers, worker_env, tmp_path)
    result = producer.send_task("fer.analyze_session_frames", args=["sess-basic"]).get(timeout=90)
    assert result["frames"] == 10 and result["faces"] == 8 and result["reused"] is False
    lines = object_store.get_bytes(Bucket.SESSIONS, result["key"]).decode().splitlines()
    assert len(lines) == 10
    again = producer.send_task("fer.analyze_session_frames", args=["sess-basic"]).get(timeout=60)
    assert again["key"] == result["key"] and again["reused"] is True
    assert _readings(object_store, "sess-basic") == [result["key"]]


def test_missing_session_fails_without_retries(
    producer: Celery, workers: list[Worker], worker_env: dict[str, str], object_store: ObjectStore, tmp_path: Path
) -> None:
    _start_worker(workers, worker_env, tmp_path)
    async_result = producer.send_task("fer.analyze_session_frames", args=["no-such-session"])
    with pytest.raises(Exception, match="has no stored frames"):
        async_result.get(timeout=60)
    assert async_result.state == "FAILURE"


def test_worker_killed_mid_task_is_redelivered_and_completes_once(
    producer: Celery, workers: list[Worker], worker_env: dict[str, str], object_store: ObjectStore, tmp_path: Path
) -> None:
    _store_frames(object_store, "sess-kill", 400)
    first = _start_worker(workers, worker_env, tmp_path)
    async_result = producer.send_task("fer.analyze_session_frames", args=["sess-kill"])
    deadline = time.monotonic() + 60
    while async_result.state != "PROGRESS":  # Reported after the first chunk of frames.
        assert time.monotonic() < deadline, f"task never started: {first.log.read_text()[-2000:]}"
        time.sleep(0.05)
    first.kill()
    assert _readings(object_store, "sess-kill") == []  # Killed before it could write anything.

    second = _start_worker(workers, worker_env, tmp_path)
    result = async_result.get(timeout=VISIBILITY + 90)
    assert async_result.id in second.log.read_text()  # The second worker ran the redelivered message.
    assert result["frames"] == 400 and result["reused"] is False
    assert _readings(object_store, "sess-kill") == [result["key"]]  # Exactly one completed output.
    assert len(object_store.get_bytes(Bucket.SESSIONS, result["key"]).splitlines()) == 400


def test_video_ingest(
    producer: Celery, workers: list[Worker], worker_env: dict[str, str], object_store: ObjectStore, tmp_path: Path
) -> None:
    face = cv2.imread(str(FACE))
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (640, 480))
    for i in range(30):  # Three seconds at 10 fps, the face drifting right.
        writer.write(np.roll(face, 2 * i, axis=1))
    writer.release()
    object_store.put_file(Bucket.FRAMES, "uploads/clip.avi", video)
    _consent(object_store, "sess-video")
    _start_worker(workers, worker_env, tmp_path)
    result = producer.send_task("fer.ingest_video", args=["sess-video", "uploads/clip.avi", 2.0]).get(timeout=90)
    assert result["sampled_frames"] == 6 and result["frames"] == 6 and result["faces"] == 6
    keys = object_store.list_keys(Bucket.FRAMES, "sess-video/frames/")
    assert [int(Path(k).stem) for k in keys] == [0, 500, 1000, 1500, 2000, 2500]
