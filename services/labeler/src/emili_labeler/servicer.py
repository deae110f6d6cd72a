"""gRPC adapter for ``emili.labeler.v1.LabelerService``: converts messages and calls the jobs, nothing else."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import grpc

from emili.labeler.v1 import labeler_pb2, labeler_pb2_grpc
from emili_core.errors import InvalidInput
from emili_core.records import dataset_manifest
from emili_labeler import jobs

_KINDS = {
    "sft": labeler_pb2.DATASET_KIND_SFT,
    "dpo_feedback": labeler_pb2.DATASET_KIND_DPO_FEEDBACK,
    "dpo_empathetic": labeler_pb2.DATASET_KIND_DPO_EMPATHETIC,
}


def _vad(values: dict[str, float] | None) -> labeler_pb2.Vad | None:
    return None if values is None else labeler_pb2.Vad(**values)


class LabelerServicer(labeler_pb2_grpc.LabelerServiceServicer):
    def __init__(self, runtime: Callable[[], jobs.Runtime]) -> None:
        self._runtime = runtime

    @property
    def runtime(self) -> jobs.Runtime:
        return self._runtime()

    async def ScoreTexts(
        self, request: labeler_pb2.ScoreTextsRequest, context: grpc.aio.ServicerContext
    ) -> labeler_pb2.ScoreTextsResponse:
        limit = self.runtime.settings.labeler.max_batch_texts
        if len(request.texts) > limit:
            raise InvalidInput(f"{len(request.texts)} texts in one request, over the limit of {limit}; split it")
        try:
            results = await asyncio.to_thread(self.runtime.scorer.score_batch, list(request.texts))
        except ValueError as exc:  # Over-long text, with a message naming the limit.
            raise InvalidInput(str(exc)) from exc
        response = labeler_pb2.ScoreTextsResponse(
            lexicon=self.runtime.scorer.lexicon.name, oov_method=self.runtime.settings.labeler.oov_method
        )
        for result in results:
            score = labeler_pb2.TextScore(coverage=result.coverage or 0.0, tokens=list(result.tokens))
            if result.vad is not None:
                score.vad.CopyFrom(labeler_pb2.Vad(**result.vad._asdict()))
            response.scores.append(score)
        return response

    async def LabelSession(
        self, request: labeler_pb2.LabelSessionRequest, context: grpc.aio.ServicerContext
    ) -> labeler_pb2.LabelSessionResponse:
        label: dict[str, Any] = await asyncio.to_thread(jobs.label_session, self.runtime, request.session_id)
        gold = label["gold"]
        message = labeler_pb2.SessionLabel(
            session_id=label["session_id"],
            user_id=label["user_id"],
            model_arm=label["model_arm"],
            lexicon=gold["lexicon"],
            settings_hash=label["settings_hash"],
            key=label["key"],
            turns=[
                labeler_pb2.TurnFlag(
                    turn_id=t["turn_id"] or "", flagged=t["flagged"], delta=t["delta"], reason=t["reason"]
                )
                for t in label["turns"]
            ],
        )
        for field in ("pre", "post", "delta"):
            vad = _vad(gold[field])
            if vad is not None:
                getattr(message, field).CopyFrom(vad)
        return labeler_pb2.LabelSessionResponse(label=message)

    async def GetDataset(
        self, request: labeler_pb2.GetDatasetRequest, context: grpc.aio.ServicerContext
    ) -> labeler_pb2.GetDatasetResponse:
        manifest = await asyncio.to_thread(dataset_manifest, self.runtime.store, request.dataset_id)
        return labeler_pb2.GetDatasetResponse(
            manifest=labeler_pb2.DatasetManifest(
                dataset_id=manifest["id"],
                kind=_KINDS[manifest["kind"]],
                content_hash=manifest["content_hash"],
                counts=manifest["counts"],
                source_sessions=manifest["source_sessions"],
                label_settings_json=json.dumps(manifest["label_settings"], sort_keys=True),
                key=manifest["key"],
            )
        )
