"""The pipeline steps the trainer worker runs (``trainer.pipeline_sft``, ``_dpo``, ``_evaluate``).

Each is a plain function of this service's runtime and the pipeline state returning the step's outputs (small
JSON); :mod:`emili_trainer.tasks` runs them through :func:`emili_pipeline.pipeline.run_step_task`. A step trains
or evaluates inline, so the chain goes on when the run ends; runs are keyed by a digest of their inputs, so a
step run again finds, resumes or waits for the same run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from emili_core.errors import FailedPrecondition, InvalidInput
from emili_pipeline.pipeline import State, candidate_version, config_of, evaluated_arms, outputs
from emili_trainer.jobs import ProgressSink, Runtime, execute_run, start_training
from emili_trainer.recipes import Recipe, load_recipe, parse_recipe
from emili_trainer.runs import RunRecord, RunState

log = logging.getLogger(__name__)
WAIT_FOR_LOCK_S = 5.0  # Another copy of a run holds its lock (a dead worker's lock expires within its TTL).


def pipeline_recipe(value: str) -> tuple[Recipe, str]:
    """The recipe a pipeline config names, and the source recorded on the run. A resolved config carries the
    recipe's text (``emili_pipeline.config.resolve``); a shipped recipe's name is still accepted."""
    if "\n" in value:
        recipe = parse_recipe(value, "pipeline config")
        return recipe, f"pipeline:{recipe.name}"
    return load_recipe(value), value


def _until_final(execute: Callable[[], RunRecord]) -> RunRecord:
    while True:
        record = execute()
        if record.final:
            return record
        log.info("%s", record.note or f"run {record.run_id} is {record.state}; waiting")
        time.sleep(WAIT_FOR_LOCK_S)


def train(runtime: Runtime, state: State, kind: str, progress: Callable[[str], ProgressSink]) -> dict[str, Any]:
    """Start (or find) the content-keyed run and run or resume it here; ``progress(run_id)`` reports steps."""
    config = config_of(state)
    dataset = (outputs(state, "datasets").get(kind) or {}).get("id")
    if not dataset:
        return {"skipped": f"no {kind.upper()} dataset (see the datasets step's notes)"}
    recipe, source = pipeline_recipe(config.recipes.sft if kind == "sft" else config.recipes.dpo)
    if recipe.kind != kind:
        raise InvalidInput(f"the pipeline's {kind} recipe {recipe.name} is a {recipe.kind} recipe")
    init = outputs(state, "sft").get("model_version") if kind == "dpo" else None
    record, _ = start_training(runtime, recipe, dataset, init_version=init, recipe_source=source)
    run_id = record.run_id
    final = _until_final(lambda: execute_run(runtime, run_id, progress(run_id)))
    if final.state != RunState.SUCCEEDED:
        raise FailedPrecondition(f"{kind} run {run_id} {final.state}: {final.error or ''}")
    metrics = final.metrics or {}
    return {
        "run_id": run_id,
        "model_version": final.model_version,
        "dataset_id": dataset,
        "init_version": init,
        "recipe": recipe.name,
        "attempts": final.attempts,
        "resumed_from_step": final.resumed_from_step,
        "metrics": {
            k: metrics.get(k) for k in ("train_loss", "steps", "examples", "tokens_per_second", "wall_seconds")
        },
    }


def gate_outputs(report: dict[str, Any] | None, candidate: str | None, baseline: str) -> dict[str, Any]:
    """The evaluate step's part for the loop's gate: ``gate_evidence`` (``emili_pipeline.gate``'s JSON form),
    ``gate_evidence_missing`` ({metric: why}), ``candidate`` and ``baseline``. A report without a gate part
    (a run from before it existed) gives no evidence, and says so."""
    from emili_trainer.evaluation.gate_evidence import OFFLINE_METRICS, ONLINE_METRICS

    gate = (report or {}).get("gate")
    if not isinstance(gate, dict):
        why = "the evaluation report holds no gate evidence (run before the pipeline asked for it)"
        missing = dict.fromkeys((*OFFLINE_METRICS, *ONLINE_METRICS), why)
        return {"gate_evidence": {}, "gate_evidence_missing": missing, "candidate": candidate, "baseline": baseline}
    return {
        "gate_evidence": dict(gate.get("evidence") or {}),
        "gate_evidence_missing": dict(gate.get("missing") or {}),
        "gate_evidence_origins": dict(gate.get("origins") or {}),
        "candidate": gate.get("candidate"),
        "baseline": gate.get("baseline"),
    }


def evaluate(runtime: Runtime, state: State, progress: Callable[[str], ProgressSink]) -> dict[str, Any]:
    """Base vs SFT vs SFT+DPO (and the production baseline) on the held-out sessions' contexts, with Tables 1
    and 2 and the gate's evidence for the candidate against the baseline; the report is published under the
    evaluation run."""
    # The evaluation stack (lm-eval, sacrebleu, plots) loads only in the step that uses it.
    from emili_trainer.evaluation.job import execute_evaluation, load_report, report_prefix, start_evaluation

    config = config_of(state)
    versions = [v for label, v in evaluated_arms(state).items() if label != "base"]
    arms = outputs(state, "arm_sessions").get("arms") or {}
    rated = [s for ids in arms.values() for s in ids] or state["sessions"]
    table = outputs(state, "delta_table").get("table")
    candidate = candidate_version(state)
    gate = {
        "candidate": candidate,
        "baseline": config.baseline,
        "online": outputs(state, "delta_table").get("gate_items"),
    }
    record, _ = start_evaluation(
        runtime,
        versions,
        max_examples=config.evaluation.max_examples,
        session_ids=state["heldout_sessions"] or state["sessions"],
        rating_session_ids=rated,
        delta_table=table,
        gate=gate,
    )
    run_id = record.run_id
    final = _until_final(lambda: execute_evaluation(runtime, run_id, table, progress(run_id)))
    if final.state != RunState.SUCCEEDED:
        raise FailedPrecondition(f"evaluation {run_id} {final.state}: {final.error or ''}")
    return {
        "run_id": run_id,
        "report_prefix": report_prefix(run_id),
        "arms": evaluated_arms(state),
        "metrics": None if final.metrics is None else dict(final.metrics),
        **gate_outputs(load_report(runtime, run_id).report, candidate, config.baseline),
    }
