"""Frames from a conversation go to the FER service over one StreamAnalyze stream per conversation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from emili.fer.v1 import fer_pb2, fer_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaceReading:
    capture_time_ms: int
    face_found: bool
    probabilities: dict[str, float]  # Empty without a face.
    source: str  # "fer_service" or "client"


OnReading = Callable[[FaceReading], Awaitable[None]]


class FerStream:
    """Sends frames, calls ``on_reading`` for each reading. Frames beyond ``capacity`` in flight are dropped:
    a live readout wants the newest face, not a backlog."""

    def __init__(self, channel: grpc.aio.Channel, session_id: str, on_reading: OnReading, capacity: int = 4) -> None:
        self.stub = fer_pb2_grpc.FerServiceStub(channel)
        self.session_id = session_id
        self.on_reading = on_reading
        self._frames: asyncio.Queue[fer_pb2.StreamAnalyzeRequest | None] = asyncio.Queue(capacity)
        self._task: asyncio.Task[None] | None = None
        self._sequence = 0
        self.dropped = 0

    def send(self, jpeg: bytes, capture_time_ms: int) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"fer-stream-{self.session_id}")
        request = fer_pb2.StreamAnalyzeRequest(
            session_id=self.session_id,
            capture_time_ms=capture_time_ms,
            sequence=self._sequence,
            frame=fer_pb2.Frame(data=jpeg),
        )
        self._sequence += 1
        try:
            self._frames.put_nowait(request)
        except asyncio.QueueFull:
            self.dropped += 1

    async def _requests(self) -> AsyncIterator[fer_pb2.StreamAnalyzeRequest]:
        while (request := await self._frames.get()) is not None:
            yield request

    async def _run(self) -> None:
        try:
            async for reply in self.stub.StreamAnalyze(self._requests()):
                if reply.WhichOneof("result") != "reading":
                    log.info("FER could not read a frame of %s: %s", self.session_id, reply.error.message)
                    continue
                reading = reply.reading
                await self.on_reading(
                    FaceReading(
                        capture_time_ms=reply.capture_time_ms,
                        face_found=reading.face_found,
                        probabilities={s.emotion: s.probability for s in reading.scores},
                        source="fer_service",
                    )
                )
        except grpc.aio.AioRpcError as exc:
            # The conversation goes on without a face readout ("not visible") rather than failing.
            log.warning("FER stream for %s ended: %s %s", self.session_id, exc.code().name, exc.details())

    async def close(self) -> None:
        if self._task is None:
            return
        with contextlib.suppress(asyncio.QueueFull):
            self._frames.put_nowait(None)
        try:
            await asyncio.wait_for(self._task, 5)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
