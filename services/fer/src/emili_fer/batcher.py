"""Dynamic micro-batching: concurrent requests and streams share one model call.

A batch is flushed when it holds ``max_batch_size`` items or when ``max_wait`` has passed since
its first item arrived. The queue is bounded: when it is full, ``submit`` raises ``Overloaded``
at once instead of letting memory and latency grow. Each item gets its own result or error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from emili_core.errors import NotReady, Overloaded

log = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass
class _Item(Generic[R]):
    tensor: np.ndarray
    future: asyncio.Future[R]


class MicroBatcher(Generic[R]):
    def __init__(
        self,
        run_batch: Callable[[np.ndarray], list[R]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        capacity: int,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.capacity = capacity
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Item[R]] | None = None
        self._task: asyncio.Task[None] | None = None
        # One thread owns the model: batches run one after another, never competing for cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fer-model")

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.capacity)
        self._task = asyncio.create_task(self._loop(), name="fer-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(NotReady("FER service is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, tensor: np.ndarray) -> R:
        if self._queue is None:
            raise NotReady("FER model is not loaded yet")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(tensor, future))
        except asyncio.QueueFull:
            raise Overloaded(
                f"FER queue is full ({self.capacity} frames waiting); retry later or send fewer frames"
            ) from None
        return await future

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            deadline = time.monotonic() + self.max_wait_s
            while len(items) < self.max_batch_size:
                try:
                    items.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            live = [item for item in items if not item.future.done()]  # Callers may have gone away.
            if not live:
                continue
            self.on_batch(len(live))
            try:
                batch = np.stack([item.tensor for item in live])
                results = await loop.run_in_executor(self._executor, self.run_batch, batch)
            except Exception as exc:
                log.exception("model batch of %d failed", len(live))
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, result in zip(live, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
