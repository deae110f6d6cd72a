"""The trainer's metrics: no run ids as labels, the run in progress reported unlabelled, finished runs silent."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import get_args

import pytest
import redis
from prometheus_client import REGISTRY, CollectorRegistry

from emili_core.objectstore import ObjectStore
from emili_core.tasks import Heartbeat
from emili_trainer.metrics import RUN_KINDS, TrainingMetrics
from emili_trainer.runs import RunKind, RunState, RunStore
from emili_trainer.training import Progress

RUN_GAUGES = ("run_progress_ratio", "run_step", "run_loss", "run_tokens_per_second")


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(f"emili_trainer_{name}", labels)


def test_run_kinds_are_the_record_kinds() -> None:
    assert set(RUN_KINDS) == set(get_args(RunKind))


def test_the_run_in_progress_is_reported_without_its_id_and_stops_when_it_ends() -> None:
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    run_id = f"sft-{uuid.uuid4().hex[:16]}"
    assert value(registry, "active_runs") == 0 and value(registry, "run_step") is None
    metrics.started(run_id)
    metrics.observe(run_id, Progress(step=3, total_steps=12, epoch=0.5, loss=1.25, tokens_per_second=900.0))
    assert value(registry, "active_runs") == 1
    assert (value(registry, "run_step"), value(registry, "run_progress_ratio")) == (3, 3 / 12)
    assert (value(registry, "run_loss"), value(registry, "run_tokens_per_second")) == (1.25, 900.0)
    labels = {key for metric in registry.collect() for sample in metric.samples for key in sample.labels}
    assert labels <= {"kind", "outcome"}, "no run ids (or other unbounded values) as labels"

    metrics.ended(run_id, "succeeded")
    metrics.observe(run_id, Progress(step=12, total_steps=12, epoch=1.0, loss=0.5))  # Late: ignored.
    assert value(registry, "active_runs") == 0
    assert all(value(registry, name) is None for name in RUN_GAUGES)
    assert value(registry, "runs_total", kind="sft", outcome="succeeded") == 1


def test_a_run_left_for_a_retry_is_not_counted_as_ended() -> None:
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    metrics.started("dpo-0123456789abcdef")
    metrics.left("dpo-0123456789abcdef")
    assert value(registry, "active_runs") == 0 and value(registry, "run_step") is None
    assert value(registry, "runs_total", kind="dpo", outcome="failed") is None


@pytest.mark.integration
def test_run_store_state_changes_drive_the_metrics(isolated_redis_url: str, object_store: ObjectStore) -> None:
    runs = RunStore(redis.Redis.from_url(isolated_redis_url), object_store)
    run_id = f"eval-{uuid.uuid4().hex[:16]}"
    failed_before = REGISTRY.get_sample_value("emili_trainer_runs_total", {"kind": "eval", "outcome": "failed"}) or 0
    active_before = REGISTRY.get_sample_value("emili_trainer_active_runs") or 0
    with runs.lock(run_id):
        runs.update(run_id, state=RunState.RUNNING)
        assert REGISTRY.get_sample_value("emili_trainer_active_runs") == active_before + 1
        runs.update(run_id, state=RunState.FAILED, error="boom")
    assert REGISTRY.get_sample_value("emili_trainer_active_runs") == active_before
    failed = REGISTRY.get_sample_value("emili_trainer_runs_total", {"kind": "eval", "outcome": "failed"})
    assert failed == failed_before + 1


def test_the_live_probe_does_not_import_torch(tmp_path: Path) -> None:
    heartbeat = tmp_path / "hb"
    Heartbeat("trainer", heartbeat, 10.0).beat()
    code = (
        "import sys\n"
        "sys.argv = ['emili-trainer-worker', '--live']\n"
        "from emili_trainer.worker import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    status = exc.code\n"
        "print(status, 'torch' in sys.modules)\n"
    )
    env = {"EMILI_ENV": "test", "EMILI_TRAINER__WORKER__HEARTBEAT_FILE": str(heartbeat), "PATH": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["0", "False"], done.stderr[-2000:]
