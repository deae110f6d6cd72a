"""Worker liveness: a heartbeat the worker writes itself, read by ``--live`` without Redis or models.

The unit tests drive :class:`Heartbeat` with a fake clock; the integration tests run a real Celery worker (in a
thread, as Celery's test harness does) against real Redis: a blocked consumer loop or a task past its time limit
stops the heartbeat, a stopped Redis does not."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from emili_core.queues import TASK_ROUTES, Queue
from emili_core.settings import CommonSettings, WorkerSettings
from emili_core.tasks import Heartbeat, create_celery_app, heartbeat_age, worker_live, worker_probe
from emili_testing.plugin import free_port

INTERVAL_S = 0.2
MAX_AGE_S = 1.0  # Five missed beats.
PATIENCE_S = 30.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the heartbeat's rule -------------------------------------------------------------------------------------


def test_beats_while_the_loop_ticks_and_stops_when_it_does_not(tmp_path: Path) -> None:
    clock = FakeClock()
    heartbeat = Heartbeat("test", tmp_path / "hb", 10.0, clock=clock)
    assert heartbeat.beat()  # Starting up (outside the loop): alive.
    heartbeat.loop_tick()
    clock.now += heartbeat.stale_after_s
    assert heartbeat.beat()
    clock.now += 1.0
    assert not heartbeat.beat() and "consumer loop" in (heartbeat.trouble() or "")
    heartbeat.loop_tick()
    assert heartbeat.beat()


def test_reconnecting_to_the_broker_is_not_being_stuck(tmp_path: Path) -> None:
    clock = FakeClock()
    heartbeat = Heartbeat("test", tmp_path / "hb", 10.0, clock=clock)
    heartbeat.loop_tick()
    heartbeat.loop_left()  # Celery left the loop to reconnect.
    clock.now += 100 * heartbeat.stale_after_s
    assert heartbeat.beat()


def test_a_task_past_its_time_limit_stops_the_heartbeat(tmp_path: Path) -> None:
    clock = FakeClock()
    heartbeat = Heartbeat("test", tmp_path / "hb", 10.0, clock=clock)
    heartbeat.task_started("t1", 30)
    heartbeat.task_started("t2", None)  # No limit: never counted as hung.
    clock.now += 30 + heartbeat.interval_s
    heartbeat.loop_tick()
    assert heartbeat.beat()
    clock.now += 1.0
    heartbeat.loop_tick()
    assert not heartbeat.beat() and "t1" in (heartbeat.trouble() or "")
    heartbeat.task_ended("t1")
    assert heartbeat.beat()


def test_the_file_holds_the_time_of_the_last_beat(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "hb"
    assert heartbeat_age(path) is None and not worker_live(path, MAX_AGE_S)
    before = time.time()
    Heartbeat("test", path, 10.0).beat()
    age = heartbeat_age(path, now=before + 50.0)
    # Written rounded to the millisecond, so it may read up to 1 ms either side of the beat's true time.
    assert age is not None and 50.0 - (time.time() - before) - 0.001 <= age <= 50.0 + 0.001
    assert worker_live(path, MAX_AGE_S)
    path.write_text(f"{time.time() - 2 * MAX_AGE_S}\n")
    assert not worker_live(path, MAX_AGE_S)


# --- the probe ------------------------------------------------------------------------------------------------


def test_live_probe_reads_the_heartbeat_only(tmp_path: Path) -> None:
    """``--live`` passes on a fresh heartbeat with the broker unreachable, and fails on a stale one with it up."""
    worker = WorkerSettings(metrics_port=0, heartbeat_file=tmp_path / "hb", liveness_max_age_s=MAX_AGE_S)
    no_broker = CommonSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    Heartbeat("test", tmp_path / "hb", 10.0).beat()
    assert worker_probe("test", no_broker, worker, ready=False) == 0
    assert worker_probe("test", no_broker, worker, ready=True) == 1  # Readiness still needs the broker.
    (tmp_path / "hb").write_text(f"{time.time() - 10 * MAX_AGE_S}\n")
    assert worker_probe("test", no_broker, worker, ready=False) == 1


# --- a real worker --------------------------------------------------------------------------------------------


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {PATIENCE_S} s"
        time.sleep(INTERVAL_S / 2)


@contextmanager
def running_worker(app: Celery, heartbeat: Heartbeat) -> Iterator[Any]:
    heartbeat.install(app)
    heartbeat.start()
    try:
        with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False, queues=["fer"]) as worker:
            wait_for(lambda: heartbeat.loop_ticked_at is not None, "the consumer loop started")
            yield worker
    finally:
        heartbeat.stop()


def make_app(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Celery, threading.Event]:
    monkeypatch.setitem(TASK_ROUTES, "test.hang", Queue.FER)
    app = create_celery_app("fer", CommonSettings(redis_url=redis_url))
    release = threading.Event()

    @app.task(name="test.hang", time_limit=1, shared=False)  # type: ignore[untyped-decorator]
    def hang() -> None:
        release.wait(PATIENCE_S)  # The thread pool cannot enforce the time limit: the task just goes on.

    return app, release


@pytest.mark.integration
def test_a_blocked_consumer_loop_fails_liveness(
    isolated_redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    app, _ = make_app(isolated_redis_url, monkeypatch)
    heartbeat = Heartbeat("fer", tmp_path / "hb", INTERVAL_S)
    with running_worker(app, heartbeat) as worker:
        assert worker_live(heartbeat.path, MAX_AGE_S)
        unblock = threading.Event()
        worker.hub.call_soon(unblock.wait, PATIENCE_S)  # Runs on the consumer loop and blocks it.
        try:
            wait_for(lambda: not worker_live(heartbeat.path, MAX_AGE_S), "liveness failed")
        finally:
            unblock.set()
        wait_for(lambda: worker_live(heartbeat.path, MAX_AGE_S), "liveness back once the loop runs again")


@pytest.mark.integration
def test_a_task_hung_past_its_time_limit_fails_liveness(
    isolated_redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    app, release = make_app(isolated_redis_url, monkeypatch)
    heartbeat = Heartbeat("fer", tmp_path / "hb", INTERVAL_S)
    with running_worker(app, heartbeat):
        result = app.send_task("test.hang")
        try:
            wait_for(lambda: not worker_live(heartbeat.path, MAX_AGE_S), "liveness failed")
            assert heartbeat.running, "the hung task is the reason"
        finally:
            release.set()
        result.get(timeout=PATIENCE_S)
        wait_for(lambda: worker_live(heartbeat.path, MAX_AGE_S), "liveness back once the task ended")


class RedisServer:
    """A redis-server of this test's own, to stop and start again."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        local = Path(sys.executable).parent / "redis-server"
        binary = str(local) if local.exists() else shutil.which("redis-server") or "redis-server"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", ""]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        wait_for(self.answers, "redis-server started")

    def answers(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.mark.integration
def test_liveness_holds_while_redis_is_stopped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        app, _ = make_app(server.url, monkeypatch)
        app.conf.broker_connection_max_retries = None  # Keep retrying for the whole outage.
        heartbeat = Heartbeat("fer", tmp_path / "hb", INTERVAL_S)
        with running_worker(app, heartbeat):
            server.stop()
            wait_for(lambda: heartbeat.loop_ticked_at is None, "the consumer left its loop to reconnect")
            outage_ends = time.monotonic() + 5 * MAX_AGE_S
            while time.monotonic() < outage_ends:
                assert worker_live(heartbeat.path, MAX_AGE_S), "a Redis outage failed liveness"
                time.sleep(INTERVAL_S)
            server.start()
            wait_for(lambda: heartbeat.loop_ticked_at is not None, "the consumer reconnected")
    finally:
        server.stop()
