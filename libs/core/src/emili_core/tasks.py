"""The Celery app factory and the task decorator every service uses.

Tasks are thin: they take ids and object keys (never frames or other large payloads), call a plain
function that holds the logic, and return a small JSON result.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import Celery, shared_task, signals
from kombu.entity import Queue as KombuQueue
from prometheus_client import Counter, Gauge, Histogram

from emili_core.errors import DependencyUnavailable
from emili_core.metrics import LATENCY_BUCKETS, metric_name
from emili_core.queues import TASK_ROUTES, Queue, queue_for
from emili_core.settings import CommonSettings, SettingsT

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

# Only errors that might succeed next time are retried.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    DependencyUnavailable,
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
    TimeoutError,
)


def route_task(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict[str, str] | None:
    """Celery router: every EMILI task must be in the table; sending an unknown one fails loudly."""
    if name.startswith("celery."):
        return None
    return {"queue": queue_for(name).value}


def create_celery_app(service: str, settings: CommonSettings) -> Celery:
    app = Celery(f"emili-{service}", broker=settings.redis_url, backend=settings.redis_url, set_as_current=True)
    transport = {
        "visibility_timeout": settings.visibility_timeout_seconds,
        # Sweep for messages of dead workers often enough that they come back soon after the timeout.
        "unacked_restore_interval": max(1, settings.visibility_timeout_seconds // 10),
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_routes=(route_task,),
        task_queues=[KombuQueue(q.value, routing_key=q.value) for q in Queue],
        task_create_missing_queues=False,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        task_track_started=True,
        result_extended=True,
        result_expires=7 * 24 * 3600,
        task_time_limit=settings.task_time_limit_seconds,
        task_soft_time_limit=max(1, int(settings.task_time_limit_seconds * 0.95)),
    )
    return app


def idempotent_task(
    name: str,
    *,
    transient: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
    max_retries: int = 5,
) -> Callable[[F], F]:
    """A task safe to run twice: acknowledged late and requeued if its worker dies.

    Its outputs must be keyed by content (ids plus a hash of its inputs), so a redelivered or retried
    run finds or rewrites the same objects instead of making duplicates.
    """
    if name not in TASK_ROUTES:
        raise LookupError(f"task {name!r} has no route in emili_core.queues.TASK_ROUTES")

    def decorate(fn: F) -> F:
        task = shared_task(
            name=name,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            autoretry_for=transient,
            retry_backoff=2,
            retry_backoff_max=300,
            retry_jitter=True,
            max_retries=max_retries,
        )(fn)
        return task  # type: ignore[no-any-return]

    return decorate


class TaskMetrics:
    """Duration and outcome of every task, and queue depth, recorded here instead of in task bodies."""

    def __init__(self, service: str, redis_url: str) -> None:
        self.outcomes = Counter(metric_name(service, "tasks_total"), "Tasks finished, by outcome", ["task", "outcome"])
        self.duration = Histogram(
            metric_name(service, "task_duration_seconds"), "Task run time", ["task"], buckets=LATENCY_BUCKETS
        )
        depth = Gauge(
            metric_name(service, "task_queue_messages"), "Task messages waiting in the service's queue", ["queue"]
        )
        client = redis.Redis.from_url(redis_url, socket_timeout=2)
        depth.labels(service).set_function(lambda: float(client.llen(service)))
        self._started: dict[str, float] = {}
        signals.task_prerun.connect(self._prerun, weak=False)
        signals.task_postrun.connect(self._postrun, weak=False)
        signals.task_retry.connect(self._retry, weak=False)

    def _prerun(self, task_id: str, task: Any, **_: Any) -> None:
        self._started[task_id] = time.perf_counter()

    def _postrun(self, task_id: str, task: Any, state: str | None = None, **_: Any) -> None:
        started = self._started.pop(task_id, None)
        if started is not None:
            self.duration.labels(task.name).observe(time.perf_counter() - started)
        self.outcomes.labels(task.name, (state or "unknown").lower()).inc()

    def _retry(self, request: Any, reason: Any, **_: Any) -> None:
        log.warning("task %s retrying: %s", getattr(request, "task", "?"), reason)


def task_progress(task: Any) -> Callable[[int, int], None]:
    """A callback that publishes a long task's progress as its state (shown by clients and the CLI)."""

    def report(done: int, total: int) -> None:
        task.update_state(state="PROGRESS", meta={"done": done, "total": total})

    return report


def worker_main(service: str, settings_cls: type[SettingsT], warm_up: Callable[[], object]) -> None:
    """Body of every ``emili-<service>-worker``: settings, logging, the app, models loaded before taking work.

    The service's task module must be imported by the caller (importing it registers its tasks).
    """
    from emili_core.logs import configure_logging
    from emili_core.settings import load_settings

    settings = load_settings(settings_cls)
    configure_logging(f"{service}-worker", settings.log_level, settings.log_format)
    app = create_celery_app(service, settings)
    if "--check" not in sys.argv:
        warm_up()
    worker = settings.worker_settings()
    run_worker(app, service, settings, worker.concurrency, worker.metrics_port, sys.argv[1:])


def broker_reachable(settings: CommonSettings) -> bool:
    try:
        return bool(redis.Redis.from_url(settings.redis_url, socket_timeout=2).ping())
    except redis.RedisError:
        return False


def run_worker(
    app: Celery, service: str, settings: CommonSettings, concurrency: int, metrics_port: int, argv: list[str]
) -> None:
    """Entry point body of ``emili-<service>-worker``; ``--check`` only tests the broker (liveness probe)."""
    from emili_core.metrics import start_metrics_server

    if "--check" in argv:
        raise SystemExit(0 if broker_reachable(settings) else 1)
    start_metrics_server(metrics_port)
    TaskMetrics(service, settings.redis_url)
    # Threads, not prefork: the model is loaded once and shared, and SIGKILL takes the whole worker down
    # (no orphaned children finishing a task whose message is redelivered).
    app.worker_main(
        [
            "worker",
            f"--queues={service}",
            "--pool=threads",
            f"--concurrency={concurrency}",
            f"--hostname={service}-{os.getpid()}@%h",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
