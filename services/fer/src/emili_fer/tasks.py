"""Celery tasks on the ``fer`` queue: thin wrappers around ``emili_fer.jobs``."""

from __future__ import annotations

import functools
from typing import Any

from redis import Redis

from emili_core.objectstore import ObjectStore
from emili_core.records import HashReader
from emili_core.settings import load_settings
from emili_core.tasks import idempotent_task, task_progress
from emili_fer import jobs
from emili_fer.engine import FerEngine
from emili_fer.settings import FerSettings


@functools.cache
def runtime() -> tuple[FerSettings, FerEngine, ObjectStore]:
    """Loaded once per worker process, on first use."""
    settings = load_settings(FerSettings)
    engine = FerEngine(settings.fer, settings.artifacts_dir)
    engine.load()
    store = ObjectStore(settings.s3)
    store.ensure_buckets()
    return settings, engine, store


@functools.cache
def consent_reader() -> HashReader:
    """Redis, where a live session's consent is (chat's session hash) before its record is persisted."""
    return Redis.from_url(runtime()[0].redis_url, socket_timeout=5)


@idempotent_task("fer.analyze_session_frames")
def analyze_session_frames(self: Any, session_id: str) -> dict[str, object]:
    _, engine, store = runtime()
    return jobs.analyze_session_frames(engine, store, session_id, task_progress(self), consent_reader())


@idempotent_task("fer.ingest_video")
def ingest_video(self: Any, session_id: str, video_key: str, fps: float | None = None) -> dict[str, object]:
    settings, engine, store = runtime()
    return jobs.ingest_video(
        engine,
        store,
        session_id,
        video_key,
        fps or settings.fer.video_fps,
        settings.fer.max_video_frames,
        task_progress(self),
        consent_reader(),
    )
