"""Stored frames are uploaded off the conversation's path.

A conversation whose user consented to storing frames hands each frame to the process's one
:class:`FrameUploader`, records its ``frame_stored`` event (the key it will have) and carries on (the frame
still goes to FER at once). The uploader keeps frames in a bounded in-memory buffer and uploads them with a few
concurrent tasks; while object storage is down it retries with capped backoff, so an outage delays storage and
never the conversation (a session's record may so name a frame that arrives in storage later; its key is the
frame's, so a retried upload rewrites the same object). Frames that do not fit in memory spill to files in a
local folder (:class:`FrameSpill`, bounded too), which a restarted server uploads as well, so a long outage or a
restart during one loses nothing up to the spill's size. A frame that fits in neither is dropped: counted
(``emili_chat_frames_dropped_total``), and the conversation records a ``frames_dropped`` event instead.
A frame whose session was deleted meanwhile (its Redis hash is gone) is removed again after its upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

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
    spilled: Path | None = None  # The spill file it was read from, removed once the frame is stored.


class FrameSpill:
    """Frames on local disk, oldest first: one file each, a JSON header line and the JPEG bytes, written to a
    temporary name and renamed, so a crash leaves whole files or none. Files left by an earlier process are
    taken up at start. Used from the event loop's thread only (small files; a write is one syscall or two)."""

    SUFFIX = ".frame"

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        folder.mkdir(parents=True, exist_ok=True)
        for partial in folder.glob("*.tmp"):
            partial.unlink(missing_ok=True)  # A write cut short by a crash: its frame was dropped, not stored.
        self.files: deque[Path] = deque(sorted(folder.glob(f"*{self.SUFFIX}")))
        self.bytes = sum(f.stat().st_size for f in self.files)

    def __len__(self) -> int:
        return len(self.files)

    def put(self, frame: PendingFrame) -> bool:
        header = json.dumps({"session_id": frame.session_id, "key": frame.key, "t": frame.capture_time_ms}).encode()
        blob = header + b"\n" + frame.jpeg
        if self.bytes + len(blob) > self.max_bytes:
            return False
        # Names sort by capture time, so uploads after a restart keep roughly the order frames were taken in.
        path = self.folder / f"{frame.capture_time_ms:015d}-{uuid.uuid4().hex}{self.SUFFIX}"
        temporary = path.with_suffix(".tmp")
        try:
            temporary.write_bytes(blob)
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("could not spill a frame to %s: %s", self.folder, exc)
            temporary.unlink(missing_ok=True)
            return False
        self.files.append(path)
        self.bytes += len(blob)
        return True

    def take(self) -> PendingFrame | None:
        """The oldest spilled frame (its file stays until :meth:`done`), or None when there is none."""
        while self.files:
            path = self.files.popleft()
            try:
                header, jpeg = path.read_bytes().split(b"\n", 1)
                meta = json.loads(header)
                return PendingFrame(str(meta["session_id"]), str(meta["key"]), jpeg, int(meta["t"]), path)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("unreadable spilled frame %s (%s): removed", path, exc)
                self._forget(path)
        return None

    def give_back(self, frame: PendingFrame) -> None:
        assert frame.spilled is not None
        self.files.appendleft(frame.spilled)

    def done(self, frame: PendingFrame) -> None:
        assert frame.spilled is not None
        self._forget(frame.spilled)

    def _forget(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            self.bytes -= path.stat().st_size
            path.unlink()


class FrameMetrics:
    def __init__(self) -> None:
        self.buffered = Gauge(metric_name("chat", "frame_buffer_bytes"), "Bytes of frames waiting to be uploaded")
        self.uploaded = Counter(metric_name("chat", "frames_uploaded_total"), "Frames stored in object storage")
        self.dropped = Counter(
            metric_name("chat", "frames_dropped_total"), "Frames not stored because the upload buffer was full"
        )
        self.retries = Counter(metric_name("chat", "frame_upload_retries_total"), "Frame uploads tried again")
        self.spilled = Gauge(metric_name("chat", "frame_spill_bytes"), "Bytes of frames spilled to local disk")


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
        spill: FrameSpill | None = None,
    ) -> None:
        self.objects, self.store = objects, store
        self.max_bytes, self.uploaders, self.retry_max_s = max_bytes, uploaders, retry_max_s
        self.spill = spill
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
        self.start()
        frame = PendingFrame(session_id, key, jpeg, capture_time_ms)
        if self.bytes + len(jpeg) <= self.max_bytes:
            self.pending.append(frame)
            self.bytes += len(jpeg)
            self.metrics.buffered.set(self.bytes)
        elif self.spill is not None and self.spill.put(frame):
            self.metrics.spilled.set(self.spill.bytes)
        else:
            self.metrics.dropped.inc()
            log.warning("frame buffer full (%d bytes): dropping a frame of session %s", self.bytes, session_id)
            return False
        assert self._wake is not None
        self._wake.set()
        return True

    # --- the uploads ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the uploads (at the server's start when frames were spilled by an earlier process)."""
        if self._tasks:
            return
        self._wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._upload_loop(), name=f"frame-upload-{i}") for i in range(self.uploaders)
        ]

    async def _upload_loop(self) -> None:
        assert self._wake is not None
        while True:
            frame = self._next()
            if frame is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.in_flight += 1
            try:
                done = await self._upload(frame)
            finally:
                self.in_flight -= 1
            if done:
                self._stored(frame)
                self._backoff = 0.0
            else:
                self._retry_later(frame)  # Storage (or Redis) is down: try it again after a pause.
                self.metrics.retries.inc()
                self._backoff = min(self.retry_max_s, max(0.5, self._backoff * 2))
                await asyncio.sleep(self._backoff)

    def _next(self) -> PendingFrame | None:
        if self.pending:
            return self.pending.popleft()
        return self.spill.take() if self.spill is not None else None

    def _stored(self, frame: PendingFrame) -> None:
        if frame.spilled is not None:
            assert self.spill is not None
            self.spill.done(frame)
            self.metrics.spilled.set(self.spill.bytes)
        else:
            self.bytes -= len(frame.jpeg)
            self.metrics.buffered.set(self.bytes)

    def _retry_later(self, frame: PendingFrame) -> None:
        if frame.spilled is not None:
            assert self.spill is not None
            self.spill.give_back(frame)
        else:
            self.pending.appendleft(frame)

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
        return not self.pending and not self.in_flight and not (self.spill is not None and len(self.spill))

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
            # Those in the spill folder are uploaded by the next process; those in memory are lost.
            log.warning("shutting down with %d frames not stored (%d bytes)", len(self.pending), self.bytes)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
