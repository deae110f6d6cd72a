"""Retention: raw data expire after configurable periods (:class:`emili_core.settings.RetentionSettings`).

    emili-frames/**                       face frames and uploaded videos: ``frames_days`` after upload
    emili-sessions/<session>/fer/*.jsonl  offline FER readings: ``fer_readings_days`` after they were written

Frames expire by an S3 lifecycle rule where the server supports one (MinIO); where it does not (rclone's S3
server, the local stack) the sweeper (:func:`sweep_objects`, run by ``chat.retention_sweep`` and ``emili
retention sweep``) deletes what is older than the period by its LastModified time. Session records
(``session.json``, ``events.jsonl``) are not raw data and stay until their owner deletes them. The Redis side (a
session's event stream and hash) belongs to the chat service (``emili_chat.retention``).
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import typer
from minio.commonconfig import ENABLED, Filter
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule
from prometheus_client import Counter

from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import RetentionSettings

log = logging.getLogger(__name__)
DAY = datetime.timedelta(days=1)
RULE_ID = "emili-retention"

OBJECTS_DELETED = Counter(
    "emili_retention_objects_deleted_total", "Objects the retention sweeper deleted, by bucket", ["bucket"]
)


def lifecycle_config(prefix: str, days: int) -> LifecycleConfig:
    """One enabled rule expiring every object under ``prefix`` ``days`` days after it was written."""
    if days < 1:
        raise ValueError(f"a lifecycle rule needs at least one day, not {days}")
    return LifecycleConfig(
        [Rule(ENABLED, rule_filter=Filter(prefix=prefix), rule_id=RULE_ID, expiration=Expiration(days=days))]
    )


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class SweepResult:
    bucket: str
    days: int
    scanned: int = 0
    deleted: int = 0
    by_lifecycle: bool = False  # The server expires them itself: nothing was swept.
    deleted_keys: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "days": self.days,
            "scanned": self.scanned,
            "deleted": self.deleted,
            "by_lifecycle": self.by_lifecycle,
        }


def sweep_objects(
    store: ObjectStore,
    bucket: Bucket,
    prefix: str,
    days: int,
    *,
    keep: Callable[[str], bool] = lambda key: False,
    now: datetime.datetime | None = None,
) -> SweepResult:
    """Delete every object under ``prefix`` last modified more than ``days`` days ago (``keep(key)`` spares one);
    ``days`` 0 keeps everything."""
    result = SweepResult(store.bucket(bucket), days)
    if days <= 0:
        return result
    cutoff = (now or _utc_now()) - days * DAY
    for key, modified in store.list_modified(bucket, prefix):
        if keep(key):
            continue
        result.scanned += 1
        if modified is None:
            continue
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=datetime.UTC)
        if modified < cutoff:
            store.delete(bucket, key)
            result.deleted += 1
            result.deleted_keys.append(key)
    if result.deleted:
        OBJECTS_DELETED.labels(result.bucket).inc(result.deleted)
    log.info(
        "retention: %s/%s: %d of %d objects older than %d days deleted",
        result.bucket,
        prefix,
        result.deleted,
        result.scanned,
        days,
    )
    return result


def _not_fer_readings(key: str) -> bool:
    parts = key.split("/")
    return not (len(parts) == 3 and parts[1] == "fer")


def sweep(
    store: ObjectStore, settings: RetentionSettings, *, now: datetime.datetime | None = None
) -> dict[str, dict[str, Any]]:
    """Expire frames (a lifecycle rule where the server has one, else swept) and offline FER readings (swept:
    they share their bucket with the session records, which stay). Returns a summary by what was expired."""
    frames = SweepResult(store.bucket(Bucket.FRAMES), settings.frames_days)
    if settings.frames_days > 0 and store.apply_lifecycle(Bucket.FRAMES, "", settings.frames_days):
        frames.by_lifecycle = True
    else:
        frames = sweep_objects(store, Bucket.FRAMES, "", settings.frames_days, now=now)
    readings = sweep_objects(store, Bucket.SESSIONS, "", settings.fer_readings_days, keep=_not_fer_readings, now=now)
    return {"frames": frames.to_json(), "fer_readings": readings.to_json()}


def sweep_command(
    local: bool = typer.Option(
        False, "--local", help="Sweep object storage from here (no Redis pass) instead of queueing chat's task."
    ),
    timeout: float = typer.Option(600.0, help="Seconds to wait for the chat worker's result."),
) -> None:
    """Expire raw data past their retention period now (frames, FER readings; Redis streams through the chat
    worker's ``chat.retention_sweep``) and print what was deleted."""
    from emili_core.settings import CommonSettings, load_settings
    from emili_core.tasks import create_celery_app

    settings = load_settings(CommonSettings)
    if local:
        summary: Any = sweep(ObjectStore(settings.s3), settings.retention)
    else:
        app = create_celery_app("cli", settings)
        try:
            summary = app.send_task("chat.retention_sweep").get(timeout=timeout)
        finally:
            app.close()
    print(json.dumps(summary, indent=2, sort_keys=True))


retention_app = typer.Typer(help="Retention: expire raw data past their configured periods.", no_args_is_help=True)
retention_app.command("sweep")(sweep_command)
