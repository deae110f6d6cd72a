"""Celery tasks on the ``trainer`` queue: thin wrappers around ``emili_trainer.jobs`` and ``evaluation``.

Runs are keyed by content and guarded by a run lock, so a redelivered or duplicated message resumes the run
from its last checkpoint or finds it finished; it never trains it twice at once.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import current_app

from emili_core.settings import load_settings
from emili_core.tasks import idempotent_task
from emili_trainer import jobs
from emili_trainer.metrics import TRAINING
from emili_trainer.runs import RunState
from emili_trainer.settings import TrainerSettings
from emili_trainer.training import Progress


@functools.cache
def runtime() -> jobs.Runtime:
    return jobs.build_runtime(load_settings(TrainerSettings))


def _reporter(task: Any, run_id: str) -> jobs.ProgressSink:
    # The run is named at once, before its first step or batch (loading a model can take minutes): `emili pipeline
    # cancel` finds it in this meta.
    task.update_state(state="PROGRESS", meta={"run_id": run_id})

    def report(progress: Progress) -> None:
        TRAINING.observe(run_id, progress)
        task.update_state(state="PROGRESS", meta={"run_id": run_id, **progress.to_dict()})

    return report


@idempotent_task("trainer.train")
def train(self: Any, run_id: str) -> dict[str, Any]:
    return jobs.execute_run(runtime(), run_id, _reporter(self, run_id)).to_json()


@idempotent_task("trainer.evaluate")
def evaluate(self: Any, run_id: str, delta_table: dict[str, Any] | None = None) -> dict[str, Any]:
    from emili_trainer.evaluation import job

    return job.execute_evaluation(runtime(), run_id, delta_table, _reporter(self, run_id)).to_json()


def enqueue_orphans() -> list[str]:
    """Re-enqueue runs left "running" by a dead worker, so they resume now rather than when the broker's
    (hours-long) visibility timeout hands their message back. Each copy waits out the lock's time to live, by
    which time a dead worker's lock has expired; a copy that finds the run busy (its worker is alive) or done
    does nothing."""
    rt = runtime()
    orphans = [run_id for run_id in rt.runs.list_ids() if rt.runs.get(run_id).state == RunState.RUNNING]
    delay = rt.settings.trainer.lock_ttl_seconds + 1
    for run_id in orphans:
        task = "trainer.evaluate" if run_id.startswith("eval-") else "trainer.train"
        current_app.send_task(task, args=[run_id], countdown=delay)
    return orphans


# --- pipeline steps (pipeline_steps): train or evaluate here, inline, so the chain goes on when the run ends ---


@idempotent_task("trainer.pipeline_sft")
def pipeline_sft(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    from emili_pipeline.pipeline import run_step_task
    from emili_trainer import pipeline_steps as steps

    rt = runtime()
    return run_step_task(
        self, rt.store, state, "sft", lambda s: steps.train(rt, s, "sft", lambda run_id: _reporter(self, run_id))
    )


@idempotent_task("trainer.pipeline_dpo")
def pipeline_dpo(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    from emili_pipeline.pipeline import run_step_task
    from emili_trainer import pipeline_steps as steps

    rt = runtime()
    return run_step_task(
        self, rt.store, state, "dpo", lambda s: steps.train(rt, s, "dpo", lambda run_id: _reporter(self, run_id))
    )


@idempotent_task("trainer.pipeline_evaluate")
def pipeline_evaluate(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    from emili_pipeline.pipeline import run_step_task
    from emili_trainer import pipeline_steps as steps

    rt = runtime()
    return run_step_task(
        self, rt.store, state, "evaluate", lambda s: steps.evaluate(rt, s, lambda run_id: _reporter(self, run_id))
    )
