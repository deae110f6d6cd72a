"""Queue depth and oldest task age: read from Redis as kombu lays queues out, exported by one process only."""

from __future__ import annotations

import time

import redis
from prometheus_client import REGISTRY, CollectorRegistry

from emili_core.queues import Queue
from emili_core.settings import CommonSettings
from emili_core.tasks import QueueMetrics, TaskMetrics, create_celery_app, read_queue_stats

QUEUE = Queue.LABELER.value  # No worker consumes it in these tests.


def exporter(url: str, holder: str) -> tuple[QueueMetrics, CollectorRegistry]:
    """One process's exporter, with a registry of its own (as each worker process has)."""
    registry = CollectorRegistry()
    return QueueMetrics(url, holder, registry=registry), registry


def depth(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("emili_queue_depth", {"queue": QUEUE})


def test_depth_and_oldest_age_of_published_tasks(isolated_redis_url: str) -> None:
    app = create_celery_app("test", CommonSettings(redis_url=isolated_redis_url))
    client = redis.Redis.from_url(isolated_redis_url)
    assert read_queue_stats(client, QUEUE, time.time()).depth == 0
    before = time.time()
    for _ in range(3):
        app.send_task("labeler.delta_table")
    after = time.time()
    later = after + 100.0
    stats = read_queue_stats(client, QUEUE, later)
    assert stats.depth == 3
    assert stats.oldest_age_s is not None and later - after <= stats.oldest_age_s <= later - before


def test_exactly_one_process_exports_the_queues(isolated_redis_url: str) -> None:
    app = create_celery_app("test", CommonSettings(redis_url=isolated_redis_url))
    app.send_task("labeler.delta_table")
    (first, first_registry), (_, second_registry) = (
        exporter(isolated_redis_url, "a"),
        exporter(isolated_redis_url, "b"),
    )
    assert (depth(first_registry), depth(second_registry)) == (1.0, None)
    assert first_registry.get_sample_value("emili_queue_oldest_task_age_seconds", {"queue": QUEUE}) is not None
    assert (depth(first_registry), depth(second_registry)) == (1.0, None)  # The holder keeps its lease.
    first.resign()  # As a worker shutting down does; a dead one's lease expires.
    assert (depth(second_registry), depth(first_registry)) == (1.0, None)
    redis.Redis.from_url(isolated_redis_url).delete(QueueMetrics.LEASE_KEY)  # The lease expired.
    assert (depth(first_registry), depth(second_registry)) == (1.0, None)


def test_redis_down_gives_no_samples_not_an_error() -> None:
    registry = CollectorRegistry()
    QueueMetrics("redis://127.0.0.1:1/0", "a", registry=registry)
    assert depth(registry) is None


def test_a_worker_exports_no_queue_depth_of_its_own() -> None:
    TaskMetrics("depthtest")
    assert not [m.name for m in REGISTRY.collect() if m.name.startswith("emili_depthtest") and "queue" in m.name]
