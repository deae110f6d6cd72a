"""Protobuf at the edge: conversions between ``emili.trainer.v1`` messages and the trainer's types."""

from __future__ import annotations

import json

from emili.trainer.v1 import trainer_pb2
from emili_core.errors import InvalidInput
from emili_trainer.engine import EvaluationRequest, ModelVersion, TrainingRequest
from emili_trainer.evaluation.job import Report
from emili_trainer.recipes import Recipe
from emili_trainer.runs import RunRecord, RunState

_STATES = {
    RunState.QUEUED: trainer_pb2.RUN_STATE_QUEUED,
    RunState.RUNNING: trainer_pb2.RUN_STATE_RUNNING,
    RunState.SUCCEEDED: trainer_pb2.RUN_STATE_SUCCEEDED,
    RunState.FAILED: trainer_pb2.RUN_STATE_FAILED,
    RunState.CANCELLED: trainer_pb2.RUN_STATE_CANCELLED,
}


def training_request_from_pb(request: trainer_pb2.StartTrainingRequest) -> TrainingRequest:
    return TrainingRequest(
        recipe=request.recipe,
        recipe_yaml=request.recipe_yaml,
        dataset_id=request.dataset_id,
        init_version=request.init_version or None,
    )


def evaluation_request_from_pb(request: trainer_pb2.StartEvaluationRequest) -> EvaluationRequest:
    try:
        delta_table = json.loads(request.delta_table_json) if request.delta_table_json else None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"delta_table_json is not JSON: {exc}") from exc
    return EvaluationRequest(
        model_versions=tuple(request.model_versions),
        max_examples=request.max_examples or None,  # 0 (unset) means the server's default.
        session_ids=tuple(request.session_ids),
        rating_session_ids=tuple(request.rating_session_ids) or None,  # Empty means every recorded session.
        delta_table=delta_table,
    )


def run_to_pb(record: RunRecord) -> trainer_pb2.Run:
    run = trainer_pb2.Run(
        run_id=record.run_id,
        kind=record.kind,
        state=_STATES[record.state],
        recipe=record.recipe_source or "",
        dataset_id=record.dataset_id or "",
        init_version=record.init_version or "",
        step=record.step,
        total_steps=record.total,
        model_version=record.model_version or "",
        error=record.error or "",
        attempts=record.attempts,
        resumed_from_step=record.resumed_from_step,
        metrics_json=json.dumps(dict(record.metrics or {})),
        created_ms=record.created_ms,
        updated_ms=record.updated_ms,
        report_prefix=record.report_prefix or "",
    )
    if record.loss is not None:
        run.loss = record.loss
    if record.learning_rate is not None:
        run.learning_rate = record.learning_rate
    if record.tokens_per_second is not None:
        run.tokens_per_second = record.tokens_per_second
    return run


def model_to_pb(model: ModelVersion) -> trainer_pb2.Model:
    return trainer_pb2.Model(
        version=model.version,
        kind=model.kind,
        base_model=model.base_model,
        dataset_id=model.dataset_id,
        init_version=model.init_version or "",
        metrics_json=json.dumps(None if model.metrics is None else dict(model.metrics)),
        adapter_prefix=model.adapter_prefix,
        dataset_ids=model.dataset_ids,
        session_ids=model.session_ids,
        parent_versions=model.parent_versions,
        withdrawn_session_ids=model.withdrawn_session_ids,
        retired=model.retired,
        gate_verdict_json="" if model.gate_verdict is None else json.dumps(dict(model.gate_verdict)),
    )


def report_to_pb(report: Report) -> trainer_pb2.GetReportResponse:
    return trainer_pb2.GetReportResponse(
        markdown=report.markdown, report_json=json.dumps(report.report), plot_keys=report.plot_keys
    )


def recipe_to_pb(name: str, text: str, recipe: Recipe) -> trainer_pb2.GetRecipeResponse:
    """A shipped recipe: its text as shipped, and the values a client reads without parsing it."""
    return trainer_pb2.GetRecipeResponse(name=name, yaml=text, kind=recipe.kind, epochs=recipe.train.epochs)
