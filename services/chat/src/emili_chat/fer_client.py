"""Frames from a conversation go to the FER service over one StreamAnalyze stream per conversation.

The stream is reopened whenever it ends (FER restarted, a network fault), with capped exponential backoff,
for as long as the conversation lasts. Between the failure and the first reading after it FER is
*unavailable*: the owner hears of both edges (``on_unavailable``, ``on_restored``) so it can tell the model
and the record that the face is unknown, which is not the same as "no face in the frame".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
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
OnUnavailable = Callable[[int, str], Awaitable[None]]  # (since_ms, error)
OnRestored = Callable[[int, int], Awaitable[None]]  # (restored_ms, reconnects)


async def _nothing(*_args: object) -> None:
    return None


def _now_ms() -> int:
    return int(time.time() * 1000)


class FerStream:
    """Sends frames, calls ``on_reading`` for each reading. Frames beyond ``capacity`` in flight are dropped:
    a live readout wants the newest face, not a backlog. A stream that ends is reopened after
    ``reconnect_initial_s``, doubling up to ``reconnect_max_s``, until :meth:`close`."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        session_id: str,
        on_reading: OnReading,
        capacity: int = 4,
        *,
        on_unavailable: OnUnavailable = _nothing,
        on_restored: OnRestored = _nothing,
        reconnect_initial_s: float = 0.25,
        reconnect_max_s: float = 5.0,
    ) -> None:
        self.stub = fer_pb2_grpc.FerServiceStub(channel)
        self.session_id = session_id
        self.on_reading = on_reading
        self.on_unavailable = on_unavailable
        self.on_restored = on_restored
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = max(reconnect_max_s, reconnect_initial_s)
        self._frames: asyncio.Queue[fer_pb2.StreamAnalyzeRequest | None] = asyncio.Queue(capacity)
        self._in_flight: deque[int] = deque()  # Capture times of frames sent on the current stream, unanswered.
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._sequence = 0
        self.dropped = 0
        self.unavailable_since: int | None = None  # Set while FER is unavailable.
        self.reconnects = 0  # Streams opened since FER became unavailable.

    @property
    def available(self) -> bool:
        return self.unavailable_since is None

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
            self._in_flight.append(request.capture_time_ms)
            yield request
        self._closing = True

    async def _run(self) -> None:
        delay = self.reconnect_initial_s
        while not self._closing:
            error = "the stream ended"
            try:
                async for reply in self.stub.StreamAnalyze(self._requests()):
                    if self._in_flight:
                        self._in_flight.popleft()
                    if self.unavailable_since is not None:
                        await self._restored(reply.capture_time_ms or _now_ms())
                    delay = self.reconnect_initial_s
                    await self._reply(reply)
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name} {exc.details()}"
            if self._closing:
                return
            # Whatever was in flight on the dead stream is lost: the gap starts at the first of those frames.
            since = self._in_flight[0] if self._in_flight else _now_ms()
            self._in_flight.clear()
            if self.unavailable_since is None:
                self.unavailable_since = since
                self.reconnects = 0
                log.warning("FER stream for %s ended (%s); reconnecting", self.session_id, error)
                await self.on_unavailable(since, error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max_s)
            self.reconnects += 1

    async def _restored(self, restored_ms: int) -> None:
        reconnects = self.reconnects
        self.unavailable_since = None
        log.info("FER stream for %s is back after %d reconnects", self.session_id, reconnects)
        await self.on_restored(restored_ms, reconnects)

    async def _reply(self, reply: fer_pb2.StreamAnalyzeResponse) -> None:
        if reply.WhichOneof("result") != "reading":
            log.info("FER could not read a frame of %s: %s", self.session_id, reply.error.message)
            return
        reading = reply.reading
        try:
            await self.on_reading(
                FaceReading(
                    capture_time_ms=reply.capture_time_ms,
                    face_found=reading.face_found,
                    probabilities={s.emotion: s.probability for s in reading.scores},
                    source="fer_service",
                )
            )
        except Exception as exc:  # Recording failed (Redis down past its retries): lose this reading, not the stream.
            log.warning("a FER reading of %s was not recorded: %s", self.session_id, exc)

    async def close(self) -> None:
        if self._task is None:
            return
        self._closing = True
        with contextlib.suppress(asyncio.QueueFull):
            self._frames.put_nowait(None)
        try:
            await asyncio.wait_for(self._task, 5)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
