"""Celery tasks on the ``labeler`` queue: thin wrappers around ``emili_labeler.jobs``.

Each is idempotent: labels are keyed by session id plus a hash of the label settings, and datasets by
their content, so a retried or redelivered task finds or rewrites the same objects.
"""

from __future__ import annotations

import functools
from typing import Any

from emili_core.settings import load_settings
from emili_core.tasks import idempotent_task, task_progress
from emili_labeler import jobs
from emili_labeler.datasets import DEFAULT_CUT_REPLIES, DEFAULT_PAIR_SELECTION, DEFAULT_PAIRS_PER_CONTEXT
from emili_labeler.runtime import build_runtime
from emili_labeler.settings import LabelerSettings


@functools.cache
def runtime() -> jobs.Runtime:
    return build_runtime(load_settings(LabelerSettings))


@idempotent_task("labeler.label_session")
def label_session(self: Any, session_id: str) -> dict[str, Any]:
    return jobs.label_session(runtime(), session_id)


@idempotent_task("labeler.label_all_unlabeled")
def label_all_unlabeled(self: Any) -> dict[str, Any]:
    return jobs.label_all_unlabeled(runtime(), task_progress(self))


@idempotent_task("labeler.build_sft_dataset")
def build_sft_dataset(
    self: Any,
    session_ids: list[str] | None = None,
    source: str = "sessions",
    split: str | None = None,
    delta_share: float = 1.0,
    cut_replies: str = DEFAULT_CUT_REPLIES,
) -> dict[str, Any]:
    return jobs.build_sft_dataset(runtime(), session_ids, source, split, delta_share, cut_replies)


@idempotent_task("labeler.build_dpo_dataset")
def build_dpo_dataset(
    self: Any,
    source: str = "feedback",
    session_ids: list[str] | None = None,
    epoch: int = 0,
    seed: int = 0,
    split: str | None = None,  # EmpatheticDialogues: train when the folder has it, else valid (the manifest says).
    epochs: int = 1,
    max_pairs_per_context: int = DEFAULT_PAIRS_PER_CONTEXT,
    selection: str = DEFAULT_PAIR_SELECTION,
    margin_share: float = 1.0,
    cut_replies: str = DEFAULT_CUT_REPLIES,
) -> dict[str, Any]:
    return jobs.build_dpo_dataset(
        runtime(),
        source,
        session_ids,
        epoch,
        seed,
        split,
        epochs,
        max_pairs_per_context,
        selection,
        margin_share,
        cut_replies,
    )


@idempotent_task("labeler.fit_user_weights")
def fit_user_weights(self: Any, session_ids: list[str] | None = None) -> dict[str, Any]:
    return jobs.fit_user_weights(runtime(), session_ids)


@idempotent_task("labeler.delta_table")
def delta_table(self: Any, session_ids: list[str] | None = None, pool_synthetic: bool = False) -> dict[str, Any]:
    return jobs.delta_table(runtime(), session_ids, pool_synthetic)


@idempotent_task("labeler.forget_sessions")
def forget_sessions(
    self: Any,
    session_ids: list[str],
    user_ids: list[str] | None = None,
    requested_by: str = "",
    reason: str = "",
) -> dict[str, Any]:
    return jobs.forget_sessions(runtime(), session_ids, user_ids or [], requested_by, reason)


@idempotent_task("labeler.pipeline_label")
def pipeline_label(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    from emili_labeler import pipeline_steps as steps
    from emili_pipeline.pipeline import run_step_task

    rt = runtime()
    return run_step_task(self, rt.store, state, "label", lambda s: steps.label(rt, s))


@idempotent_task("labeler.pipeline_datasets")
def pipeline_datasets(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    from emili_labeler import pipeline_steps as steps
    from emili_pipeline.pipeline import run_step_task

    rt = runtime()
    return run_step_task(self, rt.store, state, "datasets", lambda s: steps.datasets(rt, s))


@idempotent_task("labeler.pipeline_delta_table")
def pipeline_delta_table(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    from emili_labeler import pipeline_steps as steps
    from emili_pipeline.pipeline import run_step_task

    rt = runtime()
    return run_step_task(self, rt.store, state, "delta_table", lambda s: steps.delta_table(rt, s))
