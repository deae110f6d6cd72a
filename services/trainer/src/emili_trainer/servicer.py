"""gRPC adapter for ``emili.trainer.v1.TrainerService``: converts messages and calls the jobs, nothing else."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from emili.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from emili_core.errors import InvalidInput
from emili_trainer import jobs
from emili_trainer.evaluation import job as evaluation
from emili_trainer.recipes import load_recipe, parse_recipe
from emili_trainer.runs import FINAL_STATES

_STATES = {
    "queued": trainer_pb2.RUN_STATE_QUEUED,
    "running": trainer_pb2.RUN_STATE_RUNNING,
    "succeeded": trainer_pb2.RUN_STATE_SUCCEEDED,
    "failed": trainer_pb2.RUN_STATE_FAILED,
    "cancelled": trainer_pb2.RUN_STATE_CANCELLED,
}
Enqueue = Callable[[str, str], None]  # (task name, run id)


def run_message(record: dict[str, Any]) -> trainer_pb2.Run:
    run = trainer_pb2.Run(
        run_id=record["run_id"],
        kind=record.get("kind", ""),
        state=_STATES.get(record.get("state", ""), trainer_pb2.RUN_STATE_UNSPECIFIED),
        recipe=record.get("recipe_source") or "",
        dataset_id=record.get("dataset_id") or "",
        init_version=record.get("init_version") or "",
        step=int(record.get("step") or 0),
        total_steps=int(record.get("total") or 0),
        model_version=record.get("model_version") or "",
        error=record.get("error") or "",
        attempts=int(record.get("attempts") or 0),
        resumed_from_step=int(record.get("resumed_from_step") or 0),
        metrics_json=json.dumps(record.get("metrics") or {}),
        created_ms=int(record.get("created_ms") or 0),
        updated_ms=int(record.get("updated_ms") or 0),
        report_prefix=record.get("report_prefix") or "",
    )
    for field in ("loss", "learning_rate", "tokens_per_second"):
        if record.get(field) is not None:
            setattr(run, field, float(record[field]))
    return run


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, runtime: Callable[[], jobs.Runtime], enqueue: Enqueue, poll_seconds: float = 1.0) -> None:
        self._runtime = runtime
        self._enqueue = enqueue
        self.poll_seconds = poll_seconds

    @property
    def runtime(self) -> jobs.Runtime:
        return self._runtime()

    async def StartTraining(
        self, request: trainer_pb2.StartTrainingRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.StartTrainingResponse:
        if bool(request.recipe) == bool(request.recipe_yaml):
            raise InvalidInput("give exactly one of recipe (a shipped recipe's name) and recipe_yaml")
        if not request.dataset_id:
            raise InvalidInput("dataset_id is required: a dataset version built by the labeler")
        recipe = load_recipe(request.recipe) if request.recipe else parse_recipe(request.recipe_yaml, "recipe_yaml")
        record, enqueue = await asyncio.to_thread(
            jobs.start_training,
            self.runtime,
            recipe,
            request.dataset_id,
            request.init_version or None,
            request.recipe or "recipe_yaml",
        )
        if enqueue:
            self._enqueue("trainer.train", record["run_id"])
        return trainer_pb2.StartTrainingResponse(run=run_message(record), enqueued=enqueue)

    async def StartEvaluation(
        self, request: trainer_pb2.StartEvaluationRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.StartEvaluationResponse:
        try:
            delta_table = json.loads(request.delta_table_json) if request.delta_table_json else None
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"delta_table_json is not JSON: {exc}") from exc
        record, enqueue = await asyncio.to_thread(
            evaluation.start_evaluation,
            self.runtime,
            list(request.model_versions),
            max_examples=request.max_examples or None,
            session_ids=list(request.session_ids),
            rating_session_ids=list(request.rating_session_ids) or None,
            delta_table=delta_table,
        )
        if enqueue:
            self._enqueue("trainer.evaluate", record["run_id"])
        return trainer_pb2.StartEvaluationResponse(run=run_message(record), enqueued=enqueue)

    async def GetRun(
        self, request: trainer_pb2.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.GetRunResponse:
        return trainer_pb2.GetRunResponse(
            run=run_message(await asyncio.to_thread(self.runtime.runs.get, request.run_id))
        )

    async def WatchRun(
        self, request: trainer_pb2.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[trainer_pb2.WatchRunResponse]:
        last: dict[str, Any] | None = None
        while True:
            record = await asyncio.to_thread(self.runtime.runs.get, request.run_id)
            if record != last:
                yield trainer_pb2.WatchRunResponse(run=run_message(record))
                last = record
            if record.get("state") in FINAL_STATES:
                return
            await asyncio.sleep(self.poll_seconds)

    async def CancelRun(
        self, request: trainer_pb2.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.CancelRunResponse:
        return trainer_pb2.CancelRunResponse(
            run=run_message(await asyncio.to_thread(jobs.cancel_run, self.runtime, request.run_id))
        )

    async def ListModels(
        self, request: trainer_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ListModelsResponse:
        models = await asyncio.to_thread(jobs.list_models, self.runtime.store)
        return trainer_pb2.ListModelsResponse(
            models=[
                trainer_pb2.Model(
                    version=m["version"],
                    kind=m.get("kind", ""),
                    base_model=m.get("base_model", ""),
                    dataset_id=m.get("dataset_id", ""),
                    init_version=m.get("init_version") or "",
                    metrics_json=json.dumps(m.get("metrics", {})),
                    adapter_prefix=m["adapter_prefix"],
                )
                for m in models
            ]
        )

    async def GetReport(
        self, request: trainer_pb2.GetReportRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.GetReportResponse:
        report = await asyncio.to_thread(evaluation.load_report, self.runtime, request.run_id)
        return trainer_pb2.GetReportResponse(
            markdown=report["markdown"], report_json=json.dumps(report["report"]), plot_keys=report["plot_keys"]
        )
