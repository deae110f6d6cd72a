"""``emili loop run`` as real processes against real Redis and S3: two of them never both act, and a killed one's
successor (or a restarted one) carries on without starting a second pipeline.

The pipeline is really submitted (its Celery chain goes to the broker) but no worker takes it, so the loop stays in
its training phase: what is checked is the scheduling, not training (the pipeline tests cover that)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import REPO_ROOT
from emili_pipeline.loop import STATE_KEY, LoopState
from emili_pipeline.loop_cli import LEASE_KEY
from emili_testing.plugin import Stack, free_port
from emili_testing.records import record_ended_session

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PREFIX = "loop-proc-"  # Buckets of this test's own: the loop looks at every recorded session.


class LoopProcess:
    def __init__(self, name: str, env: dict[str, str], folder: Path) -> None:
        self.log = folder / f"{name}.log"
        self.metrics_port = free_port()
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "emili"), "loop", "run"],
            env={**env, "EMILI_LOOP_METRICS_PORT": str(self.metrics_port)},
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def owner_prefix(self) -> str:
        return f":{self.process.pid}:"

    def signal(self, signum: int) -> int:
        os.killpg(self.process.pid, signum)
        return self.process.wait(20)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of the process's /metrics (None when absent or not served yet)."""
        try:
            page = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        for family in text_string_to_metric_families(page):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return None


def wait_for(what: str, check: Callable[[], bool], processes: list[LoopProcess], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    logs = "\n".join(p.text()[-2000:] for p in processes)
    raise AssertionError(f"never: {what}\n{logs}")


@pytest.fixture
def processes() -> Iterator[list[LoopProcess]]:
    started: list[LoopProcess] = []
    yield started
    for p in started:
        if p.process.poll() is None:
            p.signal(signal.SIGKILL)


def test_one_instance_acts_and_a_restart_starts_no_second_pipeline(
    stack: Stack, isolated_redis_url: str, tmp_path: Path, processes: list[LoopProcess]
) -> None:
    store = ObjectStore(stack.s3.model_copy(update={"bucket_prefix": PREFIX}))
    store.ensure_buckets()
    for session_id in ("loop-s1", "loop-s2", "loop-s3"):
        record_ended_session(store, session_id)
    policy = tmp_path / "policy.yaml"
    # Small, its recipes files: the trainer is never asked for one.
    pipeline = REPO_ROOT / "libs" / "pipeline" / "configs" / "ci.yaml"
    policy.write_text(f"loop:\n  enabled: true\n  interval_s: 0.5\n  min_new_sessions: 3\n  pipeline: {pipeline}\n")
    env = {
        **os.environ,
        **stack.env(),
        "EMILI_REDIS_URL": isolated_redis_url,
        "EMILI_S3__BUCKET_PREFIX": PREFIX,
        "EMILI_LOOP_POLICY": str(policy),
        "EMILI_LOG_LEVEL": "INFO",
    }
    broker = redis.Redis.from_url(isolated_redis_url)

    def holder() -> str:
        raw = broker.get(LEASE_KEY)
        return raw.decode() if raw else ""

    def state() -> LoopState:
        try:
            return LoopState.model_validate(store.get_json(Bucket.MODELS, STATE_KEY))
        except Exception:
            return LoopState()

    def pipelines() -> list[str]:
        return [k for k in store.list_keys(Bucket.MODELS, "pipelines/") if k.endswith("/state.json")]

    first, second = LoopProcess("first", env, tmp_path), LoopProcess("second", env, tmp_path)
    processes += [first, second]
    wait_for("a pipeline started", lambda: state().pipeline_id is not None, processes)
    acting, waiting = (first, second) if first.owner_prefix in holder() else (second, first)
    assert waiting.owner_prefix not in holder()
    wait_for(
        "the other instance saw the lease taken",
        lambda: "another instance holds the lease" in waiting.text(),
        processes,
    )
    time.sleep(2)  # Several ticks of both.
    assert broker.llen("chat") == 1 and len(pipelines()) == 1  # One chain sent, one pipeline stored.
    # Each says so in its metrics: one acts (in the training phase), the other stands by.
    assert (acting.metric("emili_loop_ticks_total", outcome="acted") or 0) >= 2
    assert acting.metric("emili_loop_holds_lease") == 1 and acting.metric("emili_loop_phase", phase="training") == 1
    assert acting.metric("emili_loop_events_total", event="pipeline started") == 1
    assert (waiting.metric("emili_loop_ticks_total", outcome="standby") or 0) >= 2
    assert waiting.metric("emili_loop_holds_lease") == 0
    # Only acting ticks count as the loop's progress (the stall alert): a standby instance's would hide a stuck one.
    acted = acting.metric("emili_loop_last_tick_timestamp_seconds") or 0
    assert acted > time.time() - 30
    # (The standby may have acted once in a lease handover on a loaded machine: never since the acting one did.)
    assert (waiting.metric("emili_loop_last_tick_timestamp_seconds") or 0) <= acted

    # The acting process dies without a word: the other takes over once the lease lapses (3 intervals).
    assert acting.signal(signal.SIGKILL) == -signal.SIGKILL
    wait_for("the waiting instance took over", lambda: waiting.owner_prefix in holder(), processes, 20)
    restarted = LoopProcess("restarted", env, tmp_path)
    processes.append(restarted)
    time.sleep(2)
    # A stopped instance gives the lease up at once, and the restarted one carries on in the same round.
    assert waiting.signal(signal.SIGTERM) == 0
    wait_for("the restarted instance took over", lambda: restarted.owner_prefix in holder(), processes, 30)
    time.sleep(2)

    final = state()
    assert final.phase == "training" and final.sessions == ["loop-s1", "loop-s2", "loop-s3"]
    assert [h["event"] for h in final.history] == ["enough new sessions", "pipeline started"]
    assert broker.llen("chat") == 1 and len(pipelines()) == 1
    assert restarted.signal(signal.SIGTERM) == 0 and holder() == ""
