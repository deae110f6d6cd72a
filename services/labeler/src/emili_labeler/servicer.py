"""gRPC adapter for ``emili.labeler.v1.LabelerService``: converts messages and calls the engine, nothing else."""

from __future__ import annotations

import grpc

from emili.labeler.v1 import labeler_pb2, labeler_pb2_grpc
from emili_labeler import codec
from emili_labeler.engine import LabelerEngine


class LabelerServicer(labeler_pb2_grpc.LabelerServiceServicer):
    def __init__(self, engine: LabelerEngine) -> None:
        self.engine = engine

    async def ScoreTexts(
        self, request: labeler_pb2.ScoreTextsRequest, context: grpc.aio.ServicerContext
    ) -> labeler_pb2.ScoreTextsResponse:
        return codec.text_scores_to_pb(await self.engine.score_texts(codec.texts_from_pb(request)))

    async def LabelSession(
        self, request: labeler_pb2.LabelSessionRequest, context: grpc.aio.ServicerContext
    ) -> labeler_pb2.LabelSessionResponse:
        label = await self.engine.label_session(request.session_id)
        return labeler_pb2.LabelSessionResponse(label=codec.session_label_to_pb(label))

    async def GetDataset(
        self, request: labeler_pb2.GetDatasetRequest, context: grpc.aio.ServicerContext
    ) -> labeler_pb2.GetDatasetResponse:
        dataset = await self.engine.get_dataset(request.dataset_id)
        return labeler_pb2.GetDatasetResponse(manifest=codec.dataset_to_pb(dataset))
