"""``emili-<service>-worker --live`` against a real worker process: it passes while the worker runs, fails once the
worker is frozen (SIGSTOP: nothing in it runs, as in a deadlock), and never touches Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from emili_testing.plugin import EntryPointProcess, Stack, free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def live(env: dict[str, str]) -> int:
    return subprocess.run(
        [str(BIN / "emili-chat-worker"), "--live"], env=env, timeout=60, capture_output=True
    ).returncode


def wait_for(check: Callable[[], bool], what: str, worker: EntryPointProcess, patience_s: float = 90.0) -> None:
    deadline = time.monotonic() + patience_s
    while not check():
        assert worker.alive(), worker.tail()
        assert time.monotonic() < deadline, f"{what}: not within {patience_s} s\n{worker.tail()}"
        time.sleep(0.5)


def test_live_probe_fails_for_a_frozen_worker(stack: Stack, isolated_redis_url: str, tmp_path: Path) -> None:
    metrics_port = free_port()
    env = {
        **os.environ,
        **stack.env(),
        "EMILI_REDIS_URL": isolated_redis_url,  # A database of its own: no other worker holds the queue lease.
        "EMILI_CHAT__WORKER__METRICS_PORT": str(metrics_port),
        "EMILI_CHAT__WORKER__HEARTBEAT_FILE": str(tmp_path / "chat.heartbeat"),
        "EMILI_CHAT__WORKER__HEARTBEAT_INTERVAL_S": "0.5",
        "EMILI_CHAT__WORKER__LIVENESS_MAX_AGE_S": "3",
    }
    worker = EntryPointProcess("emili-chat-worker", env, tmp_path / "worker.log")
    try:
        wait_for(lambda: "ready" in worker.tail(100_000), "worker start", worker)
        assert live(env) == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            exported = response.read().decode()
        assert 'emili_worker_heartbeat_timestamp_seconds{service="chat"}' in exported
        assert 'emili_queue_depth{queue="chat"} 0.0' in exported  # The only worker: it exports the queues.
        os.killpg(worker.process.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 60
            while live(env) == 0:
                assert time.monotonic() < deadline, "a frozen worker still passed --live"
                time.sleep(0.5)
        finally:
            os.killpg(worker.process.pid, signal.SIGCONT)
        wait_for(lambda: live(env) == 0, "live again once it runs", worker)
        probe_without_redis = {**env, "EMILI_REDIS_URL": "redis://127.0.0.1:1/0"}
        assert live(probe_without_redis) == 0  # The probe reads the heartbeat only.
    finally:
        worker.stop()
