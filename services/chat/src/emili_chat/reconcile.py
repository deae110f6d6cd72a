"""The reconciler: ended sessions whose record is missing or behind their event log are enqueued again.

``chat.persist_session`` retries a transient failure for as long as it lasts, but a message can still be lost
(the chat server died between ending a session and enqueueing it, a task hit its time limit, Redis lost its
queue). So the chat worker runs :func:`reconcile` on a timer, one worker at a time (a Redis lock): it walks the
session hashes in Redis, and every ended one whose last event id is not the one last persisted is enqueued
again (at most every ``requeue_after_s``). A successful persist marks the session's last event id in
``emili:chat:persisted``, so a pass costs Redis reads only; a session without a mark is looked up in object
storage once (a record written by the pipeline step, or before marks existed). It also sets
``emili_chat_oldest_unpersisted_session_seconds``: how long the oldest such session has waited.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client import Counter, Gauge

from emili_chat.store import ENDED, PERSISTED_KEY, PREFIX, enqueued_key, events_key, session_key
from emili_core.errors import DependencyUnavailable, NotFound
from emili_core.keys import session_record_keys
from emili_core.metrics import metric_name
from emili_core.objectstore import Bucket, ObjectStore

log = logging.getLogger(__name__)

LOCK_KEY = f"{PREFIX}:reconciler:lock"


def mark_persisted(client: redis.Redis, session_id: str, last_event_id: str) -> None:
    client.hset(PERSISTED_KEY, session_id, last_event_id)


@dataclass(frozen=True)
class Unpersisted:
    session_id: str
    ended_ms: int
    last_event_id: str


@dataclass(frozen=True)
class Pass:
    ended: int  # Ended sessions seen.
    unpersisted: tuple[Unpersisted, ...]
    enqueued: tuple[str, ...]
    oldest_age_s: float  # 0 when every ended session is persisted.


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _record_is_current(store: ObjectStore, session_id: str, last_event_id: str) -> bool:
    key = session_record_keys(session_id)["session.json"]
    try:
        manifest = store.get_json(Bucket.SESSIONS, key)
    except NotFound:
        return False
    return bool(manifest.get("last_event_id") == last_event_id and manifest.get("state") == ENDED)


def find_unpersisted(client: redis.Redis, store: ObjectStore | None) -> tuple[int, list[Unpersisted]]:
    """(ended sessions seen, those whose stored record is missing or older than their last event)."""
    keys = [_text(k) for k in client.scan_iter(match=session_key("*"), count=1000)]
    ended, found = 0, []
    storage_up = store is not None
    # Marks of sessions whose hash is gone (deleted, or expired after retention) are dropped.
    gone = {_text(k) for k in client.hkeys(PERSISTED_KEY)} - {k.rsplit(":", 1)[-1] for k in keys}
    if gone:
        client.hdel(PERSISTED_KEY, *gone)
    for start in range(0, len(keys), 500):
        batch = keys[start : start + 500]
        ids = [k.rsplit(":", 1)[-1] for k in batch]
        pipe = client.pipeline(transaction=False)
        for key, session_id in zip(batch, ids, strict=True):
            pipe.hmget(key, ["state", "ended_ms"])
            pipe.xrevrange(events_key(session_id), count=1)
            pipe.hget(PERSISTED_KEY, session_id)
        results = pipe.execute()
        for i, session_id in enumerate(ids):
            (state, ended_ms), last, persisted = results[3 * i : 3 * i + 3]
            if state is None or json.loads(state) != ENDED:
                continue
            ended += 1
            last_event_id = _text(last[0][0]) if last else ""
            if persisted is not None and _text(persisted) == last_event_id:
                continue
            if storage_up and persisted is None and store is not None:
                try:
                    if _record_is_current(store, session_id, last_event_id):
                        mark_persisted(client, session_id, last_event_id)
                        continue
                except DependencyUnavailable as exc:
                    log.warning("reconciler: object storage is down (%s); counting the rest as unpersisted", exc)
                    storage_up = False
            found.append(Unpersisted(session_id, int(json.loads(ended_ms or b"0")), last_event_id))
    return ended, found


def reconcile(
    client: redis.Redis,
    store: ObjectStore | None,
    enqueue: Callable[[str], object],
    *,
    requeue_after_s: float,
    now: float | None = None,
) -> Pass:
    """One pass: enqueue ``chat.persist_session`` again for each unpersisted ended session (at most once every
    ``requeue_after_s`` per session); returns what it found."""
    now = time.time() if now is None else now
    ended, unpersisted = find_unpersisted(client, store)
    enqueued = []
    for session in unpersisted:
        if client.set(enqueued_key(session.session_id), "1", nx=True, px=max(1, int(requeue_after_s * 1000))):
            enqueue(session.session_id)
            enqueued.append(session.session_id)
    oldest = min((s.ended_ms for s in unpersisted if s.ended_ms), default=0)
    age = max(0.0, now - oldest / 1000) if oldest else 0.0
    if unpersisted:
        log.info(
            "reconciler: %d of %d ended sessions unpersisted (oldest %.0f s); enqueued %d again",
            len(unpersisted),
            ended,
            age,
            len(enqueued),
        )
    return Pass(ended, tuple(unpersisted), tuple(enqueued), age)


class ReconcilerMetrics:
    def __init__(self) -> None:
        self.oldest = Gauge(
            metric_name("chat", "oldest_unpersisted_session_seconds"),
            "Age of the oldest ended session whose record is not stored yet (0: none); set by the reconciler",
        )
        self.enqueued = Counter(
            metric_name("chat", "reconciler_enqueued_total"), "Sessions the reconciler enqueued to persist again"
        )
        self.passes = Counter(
            metric_name("chat", "reconciler_passes_total"), "Reconciler passes, by outcome", ["outcome"]
        )


@functools.cache
def reconciler_metrics() -> ReconcilerMetrics:
    return ReconcilerMetrics()


class Reconciler:
    """Runs :func:`reconcile` every ``interval_s`` in a daemon thread while this worker holds the Redis lock."""

    def __init__(
        self,
        client: redis.Redis,
        store: ObjectStore | None,
        enqueue: Callable[[str], object],
        *,
        interval_s: float,
        requeue_after_s: float,
    ) -> None:
        self.client, self.store, self.enqueue = client, store, enqueue
        self.interval_s, self.requeue_after_s = interval_s, requeue_after_s
        self.token = uuid.uuid4().hex
        self.metrics = reconciler_metrics()
        self.stopped = threading.Event()

    def holds_lock(self) -> bool:
        """Take the lock, or keep it if this worker holds it; it expires if the holder dies."""
        ttl = max(1000, int(self.interval_s * 3 * 1000))
        if self.client.set(LOCK_KEY, self.token, nx=True, px=ttl):
            return True
        if _text(self.client.get(LOCK_KEY) or b"") == self.token:
            self.client.pexpire(LOCK_KEY, ttl)
            return True
        return False

    def run_once(self) -> Pass | None:
        try:
            if not self.holds_lock():
                self.metrics.oldest.set(0)  # Only the holder reports; dashboards take the max.
                return None
            result = reconcile(self.client, self.store, self.enqueue, requeue_after_s=self.requeue_after_s)
        except (redis.RedisError, DependencyUnavailable, OSError) as exc:
            log.warning("reconciler pass failed: %s", exc)
            self.metrics.passes.labels("error").inc()
            return None
        self.metrics.oldest.set(result.oldest_age_s)
        self.metrics.enqueued.inc(len(result.enqueued))
        self.metrics.passes.labels("ok").inc()
        return result

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # Never let the thread die: the next pass tries again.
                log.exception("reconciler pass failed")
                self.metrics.passes.labels("error").inc()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="chat-reconciler", daemon=True)
        thread.start()
        return thread
