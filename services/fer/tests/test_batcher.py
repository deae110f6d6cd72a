"""Micro-batching: shared model calls, bounded queue, per-item results and errors."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from emili_core.errors import Overloaded
from emili_fer.batcher import MicroBatcher


async def test_concurrent_items_share_batches_up_to_the_maximum() -> None:
    sizes: list[int] = []
    batcher: MicroBatcher[float] = MicroBatcher(
        lambda batch: [float(x[0]) * 2 for x in batch],
        max_batch_size=4,
        max_wait_s=0.05,
        capacity=100,
        on_batch=sizes.append,
    )
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit(np.array([i], np.float32)) for i in range(10)))
    finally:
        await batcher.stop()
    assert results == [2.0 * i for i in range(10)]  # Each caller gets its own result, in order.
    assert sizes == [4, 4, 2]


async def test_lone_item_waits_at_most_max_wait() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(lambda b: [1] * len(b), max_batch_size=64, max_wait_s=0.01, capacity=8)
    batcher.start()
    try:
        assert await asyncio.wait_for(batcher.submit(np.zeros(1)), timeout=1.0) == 1
    finally:
        await batcher.stop()


async def test_full_queue_is_overloaded_not_unbounded() -> None:
    release = threading.Event()

    def slow(batch: np.ndarray) -> list[int]:
        release.wait(5)
        return [0] * len(batch)

    batcher: MicroBatcher[int] = MicroBatcher(slow, max_batch_size=1, max_wait_s=0.0, capacity=2)
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit(np.zeros(1)))
        await asyncio.sleep(0.05)  # The model thread is now busy with the first item.
        queued = [asyncio.ensure_future(batcher.submit(np.zeros(1))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="queue is full"):
            await batcher.submit(np.zeros(1))
        release.set()
        assert await first == 0 and await asyncio.gather(*queued) == [0, 0]
    finally:
        release.set()
        await batcher.stop()


async def test_model_failure_fails_each_item_of_the_batch() -> None:
    def broken(batch: np.ndarray) -> list[int]:
        raise RuntimeError("model exploded")

    batcher: MicroBatcher[int] = MicroBatcher(broken, max_batch_size=4, max_wait_s=0.02, capacity=8)
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit(np.zeros(1)) for _ in range(3)), return_exceptions=True)
    finally:
        await batcher.stop()
    assert all(isinstance(r, RuntimeError) for r in results)
