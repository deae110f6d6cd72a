"""gRPC adapter for ``emili.fer.v1.FerService``: converts messages and calls the engine, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from emili.fer.v1 import fer_pb2, fer_pb2_grpc
from emili_core.errors import EmiliError
from emili_fer.codec import error_to_pb, frame_from_pb, reading_to_pb
from emili_fer.engine import FerEngine

# In-flight frames per stream: enough to keep the pipeline busy, few enough to push back on a fast client.
STREAM_WINDOW = 8


class FerServicer(fer_pb2_grpc.FerServiceServicer):
    def __init__(self, engine: FerEngine) -> None:
        self.engine = engine

    async def Analyze(
        self, request: fer_pb2.AnalyzeRequest, context: grpc.aio.ServicerContext
    ) -> fer_pb2.AnalyzeResponse:
        reading = await self.engine.analyze(frame_from_pb(request.frame))
        return fer_pb2.AnalyzeResponse(reading=reading_to_pb(reading))

    async def AnalyzeBatch(
        self, request: fer_pb2.AnalyzeBatchRequest, context: grpc.aio.ServicerContext
    ) -> fer_pb2.AnalyzeBatchResponse:
        frames = []
        items: list[fer_pb2.BatchItem | None] = []
        for frame in request.frames:
            try:
                frames.append(frame_from_pb(frame))
                items.append(None)
            except EmiliError as exc:
                items.append(fer_pb2.BatchItem(error=error_to_pb(exc)))
        results = iter(await self.engine.analyze_many(frames))
        response = fer_pb2.AnalyzeBatchResponse()
        for item in items:
            if item is None:
                result = next(results)
                item = (
                    fer_pb2.BatchItem(error=error_to_pb(result))
                    if isinstance(result, EmiliError)
                    else fer_pb2.BatchItem(reading=reading_to_pb(result))
                )
            response.items.append(item)
        return response

    async def StreamAnalyze(
        self, request_iterator: AsyncIterator[fer_pb2.StreamAnalyzeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fer_pb2.StreamAnalyzeResponse]:
        """Frames are analysed concurrently (up to a window) and answered in arrival order."""
        pending: asyncio.Queue[asyncio.Task[fer_pb2.StreamAnalyzeResponse] | None] = asyncio.Queue(STREAM_WINDOW)

        async def answer(request: fer_pb2.StreamAnalyzeRequest) -> fer_pb2.StreamAnalyzeResponse:
            response = fer_pb2.StreamAnalyzeResponse(
                session_id=request.session_id, capture_time_ms=request.capture_time_ms, sequence=request.sequence
            )
            try:
                reading = await self.engine.analyze(frame_from_pb(request.frame))
                response.reading.CopyFrom(reading_to_pb(reading))
            except EmiliError as exc:  # One bad frame must not end a live session.
                response.error.CopyFrom(error_to_pb(exc))
            return response

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    await pending.put(asyncio.create_task(answer(request)))
            finally:
                await pending.put(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # Surfaces a broken request stream.
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def GetModelInfo(
        self, request: fer_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> fer_pb2.GetModelInfoResponse:
        m = self.engine.manifest
        return fer_pb2.GetModelInfoResponse(
            model_id=m.id,
            labels=m.labels,
            input_width=m.width,
            input_height=m.height,
            execution_providers=self.engine.classifier.providers if self.engine.classifier else [],
            max_batch_size=self.engine.options.batching.max_batch_size,
        )
