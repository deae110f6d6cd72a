"""Session records and frames survive object-storage outages and worker deaths (real processes).

Each test runs its own S3 server (``rclone serve s3`` on a fixed free port over a temporary folder) so that it
can stop it and start it again at the same address, and uses its own Redis database. The chat worker is a real
``emili-chat-worker`` process; the chat and FER servers run in this process with the scripted LLM backend.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_chat.main import build_app as build_chat
from emili_chat.settings import ChatSettings
from emili_core.grpc_client import make_channel
from emili_core.grpc_server import start_server
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import REPO_ROOT, AuthSettings, S3Settings
from emili_testing.chat import ScriptedBackend
from emili_testing.plugin import TEST_SECRET, EntryPointProcess, Stack, _binary, free_port, token

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FACE = REPO_ROOT / "var" / "artifacts" / "samples" / "face_640x480.jpg"
OUTAGE_S = float(os.environ.get("EMILI_TEST_OUTAGE_S", "90"))
BIN = Path(sys.executable).parent


class S3Server:
    """``rclone serve s3`` that can be stopped and started again at the same address over the same folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.settings = S3Settings(endpoint=f"127.0.0.1:{free_port()}", bucket_prefix="faults-", max_attempts=2)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        keys = f"{self.settings.access_key.get_secret_value()},{self.settings.secret_key.get_secret_value()}"
        self.process = subprocess.Popen(
            [
                *(_binary("rclone"), "serve", "s3", str(self.folder), "--addr", self.settings.endpoint),
                *("--auth-key", keys, "--force-path-style=true", "--log-level", "ERROR"),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ObjectStore(self.settings).client.list_buckets()
                return
            except Exception:
                time.sleep(0.1)
        raise AssertionError("rclone serve s3 did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    server = S3Server(tmp_path / "s3")
    server.folder.mkdir()
    server.start()
    ObjectStore(server.settings).ensure_buckets()
    yield server
    server.stop()


@pytest.fixture
def faults_redis(stack: Stack) -> Iterator[str]:
    url = stack.redis_url.rsplit("/", 1)[0] + "/7"  # Its own database: the reconciler sees only these sessions.
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def worker_env(redis_url: str, s3: S3Server, metrics_port: int = 0, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "EMILI_ENV": "test",
        "EMILI_REDIS_URL": redis_url,
        "EMILI_S3__ENDPOINT": s3.settings.endpoint,
        "EMILI_S3__BUCKET_PREFIX": s3.settings.bucket_prefix,
        "EMILI_S3__MAX_ATTEMPTS": "2",
        "EMILI_AUTH__SECRET": TEST_SECRET,
        "EMILI_CHAT__WORKER__METRICS_PORT": str(metrics_port),
        "EMILI_CHAT__RECONCILE__INTERVAL_S": "2",
        "EMILI_CHAT__RECONCILE__REQUEUE_AFTER_S": "10",
        **extra,
    }


def last_event_id(client: redis.Redis, session_id: str) -> str:
    entries: Any = client.xrevrange(f"emili:chat:events:{session_id}", count=1)
    return entries[0][0].decode() if entries else ""


def record_is_current(store: ObjectStore, client: redis.Redis, session_id: str) -> bool:
    key = f"{session_id}/session.json"
    try:
        if not store.exists(Bucket.SESSIONS, key):
            return False
        return bool(store.get_json(Bucket.SESSIONS, key)["last_event_id"] == last_event_id(client, session_id))
    except Exception:
        return False


async def wait_for(check: Any, what: str, limit_s: float, worker: EntryPointProcess | None = None) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > limit_s:
            raise AssertionError(f"{what} not within {limit_s} s" + (f": {worker.tail()}" if worker else ""))
        await asyncio.sleep(0.5)
    return time.monotonic() - started


@pytest.fixture
async def chat_server(faults_redis: str, s3: S3Server, tmp_path: Path) -> AsyncIterator[str]:
    from emili_fer.main import build_app as build_fer
    from emili_fer.settings import FerSettings

    fer_settings = FerSettings(env="test", redis_url=faults_redis, s3=s3.settings)
    fer_options = fer_settings.fer.model_copy(
        update={"server": fer_settings.fer.server.model_copy(update={"grpc_port": 0, "metrics_port": 0})}
    )
    fer_settings = fer_settings.model_copy(update={"fer": fer_options})
    fer = await start_server(build_fer(fer_settings), fer_settings, fer_options.server)
    await asyncio.wait_for(fer.ready.wait(), 120)
    settings = ChatSettings(
        env="test",
        redis_url=faults_redis,
        s3=s3.settings,
        auth=AuthSettings(secret=TEST_SECRET),  # type: ignore[arg-type]
        artifacts_dir=tmp_path,
    )
    options = settings.chat.model_copy(
        update={
            "server": settings.chat.server.model_copy(update={"grpc_port": 0, "metrics_port": 0}),
            "fer_target": f"127.0.0.1:{fer.port}",
            "readout": settings.chat.readout.model_copy(update={"post_response_reading_s": 0.0}),
        }
    )
    settings = settings.model_copy(update={"chat": options})
    chat = await start_server(build_chat(settings, ScriptedBackend("I hear you.")), settings, options.server)
    await asyncio.wait_for(chat.ready.wait(), 60)
    yield f"127.0.0.1:{chat.port}"
    await chat.stop()
    await fer.stop()


async def test_an_s3_outage_loses_no_record_and_no_frame(
    chat_server: str, faults_redis: str, s3: S3Server, tmp_path: Path
) -> None:
    worker = EntryPointProcess("emili-chat-worker", worker_env(faults_redis, s3), tmp_path / "worker.log")
    client = redis.Redis.from_url(faults_redis)
    face = FACE.read_bytes()
    try:
        async with make_channel(chat_server, token(["chat"], subject="olga"), timeout=30) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            consent = chat_pb2.Consent(store_frames=True, use_for_training=True)
            sessions = [
                (await stub.CreateSession(chat_pb2.CreateSessionRequest(consent=consent))).session.session_id
                for _ in range(3)
            ]
            live = sessions[0]
            s3.stop()
            outage_started = time.monotonic()
            for session_id in sessions[1:]:  # Two sessions end while storage is down.
                await stub.EndSession(chat_pb2.EndSessionRequest(session_id=session_id))
            sent_frames = 0

            async def requests() -> AsyncIterator[chat_pb2.ConverseRequest]:
                nonlocal sent_frames
                yield chat_pb2.ConverseRequest(session_id=live)
                for turn in range(3):
                    for _ in range(4):
                        now = int(time.time() * 1000)
                        yield chat_pb2.ConverseRequest(frame=chat_pb2.FaceFrame(jpeg=face, capture_time_ms=now))
                        sent_frames += 1
                        await asyncio.sleep(0.3)
                    yield chat_pb2.ConverseRequest(
                        user_message=chat_pb2.UserMessage(text=f"Message {turn}, how are you?")
                    )
                    await asyncio.sleep(1.5)

            replies = [r async for r in stub.Converse(requests())]
            messages = [r.message.text for r in replies if r.WhichOneof("event") == "message"]
            assert len(messages) >= 3, "the conversation stopped while object storage was down"
            await stub.EndSession(chat_pb2.EndSessionRequest(session_id=live))
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
        s3.start()
        store = ObjectStore(s3.settings)
        elapsed = await wait_for(
            lambda: all(record_is_current(store, client, s) for s in sessions), "every record", 120, worker
        )
        print(f"records current {elapsed:.1f} s after storage returned")
        events = client.xrange(f"emili:chat:events:{live}")
        stored = [e for _, e in events if e[b"kind"] == b"frame_stored"]  # type: ignore[union-attr]
        assert len(stored) == sent_frames
        frames = store.list_keys(Bucket.FRAMES, f"{live}/")
        assert len(frames) == sent_frames
        manifest = store.get_json(Bucket.SESSIONS, f"{live}/session.json")
        assert manifest["counts"]["frame_stored"] == sent_frames and "frames_dropped" not in manifest["counts"]
    finally:
        worker.stop()
        client.close()


async def test_a_worker_killed_while_persisting_is_redelivered_within_a_minute(
    faults_redis: str, s3: S3Server, tmp_path: Path
) -> None:
    from emili_chat.store import ENDED, SessionRecord, events_key, session_key
    from emili_core.tasks import create_celery_app

    client = redis.Redis.from_url(faults_redis)
    session_id = "f" * 32
    record = SessionRecord(session_id, "pavel", "base", "scripted", False, False, {}, state=ENDED, ended_ms=1)
    client.hset(session_key(session_id), mapping=record.to_redis())  # type: ignore[arg-type]
    client.xadd(events_key(session_id), {"kind": "session_ended", "time_ms": "1", "payload": "{}"})
    # Redelivery alone brings the record back: no reconciler.
    env = worker_env(faults_redis, s3, EMILI_CHAT__RECONCILE__ENABLED="false")
    worker = EntryPointProcess("emili-chat-worker", env, tmp_path / "worker-1.log")
    second: EntryPointProcess | None = None
    settings = ChatSettings(redis_url=faults_redis, s3=s3.settings)
    try:
        await wait_for(lambda: "ready" in worker.tail(100_000), "worker start", 60, worker)
        s3.stop()
        create_celery_app("chat", settings).send_task("chat.persist_session", args=[session_id])
        await wait_for(lambda: client.hlen("unacked:chat") > 0, "the worker holding the task", 30, worker)
        await asyncio.sleep(2)
        worker.kill()
        killed = time.monotonic()
        s3.start()
        second = EntryPointProcess("emili-chat-worker", env, tmp_path / "worker-2.log")
        store = ObjectStore(s3.settings)
        await wait_for(lambda: record_is_current(store, client, session_id), "the record", 60 - 1, second)
        print(f"record present {time.monotonic() - killed:.1f} s after the SIGKILL")
    finally:
        worker.kill()
        if second is not None:
            second.stop()
        client.close()


def check(env: dict[str, str]) -> int:
    return subprocess.run([str(BIN / "emili-chat-worker"), "--check"], env=env, timeout=30).returncode


async def test_a_worker_started_while_s3_is_down_waits_and_becomes_ready(
    faults_redis: str, s3: S3Server, tmp_path: Path
) -> None:
    env = worker_env(faults_redis, s3, metrics_port=free_port())
    s3.stop()
    worker = EntryPointProcess("emili-chat-worker", env, tmp_path / "worker.log")
    try:
        await wait_for(lambda: "waiting for" in worker.tail(), "the worker saying what it waits for", 30, worker)
        await asyncio.sleep(3)
        assert worker.alive(), worker.tail()
        assert await asyncio.to_thread(check, env) == 1  # Alive, not ready.
        s3.start()
        elapsed = await wait_for(lambda: check(env) == 0, "readiness", 60, worker)
        print(f"ready {elapsed:.1f} s after storage returned")
        assert worker.alive()
    finally:
        worker.stop()
