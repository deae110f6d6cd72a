"""gRPC adapter for ``emili.trainer.v1.TrainerService``: converts messages and calls the engine, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from emili.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from emili_trainer import codec
from emili_trainer.engine import TrainerEngine


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, engine: TrainerEngine) -> None:
        self.engine = engine

    async def StartTraining(
        self, request: trainer_pb2.StartTrainingRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.StartTrainingResponse:
        started = await self.engine.start_training(codec.training_request_from_pb(request))
        return trainer_pb2.StartTrainingResponse(run=codec.run_to_pb(started.run), enqueued=started.enqueued)

    async def StartEvaluation(
        self, request: trainer_pb2.StartEvaluationRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.StartEvaluationResponse:
        started = await self.engine.start_evaluation(codec.evaluation_request_from_pb(request))
        return trainer_pb2.StartEvaluationResponse(run=codec.run_to_pb(started.run), enqueued=started.enqueued)

    async def GetRun(
        self, request: trainer_pb2.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.GetRunResponse:
        return trainer_pb2.GetRunResponse(run=codec.run_to_pb(await self.engine.get_run(request.run_id)))

    async def WatchRun(
        self, request: trainer_pb2.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[trainer_pb2.WatchRunResponse]:
        async for record in self.engine.watch_run(request.run_id):
            yield trainer_pb2.WatchRunResponse(run=codec.run_to_pb(record))

    async def CancelRun(
        self, request: trainer_pb2.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.CancelRunResponse:
        return trainer_pb2.CancelRunResponse(run=codec.run_to_pb(await self.engine.cancel_run(request.run_id)))

    async def ListModels(
        self, request: trainer_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ListModelsResponse:
        models = await self.engine.list_models()
        return trainer_pb2.ListModelsResponse(models=[codec.model_to_pb(m) for m in models])

    async def GetModel(
        self, request: trainer_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.GetModelResponse:
        return trainer_pb2.GetModelResponse(model=codec.model_to_pb(await self.engine.get_model(request.version)))

    async def GetReport(
        self, request: trainer_pb2.GetReportRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.GetReportResponse:
        return codec.report_to_pb(await self.engine.get_report(request.run_id))

    async def GetRecipe(
        self, request: trainer_pb2.GetRecipeRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.GetRecipeResponse:
        shipped = await self.engine.get_recipe(request.name)
        return codec.recipe_to_pb(shipped.name, shipped.text, shipped.recipe)

    async def GetUnmeasurable(
        self, request: trainer_pb2.GetUnmeasurableRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.GetUnmeasurableResponse:
        return trainer_pb2.GetUnmeasurableResponse(reasons=await self.engine.unmeasurable_gate_metrics())
