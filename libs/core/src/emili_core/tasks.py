"""The Celery app factory and the task decorator every service uses.

Tasks are thin: they take ids and object keys (never frames or other large payloads), call a plain
function that holds the logic, and return a small JSON result.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import Celery, shared_task, signals
from kombu.entity import Queue as KombuQueue
from prometheus_client import Counter, Gauge, Histogram

from emili_core.errors import DependencyUnavailable
from emili_core.metrics import LATENCY_BUCKETS, metric_name
from emili_core.queues import TASK_ROUTES, Queue, queue_for, unacked_keys
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
    """The app of ``service``: its consumers use the redelivery numbers of the queue of that name and keep
    their unacked messages under that queue's own keys (:func:`emili_core.queues.unacked_keys`)."""
    app = Celery(f"emili-{service}", broker=settings.redis_url, backend=settings.redis_url, set_as_current=True)
    redelivery = settings.redelivery(service)
    visibility = redelivery.visibility_timeout_s
    transport = {
        "visibility_timeout": visibility,
        # Sweep for messages of dead workers often enough that they come back soon after the timeout.
        "unacked_restore_interval": max(1, visibility // 10),
        "unacked_restore_throttle": 1,
        **unacked_keys(service),
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
        result_backend_transport_options={"visibility_timeout": visibility},
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        task_track_started=True,
        result_extended=True,
        result_expires=7 * 24 * 3600,
        task_time_limit=redelivery.task_time_limit_s,
        task_soft_time_limit=max(1, int(redelivery.task_time_limit_s * 0.95)),
    )
    return app


def idempotent_task(
    name: str,
    *,
    transient: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
    max_retries: int | None = 5,
    retry_backoff_max: int = 300,
    time_limit: int | None = None,
) -> Callable[[F], F]:
    """A task safe to run twice: acknowledged late and requeued if its worker dies.

    Its outputs must be keyed by content (ids plus a hash of its inputs), so a redelivered or retried
    run finds or rewrites the same objects instead of making duplicates. ``max_retries=None`` retries a
    transient failure for as long as it lasts, every ``retry_backoff_max`` seconds at most. ``time_limit``
    overrides the queue's for a task that may run longer (its worker renews its message's lease while it runs,
    :class:`LeaseRenewal`, so it is not redelivered meanwhile).
    """
    if name not in TASK_ROUTES:
        raise LookupError(f"task {name!r} has no route in emili_core.queues.TASK_ROUTES")

    limits: dict[str, int] = {}
    if time_limit is not None:
        limits = {"time_limit": time_limit, "soft_time_limit": max(1, int(time_limit * 0.95))}

    def decorate(fn: F) -> F:
        task = shared_task(
            name=name,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            autoretry_for=transient,
            retry_backoff=2,
            retry_backoff_max=retry_backoff_max,
            retry_jitter=True,
            max_retries=max_retries,
            **limits,
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


class LeaseRenewal:
    """Keeps the messages a live worker holds (running, or waiting for their retry's countdown) from being
    redelivered: every third of the visibility timeout it moves their entries in the queue's unacked index to
    now. A dead worker renews nothing, so its messages come back one visibility timeout after their last renewal."""

    def __init__(self, service: str, redis_url: str, visibility_s: int) -> None:
        self.index_key = unacked_keys(service)["unacked_index_key"]
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5)
        self.interval = max(1.0, visibility_s / 3)
        # task id -> delivery tags held, oldest first (a retry is a new message with the same task id, received
        # before the run that sent it ends).
        self.running: dict[str, list[str]] = {}
        signals.task_received.connect(self._received, weak=False)
        signals.task_postrun.connect(self._postrun, weak=False)
        threading.Thread(target=self._loop, name="lease-renewal", daemon=True).start()

    def _received(self, request: Any, **_: Any) -> None:
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag:
            self.running.setdefault(str(request.id), []).append(str(tag))

    def _postrun(self, task_id: str, **_: Any) -> None:
        tags = self.running.get(task_id)
        if tags:
            tags.pop(0)  # The message of the run that ended (acknowledged now).
        if not tags:
            self.running.pop(task_id, None)

    def renew(self) -> int:
        tags = [tag for held in list(self.running.values()) for tag in held]
        if not tags:
            return 0
        self.client.zadd(self.index_key, {tag: time.time() for tag in tags}, xx=True)
        return len(tags)

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.renew()
            except redis.RedisError as exc:
                log.warning("could not renew the leases of running tasks: %s", exc)


# What a worker waits out at start (instead of exiting): its broker or its object store being down.
STARTUP_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, redis.RedisError)


def wait_until_ready(
    service: str, settings: CommonSettings, warm_up: Callable[[], object], *, max_delay_s: float = 10.0
) -> None:
    """Reach the broker and run ``warm_up`` (object store, models), retrying with capped backoff while a
    dependency is down and logging what it waits for; errors that are not transient still stop the worker."""
    delay, started = 1.0, time.monotonic()
    while True:
        try:
            redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5).ping()
        except redis.RedisError as exc:
            waiting: BaseException | None = exc
            what = f"the broker at {settings.redis_url}"
        else:
            try:
                warm_up()
                waiting = None
            except STARTUP_ERRORS as exc:
                waiting, what = exc, "its dependencies (object store)"
        if waiting is None:
            if time.monotonic() - started > 1:
                log.info("%s worker: dependencies are up after %.0f s", service, time.monotonic() - started)
            return
        log.warning("%s worker not ready: waiting for %s (%s); retry in %.0f s", service, what, waiting, delay)
        time.sleep(delay)
        delay = min(max_delay_s, delay * 2)


def worker_main(
    service: str,
    settings_cls: type[SettingsT],
    warm_up: Callable[[], object],
    background: Callable[[Celery, SettingsT], object] | None = None,
) -> None:
    """Body of every ``emili-<service>-worker``: settings, logging, the app, models loaded before taking work.

    The service's task module must be imported by the caller (importing it registers its tasks). While the
    broker or object store is down at start the worker waits (reporting not ready) instead of exiting.
    ``background`` starts the service's own periodic work (e.g. chat's reconciler) once the worker is ready.
    """
    from emili_core.logs import configure_logging
    from emili_core.settings import load_settings

    settings = load_settings(settings_cls)
    configure_logging(f"{service}-worker", settings.log_level, settings.log_format)
    app = create_celery_app(service, settings)
    worker = settings.worker_settings()
    argv = sys.argv[1:]
    if "--check" in argv or "--live" in argv:
        raise SystemExit(0 if worker_check(service, settings, worker.metrics_port, ready="--check" in argv) else 1)
    from emili_core.metrics import start_metrics_server

    start_metrics_server(worker.metrics_port)
    ready = worker_ready_gauge(service)
    ready.set(0)
    wait_until_ready(service, settings, warm_up)
    if background is not None:
        background(app, settings)
    ready.set(1)
    run_worker(app, service, settings, worker.concurrency, worker.metrics_port, argv, metrics_started=True)


def worker_ready_gauge(service: str) -> Gauge:
    return Gauge(metric_name(service, "worker_ready"), "1 once the worker reached its dependencies and takes work")


def broker_reachable(settings: CommonSettings) -> bool:
    try:
        return bool(redis.Redis.from_url(settings.redis_url, socket_timeout=2).ping())
    except redis.RedisError:
        return False


def worker_check(service: str, settings: CommonSettings, metrics_port: int, *, ready: bool) -> bool:
    """``--live``: the broker answers. ``--check`` (readiness): also the worker's own ``worker_ready`` gauge is 1
    (read from its metrics endpoint, which is how a probe in the worker's container reaches it); without a
    metrics port only the broker is checked."""
    if not broker_reachable(settings):
        return False
    if not ready or not metrics_port:
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as response:
            body = response.read().decode()
    except OSError:
        return False
    name = metric_name(service, "worker_ready")
    return any(line.split()[-1] in {"1", "1.0"} for line in body.splitlines() if line.startswith(name + " "))


def run_worker(
    app: Celery,
    service: str,
    settings: CommonSettings,
    concurrency: int,
    metrics_port: int,
    argv: list[str],
    *,
    metrics_started: bool = False,
) -> None:
    """Entry point body of ``emili-<service>-worker``; ``--check`` only tests the broker (liveness probe)."""
    from emili_core.metrics import start_metrics_server

    if "--check" in argv:
        raise SystemExit(0 if broker_reachable(settings) else 1)
    if not metrics_started:
        start_metrics_server(metrics_port)
    TaskMetrics(service, settings.redis_url)
    LeaseRenewal(service, settings.redis_url, settings.redelivery(service).visibility_timeout_s)
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
