"""Stored frames are uploaded off the conversation's path.

A conversation whose user consented to storing frames hands each frame to the process's one
:class:`FrameUploader`, records its ``frame_stored`` event (the key it will have) and carries on (the frame
still goes to FER at once). The uploader keeps frames in a bounded in-memory buffer and uploads them with a few
concurrent tasks; while object storage is down it retries with capped backoff, so an outage delays storage and
never the conversation (a session's record may so name a frame that arrives in storage later; its key is the
frame's, so a retried upload rewrites the same object). A frame that would overflow the buffer is dropped:
counted (``emili_chat_frames_dropped_total``), and the conversation records a ``frames_dropped`` event instead.
A frame whose session was deleted meanwhile (its Redis hash is gone) is removed again after its upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from emili_chat.store import SessionStore, session_key
from emili_core.errors import DependencyUnavailable
from emili_core.metrics import metric_name
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.tasks import TRANSIENT_ERRORS

log = logging.getLogger(__name__)
RETRIED: tuple[type[BaseException], ...] = (DependencyUnavailable, *TRANSIENT_ERRORS)


@dataclass(frozen=True)
class PendingFrame:
    session_id: str
    key: str
    jpeg: bytes
    capture_time_ms: int


class FrameMetrics:
    def __init__(self) -> None:
        self.buffered = Gauge(metric_name("chat", "frame_buffer_bytes"), "Bytes of frames waiting to be uploaded")
        self.uploaded = Counter(metric_name("chat", "frames_uploaded_total"), "Frames stored in object storage")
        self.dropped = Counter(
            metric_name("chat", "frames_dropped_total"), "Frames not stored because the upload buffer was full"
        )
        self.retries = Counter(metric_name("chat", "frame_upload_retries_total"), "Frame uploads tried again")


_METRICS: FrameMetrics | None = None


def frame_metrics() -> FrameMetrics:
    global _METRICS
    if _METRICS is None:
        _METRICS = FrameMetrics()
    return _METRICS


class FrameUploader:
    def __init__(
        self,
        objects: ObjectStore,
        store: SessionStore,
        *,
        max_bytes: int,
        uploaders: int = 4,
        retry_max_s: float = 10.0,
    ) -> None:
        self.objects, self.store = objects, store
        self.max_bytes, self.uploaders, self.retry_max_s = max_bytes, uploaders, retry_max_s
        self.pending: deque[PendingFrame] = deque()
        self.bytes = 0
        self.in_flight = 0
        self.metrics = frame_metrics()
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._backoff = 0.0

    # --- the conversation's side ------------------------------------------------------------------------------

    def submit(self, session_id: str, key: str, jpeg: bytes, capture_time_ms: int) -> bool:
        """Buffer one frame for upload; False when the buffer is full and the frame is dropped. Never blocks."""
        self._start()
        if self.bytes + len(jpeg) > self.max_bytes:
            self.metrics.dropped.inc()
            log.warning("frame buffer full (%d bytes): dropping a frame of session %s", self.bytes, session_id)
            return False
        self.pending.append(PendingFrame(session_id, key, jpeg, capture_time_ms))
        self.bytes += len(jpeg)
        self.metrics.buffered.set(self.bytes)
        assert self._wake is not None
        self._wake.set()
        return True

    # --- the uploads ------------------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._tasks:
            return
        self._wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._upload_loop(), name=f"frame-upload-{i}") for i in range(self.uploaders)
        ]

    async def _upload_loop(self) -> None:
        assert self._wake is not None
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            frame = self.pending.popleft()
            self.in_flight += 1
            try:
                done = await self._upload(frame)
            finally:
                self.in_flight -= 1
            if done:
                self.bytes -= len(frame.jpeg)
                self.metrics.buffered.set(self.bytes)
                self._backoff = 0.0
            else:
                self.pending.appendleft(frame)  # Storage (or Redis) is down: try it again after a pause.
                self.metrics.retries.inc()
                self._backoff = min(self.retry_max_s, max(0.5, self._backoff * 2))
                await asyncio.sleep(self._backoff)

    async def _upload(self, frame: PendingFrame) -> bool:
        """True when the frame is stored and recorded (or its session is gone); False to try again later."""
        try:
            await asyncio.to_thread(self.objects.put_bytes, Bucket.FRAMES, frame.key, frame.jpeg, "image/jpeg")
            key = session_key(frame.session_id)
            if not await self.store._call("check a session", lambda: self.store.redis.exists(key)):
                # The session's data were deleted meanwhile: keep none of its frames.
                await asyncio.to_thread(self.objects.delete, Bucket.FRAMES, frame.key)
        except RETRIED as exc:
            log.warning("frame %s not stored yet (%s); %d frames buffered", frame.key, exc, len(self.pending) + 1)
            return False
        except Exception:
            log.exception("frame %s could not be stored; it is dropped", frame.key)
            self.metrics.dropped.inc()
            return True
        self.metrics.uploaded.inc()
        return True

    def idle(self) -> bool:
        return not self.pending and not self.in_flight

    async def drain(self, timeout_s: float) -> bool:
        """Wait (up to ``timeout_s``) until every buffered frame is stored; True when none is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.idle() and loop.time() < deadline:
            if self._wake is not None:
                self._wake.set()
            await asyncio.sleep(0.05)
        return self.idle()

    async def close(self, drain_s: float = 0.0) -> None:
        if drain_s > 0 and not await self.drain(drain_s):
            log.warning("shutting down with %d frames not stored (%d bytes)", len(self.pending), self.bytes)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
