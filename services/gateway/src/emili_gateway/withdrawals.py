"""Deleting withdrawn participants' data: a loop in the gateway process drains the Redis list of withdrawals.

For each request (``StudyEngine.withdraw`` pushed it on ``<redis_prefix>:withdrawals``):

1. chat's ``DeleteUserData`` with an admin token made here: the participant's sessions (those chat indexed for
   them and those in the request) leave Redis and object storage, each behind a tombstone;
2. ``labeler.forget_sessions`` sent by name over Celery: labels deleted, datasets built from the sessions marked
   withdrawn and rebuilt without them, the participant dropped from the per-user weights;
3. the gateway's own records of the sessions (kept only as a per-arm withdrawn count), and the Celery task results
   naming the sessions or the participant (Celery keeps each task's arguments and result for days: labels'
   numbers, dataset manifests);
4. the withdrawal record gets ``deleted: true`` and what each step removed, which the withdraw page shows.

Delivery is at least once: an item is moved atomically (BLMOVE) to a processing list while it is worked on and
removed only when done; at start-up, items left there by a process that died go back on the queue. Every step is
idempotent, and each finished step is written to the withdrawal record (with the labeler task's id, so a retry
waits for the same task), so running an item twice costs a little time and nothing else. A failed item goes to
the back of the queue and is tried again after a pause that doubles with each failure in a row.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis
import redis.asyncio as aioredis

from emili_core.deletion import audit_deletion
from emili_core.errors import DependencyUnavailable
from emili_core.settings import CommonSettings
from emili_gateway.chat_client import ChatClient
from emili_gateway.settings import WithdrawalSettings
from emili_gateway.studies import StudyEngine, now_ms

log = logging.getLogger(__name__)

FORGET_TASK = "labeler.forget_sessions"
CELERY_RESULT_PREFIX = "celery-task-meta-"  # Celery's Redis result backend: one key per task.
REASON = "participant withdrawal"


class TaskQueue(Protocol):
    async def send(self, name: str, kwargs: dict[str, Any]) -> str: ...

    async def outcome(self, task_id: str) -> tuple[str, Any]: ...


class CeleryTasks:
    """Sends tasks by name over the services' Celery queues and reads their results (the gateway runs no worker,
    and never imports another service: the task is named, its route is in ``emili_core.queues``)."""

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self._app: Any = None

    @property
    def app(self) -> Any:
        if self._app is None:
            from emili_core.tasks import create_celery_app

            self._app = create_celery_app("gateway", self.settings)
        return self._app

    async def send(self, name: str, kwargs: dict[str, Any]) -> str:
        result = await asyncio.to_thread(self.app.send_task, name, kwargs=kwargs)
        return str(result.id)

    async def outcome(self, task_id: str) -> tuple[str, Any]:
        def read() -> tuple[str, Any]:
            result = self.app.AsyncResult(task_id)
            state = str(result.state)
            return state, result.result if state in ("SUCCESS", "FAILURE") else None

        return await asyncio.to_thread(read)

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


def labeler_summary(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "labels": int(result.get("labels", 0)),
        "datasets_withdrawn": int(result.get("datasets_withdrawn", 0)),
        "datasets_rebuilt": int(result.get("datasets_rebuilt", 0)),
        "replacement_datasets": sorted(d["replacement"] for d in result.get("datasets", []) if d.get("replacement")),
        "user_weight_entries": int(result.get("user_weight_entries", 0)),
        "models_marked": int(result.get("models_marked", 0)),
        "models_retired": int(result.get("models_retired", 0)),
        "audit_key": str(result.get("audit_key", "")),
    }


class WithdrawalDrainer:
    def __init__(
        self,
        options: WithdrawalSettings,
        client: aioredis.Redis,
        studies: StudyEngine,
        chat: ChatClient,
        tasks: TaskQueue,
        admin_token: Callable[[], str],
    ) -> None:
        self.options = options
        self.redis = client
        self.studies = studies
        self.chat = chat
        self.tasks = tasks
        self.admin_token = admin_token
        prefix = studies.options.redis_prefix
        self.queue = f"{prefix}:withdrawals"
        self.processing = f"{prefix}:withdrawals:processing"
        self.invalid = f"{prefix}:withdrawals:invalid"  # Items that are not withdrawal requests, for an operator.

    async def requeue_unfinished(self) -> int:
        """Items a stopped drainer was working on go back to the front of the queue."""
        moved = 0
        while await self.redis.lmove(self.processing, self.queue, "RIGHT", "LEFT") is not None:
            moved += 1
        if moved:
            log.info("withdrawals: %d unfinished requests back on the queue", moved)
        return moved

    async def run(self) -> None:
        """Drain forever (until cancelled)."""
        failures = 0
        while True:
            try:
                await self.requeue_unfinished()
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("withdrawals: Redis unavailable (%s); retrying", exc)
                await asyncio.sleep(self.options.retry_seconds)
        while True:
            try:
                raw: Any = await self.redis.blmove(
                    self.queue, self.processing, self.options.poll_seconds, "LEFT", "RIGHT"
                )
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("withdrawals: Redis unavailable (%s); retrying", exc)
                await asyncio.sleep(self.options.retry_seconds)
                continue
            if raw is None:
                continue
            try:
                request = json.loads(raw)
                if not isinstance(request, dict) or not {"participant_id", "study_id"} <= request.keys():
                    raise ValueError("not a withdrawal request")
            except ValueError:
                log.error("withdrawals: a request that is not one was set aside on %s: %r", self.invalid, raw[:200])
                await self._set_aside(raw)
                continue
            try:
                await self.process(request)
            except asyncio.CancelledError:
                raise  # Left on the processing list: the next start puts it back.
            except Exception as exc:
                failures += 1
                delay = min(self.options.max_retry_seconds, self.options.retry_seconds * 2 ** (failures - 1))
                log.warning("withdrawals: a request failed (%s); it is tried again, next in %.0f s", exc, delay)
                await self._requeue(raw)
                await asyncio.sleep(delay)
                continue
            failures = 0
            await self.redis.lrem(self.processing, 1, raw)

    async def _set_aside(self, raw: Any) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.lrem(self.processing, 1, raw)
        pipe.rpush(self.invalid, raw)
        await pipe.execute()

    async def _requeue(self, raw: Any) -> None:
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.lrem(self.processing, 1, raw)
            pipe.rpush(self.queue, raw)
            await pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # Still on the processing list: the next start puts it back.

    async def process(self, request: dict[str, Any]) -> dict[str, Any]:
        """Delete one participant's data; returns the finished withdrawal record. Safe to run again."""
        record = await self.studies.withdrawal(request["study_id"], request["participant_id"]) or dict(request)
        if record.get("deleted"):
            return record
        participant_id, study_id = record["participant_id"], record["study_id"]
        removed: dict[str, Any] = record.setdefault("removed", {})
        progress: dict[str, Any] = record.setdefault("progress", {})
        if "chat" not in removed:
            deletion = await self.chat.delete_user_data(
                self.admin_token(), participant_id, list(record.get("session_ids", [])), REASON
            )
            removed["chat"] = {**deletion.totals, "audit_key": deletion.audit_key}
            # Every session chat deleted, also any the gateway had no record of.
            record["deleted_session_ids"] = sorted(set(record.get("session_ids", [])) | set(deletion.session_ids))
            await self.studies.save_withdrawal(record)
        sessions: list[str] = record.get("deleted_session_ids", record.get("session_ids", []))
        if "labeler" not in removed:
            removed["labeler"] = await self._forget(record, progress, sessions)
            await self.studies.save_withdrawal(record)
        if "gateway" not in removed:
            forgotten = await self.studies.forget_sessions(study_id, participant_id, sessions)
            forgotten["task_results"] = await self.forget_task_results([*sessions, participant_id])
            audit_key = await asyncio.to_thread(
                audit_deletion,
                self.studies.objects,
                service="gateway",
                action="withdrawal",
                requested_by=participant_id,
                session_ids=sessions,
                removed=forgotten,
                reason=REASON,
            )
            removed["gateway"] = {**forgotten, "audit_key": audit_key}
        record["deleted"] = True
        record["deleted_ms"] = now_ms()
        await self.studies.save_withdrawal(record)
        log.info("withdrawals: the data of %d sessions of %s were deleted", len(sessions), participant_id)
        return record

    async def forget_task_results(self, needles: list[str]) -> int:
        """Delete the Celery task results whose arguments or result name any of ``needles`` (ids)."""
        wanted = [n.encode() for n in needles if n]
        removed = 0
        batch: list[Any] = []

        async def purge() -> int:
            values = await self.redis.mget(batch)
            doomed = [k for k, v in zip(batch, values, strict=True) if v and any(n in v for n in wanted)]
            if doomed:
                await self.redis.delete(*doomed)
            batch.clear()
            return len(doomed)

        async for key in self.redis.scan_iter(match=f"{CELERY_RESULT_PREFIX}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                removed += await purge()
        if batch:
            removed += await purge()
        return removed

    async def _forget(self, record: dict[str, Any], progress: dict[str, Any], sessions: list[str]) -> dict[str, Any]:
        task_id = progress.get("labeler_task_id")
        if not task_id:
            kwargs = {
                "session_ids": sessions,
                "user_ids": [record["participant_id"]],
                "requested_by": record["participant_id"],
                "reason": REASON,
            }
            task_id = await self.tasks.send(FORGET_TASK, kwargs)
            progress["labeler_task_id"] = task_id
            await self.studies.save_withdrawal(record)  # A retry waits for this task instead of sending another.
        deadline = time.monotonic() + self.options.labeler_timeout_seconds
        while True:
            state, result = await self.tasks.outcome(task_id)
            if state == "SUCCESS":
                return labeler_summary(result if isinstance(result, dict) else {})
            if state == "FAILURE":
                progress.pop("labeler_task_id", None)  # Sent again on the retry.
                await self.studies.save_withdrawal(record)
                raise DependencyUnavailable(f"{FORGET_TASK} failed: {result}")
            if time.monotonic() > deadline:
                waited = self.options.labeler_timeout_seconds
                raise DependencyUnavailable(f"{FORGET_TASK} ({task_id}) did not finish in {waited:.0f} s ({state})")
            await asyncio.sleep(1.0)
