"""The Celery app factory and the task decorator every service uses.

Tasks are thin: they take ids and object keys (never frames or other large payloads), call a plain
function that holds the logic, and return a small JSON result.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
from celery import Celery, bootsteps, shared_task, signals
from kombu.entity import Queue as KombuQueue
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from emili_core.errors import DependencyUnavailable
from emili_core.metrics import LATENCY_BUCKETS, metric_name
from emili_core.queues import TASK_ROUTES, Queue, queue_for, queue_keys, unacked_keys
from emili_core.settings import CommonSettings, SettingsT, WorkerSettings

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

# Only errors that might succeed next time are retried.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    DependencyUnavailable,
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.LockError,  # Another process held a pipeline's state lock for its whole wait.
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
        # Task events for Flower (make up runs it): sent on the broker, cheap, and it need not switch them on.
        worker_send_task_events=True,
        task_send_sent_event=True,
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
    """Duration and outcome of every task, recorded here instead of in task bodies (queue depth and age are
    :class:`QueueMetrics`, exported by one process, not by every worker)."""

    def __init__(self, service: str) -> None:
        self.outcomes = Counter(metric_name(service, "tasks_total"), "Tasks finished, by outcome", ["task", "outcome"])
        self.duration = Histogram(
            metric_name(service, "task_duration_seconds"), "Task run time", ["task"], buckets=LATENCY_BUCKETS
        )
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


# --- queue depth and age: exported once ----------------------------------------------------------------------

# The time a message was published, stamped into its headers by every EMILI process (Celery's messages carry no
# send time); the oldest waiting message's stamp gives the queue's oldest task age without any extra Redis writes.
ENQUEUED_AT_HEADER = "emili_enqueued_at"


def _stamp_enqueue_time(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        headers[ENQUEUED_AT_HEADER] = time.time()  # A retry is a new message: it waits from its own publication.


signals.before_task_publish.connect(_stamp_enqueue_time, weak=False)


@dataclass(frozen=True)
class QueueStats:
    depth: int
    oldest_age_s: float | None  # None: the queue is empty, or its oldest message has no enqueue time.


def read_queue_stats(client: redis.Redis, queue: str, now: float) -> QueueStats:
    """Messages waiting in ``queue`` and the age of the oldest, in one round trip."""
    keys = queue_keys(queue)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.llen(key)
        pipe.lindex(key, -1)
    replies = pipe.execute()
    depth, stamps = 0, []
    for length, oldest in zip(replies[::2], replies[1::2], strict=True):
        depth += int(length)
        stamp = _enqueue_time(oldest) if oldest else None
        if stamp is not None:
            stamps.append(stamp)
    return QueueStats(depth, max(0.0, now - min(stamps)) if stamps else None)


# Whether a message with task id ARGV[1] is in any of the lists KEYS[1..n-1] or the unacked hash KEYS[n] (whose
# entries are [message, exchange, routing key]). Run in Redis: a deep queue is scanned there, not sent to the caller.
# A chain's first message names the later steps' ids too, so the id must be the message's own (its headers' id).
_MESSAGE_HELD = """
local id = ARGV[1]
local function own(raw, delivered)
  if not string.find(raw, id, 1, true) then return false end
  local ok, message = pcall(cjson.decode, raw)
  if not ok or type(message) ~= 'table' then return false end
  if delivered then message = message[1] end
  return type(message) == 'table' and type(message.headers) == 'table' and message.headers.id == id
end
for i = 1, #KEYS - 1 do
  for _, raw in ipairs(redis.call('lrange', KEYS[i], 0, -1)) do
    if own(raw, false) then return 1 end
  end
end
for _, raw in ipairs(redis.call('hvals', KEYS[#KEYS])) do
  if own(raw, true) then return 1 end
end
return 0
"""


def message_held(client: redis.Redis, queue: str, task_id: str) -> bool:
    """Whether the broker still has ``task_id``'s message for ``queue``: waiting in its lists, or delivered to one of
    its consumers and not yet acknowledged (running, prefetched or waiting for a retry's countdown: the transport's
    unacked hash). A busy worker may also hold one it popped but has not read yet (kombu keeps a paused BRPOP's reply
    until the worker has room): only a queue whose consumers are idle says a message in neither place is lost."""
    keys = [*queue_keys(queue), unacked_keys(queue)["unacked_key"]]
    return bool(client.eval(_MESSAGE_HELD, len(keys), *keys, task_id))


def _enqueue_time(raw: bytes) -> float | None:
    try:
        stamp = json.loads(raw)["headers"][ENQUEUED_AT_HEADER]
    except (ValueError, KeyError, TypeError):
        return None
    return float(stamp) if isinstance(stamp, int | float) else None


# Compare-and-extend or take: the holder renews its lease, anyone takes a free (expired) one.
_LEAD = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
_RESIGN = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class QueueMetrics(Collector):
    """``emili_queue_depth{queue}`` and ``emili_queue_oldest_task_age_seconds{queue}``, from one process only.

    Every worker installs it, and at each scrape the worker holding a Redis lease (renewed by the scrape, expiring
    ``lease_s`` after the last one) reads the queues; the others export no samples. So the figures are there as
    long as one worker is, and a sum over pods counts each queue once. Redis being down gives no samples, not a
    failed scrape."""

    LEASE_KEY = "emili:metrics:queue-exporter"

    def __init__(
        self,
        redis_url: str,
        holder: str,
        *,
        lease_s: float = 60.0,
        queues: tuple[str, ...] = tuple(Queue),
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.holder = holder
        self.lease_ms = int(lease_s * 1000)
        self.queues = queues
        if registry is not None:
            registry.register(self)

    def lead(self) -> bool:
        return bool(self.client.eval(_LEAD, 1, self.LEASE_KEY, self.holder, self.lease_ms))

    def resign(self) -> None:
        self.client.eval(_RESIGN, 1, self.LEASE_KEY, self.holder)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        depth = GaugeMetricFamily("emili_queue_depth", "Task messages waiting in the queue", labels=["queue"])
        age = GaugeMetricFamily(
            "emili_queue_oldest_task_age_seconds",
            "How long the oldest waiting message has waited (0 when the queue is empty)",
            labels=["queue"],
        )
        return depth, age

    def describe(self) -> Iterator[Metric]:
        # Without it, registering would collect (and so take the lease) at once.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        depth, age = self._families()
        try:
            if self.lead():
                now = time.time()
                for queue in self.queues:
                    stats = read_queue_stats(self.client, queue, now)
                    depth.add_metric([queue], stats.depth)
                    if stats.oldest_age_s is not None or stats.depth == 0:
                        age.add_metric([queue], stats.oldest_age_s or 0.0)
        except redis.RedisError as exc:
            log.debug("queue metrics not read: %s", exc)
        yield depth
        yield age


# --- liveness: a heartbeat the worker writes while it works ----------------------------------------------------


@functools.cache
def heartbeat_gauge() -> Gauge:
    return Gauge(
        "emili_worker_heartbeat_timestamp_seconds",
        "When the worker last found its consumer loop alive and no task past its time limit (Unix time)",
        ["service"],
    )


def heartbeat_path(service: str, worker: WorkerSettings) -> Path:
    return worker.heartbeat_file or Path(tempfile.gettempdir()) / f"emili-{service}-worker.heartbeat"


class Heartbeat:
    """Rewrites the heartbeat file (and the heartbeat gauge) every ``interval_s`` while the worker is alive.

    Alive means: its Celery consumer loop has ticked within a few intervals (a timer on the loop itself records the
    ticks, so a blocked loop stops them), and no task has run past its hard time limit (the thread pool cannot stop
    one: a hung task holds a slot, and its message's lease, for ever). Outside the loop (starting, reconnecting to
    the broker, draining at shutdown) the worker counts as alive: Celery is retrying the broker, and restarting the
    pod would not bring Redis back. The liveness probe reads only the file (:func:`worker_live`)."""

    def __init__(
        self, service: str, path: Path, interval_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.service = service
        self.path = path
        self.interval_s = interval_s
        self.stale_after_s = 3 * interval_s
        self.clock = clock
        self.loop_ticked_at: float | None = None  # None: outside the consumer loop.
        self.running: dict[str, tuple[float, float]] = {}  # Task id -> (started, hard time limit in s).
        self._stop = threading.Event()
        self._complaint: str | None = None

    def loop_tick(self) -> None:
        self.loop_ticked_at = self.clock()

    def loop_left(self) -> None:
        self.loop_ticked_at = None

    def task_started(self, task_id: str, time_limit_s: float | None) -> None:
        if time_limit_s:
            self.running[task_id] = (self.clock(), float(time_limit_s))

    def task_ended(self, task_id: str) -> None:
        self.running.pop(task_id, None)

    def trouble(self) -> str | None:
        """Why the worker is not alive now, or None."""
        now = self.clock()
        ticked = self.loop_ticked_at
        if ticked is not None and now - ticked > self.stale_after_s:
            return f"the consumer loop has not run for {now - ticked:.0f} s"
        for task_id, (started, limit) in list(self.running.items()):
            if now - started > limit + self.interval_s:
                return f"task {task_id} has run {now - started:.0f} s, past its {limit:.0f} s time limit"
        return None

    def beat(self) -> bool:
        trouble = self.trouble()
        if trouble is not None:
            if trouble != self._complaint:
                log.error(
                    "%s worker is stuck (%s): heartbeat stopped, the liveness probe will fail", self.service, trouble
                )
            self._complaint = trouble
            return False
        self._complaint = None
        now = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_text(f"{now:.3f}\n")
        os.replace(partial, self.path)  # Atomic: the probe never reads half a timestamp.
        heartbeat_gauge().labels(self.service).set(now)
        return True

    def start(self) -> Heartbeat:
        self.beat()
        threading.Thread(target=self._run, name="heartbeat", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except OSError as exc:
                log.warning("could not write the heartbeat file %s: %s", self.path, exc)

    def install(self, app: Celery) -> None:
        """Tick from ``app``'s consumer loop and follow its tasks' run times."""
        heartbeat = self

        class ConsumerHeartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
            requires = ("celery.worker.consumer.tasks:Tasks",)

            def register_with_event_loop(self, c: Any, hub: Any) -> None:
                # Registered on each (re)connection; Celery cancels the timer when the connection is lost.
                heartbeat.loop_tick()
                hub.call_repeatedly(heartbeat.interval_s, heartbeat.loop_tick)

            def stop(self, c: Any) -> None:
                heartbeat.loop_left()

            def shutdown(self, c: Any) -> None:
                heartbeat.loop_left()

        app.steps["consumer"].add(ConsumerHeartbeat)

        conf = app.conf

        def prerun(task_id: str, task: Any, **_: Any) -> None:
            if getattr(task, "app", None) is app:
                limits = getattr(task.request, "timelimit", None) or (None, None)
                self.task_started(task_id, limits[0] or task.time_limit or conf.task_time_limit)

        def postrun(task_id: str, **_: Any) -> None:
            self.task_ended(task_id)

        signals.task_prerun.connect(prerun, weak=False)
        signals.task_postrun.connect(postrun, weak=False)


def heartbeat_age(path: Path, now: float | None = None) -> float | None:
    """Seconds since the heartbeat written at ``path``; None when there is none (or it is unreadable)."""
    try:
        written = float(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return (time.time() if now is None else now) - written


def worker_live(path: Path, max_age_s: float) -> bool:
    """The liveness probe: the worker's own heartbeat is recent. Reads one local file: no broker, no models."""
    age = heartbeat_age(path)
    return age is not None and age <= max_age_s


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
    ``--live`` and ``--check`` are the probes (:func:`worker_probe`).
    """
    from emili_core.logs import configure_logging
    from emili_core.settings import load_settings

    settings = load_settings(settings_cls)
    worker = settings.worker_settings()
    argv = sys.argv[1:]
    if "--check" in argv or "--live" in argv:
        raise SystemExit(worker_probe(service, settings, worker, ready="--check" in argv))
    configure_logging(f"{service}-worker", settings.log_level, settings.log_format)
    app = create_celery_app(service, settings)
    # Beats from the start: waiting for the broker or loading models is not being stuck.
    heartbeat = Heartbeat(service, heartbeat_path(service, worker), worker.heartbeat_interval_s).start()
    from emili_core.metrics import start_metrics_server

    start_metrics_server(worker.metrics_port, settings.metrics_host)
    ready = worker_ready_gauge(service)
    ready.set(0)
    wait_until_ready(service, settings, warm_up)
    if background is not None:
        background(app, settings)
    ready.set(1)
    run_worker(app, service, settings, worker.concurrency, heartbeat)


def worker_ready_gauge(service: str) -> Gauge:
    return Gauge(metric_name(service, "worker_ready"), "1 once the worker reached its dependencies and takes work")


def broker_reachable(settings: CommonSettings) -> bool:
    try:
        return bool(redis.Redis.from_url(settings.redis_url, socket_timeout=2).ping())
    except redis.RedisError:
        return False


def worker_probe(service: str, settings: CommonSettings, worker: WorkerSettings, *, ready: bool) -> int:
    """The exit status of ``--live`` (liveness) or ``--check`` (readiness); 0 is healthy.

    ``--live`` reads only the worker's heartbeat file, so a hung worker fails it and a Redis outage does not (a
    restart would not bring Redis back), and it loads no models. ``--check`` asks whether the worker can take work
    now: the broker answers and the worker's ``worker_ready`` gauge is 1 (read from its metrics endpoint, which is
    how a probe in the worker's container reaches it; without a metrics port only the broker is checked)."""
    if not ready:
        path = heartbeat_path(service, worker)
        age = heartbeat_age(path)
        if age is None or age > worker.liveness_max_age_s:
            found = "no heartbeat" if age is None else f"the last heartbeat is {age:.0f} s old"
            print(f"{service} worker not live: {found} ({path}; limit {worker.liveness_max_age_s:.0f} s)")
            return 1
        return 0
    return 0 if worker_check(service, settings, worker.metrics_port) else 1


def worker_check(service: str, settings: CommonSettings, metrics_port: int) -> bool:
    """Readiness: the broker answers and the worker says it is ready (see :func:`worker_probe`)."""
    if not broker_reachable(settings):
        return False
    if not metrics_port:
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as response:
            body = response.read().decode()
    except OSError:
        return False
    name = metric_name(service, "worker_ready")
    return any(line.split()[-1] in {"1", "1.0"} for line in body.splitlines() if line.startswith(name + " "))


def _quietly(action: Callable[[], object]) -> None:
    try:
        action()
    except redis.RedisError as exc:
        log.debug("ignored at shutdown: %s", exc)


def run_worker(app: Celery, service: str, settings: CommonSettings, concurrency: int, heartbeat: Heartbeat) -> None:
    """Run the Celery worker of ``service`` until it is stopped, with the metrics, leases and heartbeat of tasks."""
    TaskMetrics(service)
    queue_metrics = QueueMetrics(settings.redis_url, f"{service}-{socket.gethostname()}-{os.getpid()}")
    signals.worker_shutdown.connect(lambda **_: _quietly(queue_metrics.resign), weak=False)  # Hand over at once.
    LeaseRenewal(service, settings.redis_url, settings.redelivery(service).visibility_timeout_s)
    heartbeat.install(app)
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
