"""The chat workers enqueue the retention sweep once per period between them, whatever their number."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from emili_chat.worker import RETENTION_DUE_KEY, schedule_retention_once

pytestmark = pytest.mark.integration


class SentTasks:
    def __init__(self) -> None:
        self.names: list[str] = []

    def send_task(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.names.append(name)


def test_one_sweep_per_period_across_workers(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.delete(RETENTION_DUE_KEY)
    workers = [SentTasks(), SentTasks(), SentTasks()]
    assert [schedule_retention_once(w, client, 1.0) for w in workers] == [True, False, False]
    assert sum(w.names.count("chat.retention_sweep") for w in workers) == 1
    time.sleep(1.1)  # The period has passed: the next check, by any worker, enqueues the next sweep.
    assert schedule_retention_once(workers[2], client, 1.0)
    assert workers[2].names == ["chat.retention_sweep"]
    client.delete(RETENTION_DUE_KEY)
