"""Celery tasks on the ``chat`` queue: thin wrappers around plain functions."""

from __future__ import annotations

import functools
from typing import Any

import redis

from emili_chat.persist import persist_session
from emili_chat.reconcile import mark_persisted
from emili_chat.settings import ChatSettings
from emili_core.objectstore import ObjectStore
from emili_core.settings import RetentionSettings, load_settings
from emili_core.tasks import idempotent_task

PIPELINE_STEP_LIMIT_S = 6 * 3600


@functools.cache
def runtime() -> tuple[redis.Redis, ObjectStore]:
    settings = load_settings(ChatSettings)
    store = ObjectStore(settings.s3)
    store.ensure_buckets()
    return redis.Redis.from_url(settings.redis_url), store


# Retried for as long as storage is down (every 30 s at most: under the chat queue's visibility timeout, so a
# retry waiting for its countdown in a live worker is never redelivered meanwhile). The reconciler
# (emili_chat.reconcile) enqueues again any ended session whose record is still missing.
@idempotent_task("chat.persist_session", max_retries=None, retry_backoff_max=30)
def persist_session_task(self: Any, session_id: str) -> dict[str, Any]:
    client, store = runtime()
    result = persist_session(client, store, session_id, retention_settings())
    if not result.get("deleted"):
        mark_persisted(client, session_id, str(result.get("last_event_id", "")))
    return result


@functools.cache
def retention_settings() -> RetentionSettings:
    return load_settings(ChatSettings).retention


# Sweeps and pipeline steps may run longer than the chat queue's time limit; the worker renews their leases.
@idempotent_task("chat.retention_sweep", time_limit=PIPELINE_STEP_LIMIT_S)
def retention_sweep_task(self: Any) -> dict[str, Any]:
    """Expire raw data past their retention period (frames, FER readings, Redis streams); ``emili retention
    sweep`` queues it, and a scheduler (cron, a Kubernetes CronJob) runs it daily."""
    from emili_chat.retention import retention_sweep

    client, store = runtime()
    return retention_sweep(client, store, retention_settings())


@idempotent_task("chat.pipeline_collect", time_limit=PIPELINE_STEP_LIMIT_S)
def pipeline_collect(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    from emili_chat import pipeline_steps as steps
    from emili_pipeline.pipeline import run_step_task

    client, store = runtime()
    return run_step_task(self, store, state, "collect", lambda s: steps.collect(client, store, s))


@idempotent_task("chat.pipeline_arm_sessions", time_limit=PIPELINE_STEP_LIMIT_S)
def pipeline_arm_sessions(self: Any, state: dict[str, Any]) -> dict[str, Any]:
    from emili_chat import pipeline_steps as steps
    from emili_pipeline.pipeline import run_step_task

    client, store = runtime()
    settings = load_settings(ChatSettings)
    return run_step_task(self, store, state, "arm_sessions", lambda s: steps.arm_sessions(settings, client, store, s))
