"""Run records, the run lock, cancellation and checkpoints: what makes a training run resumable and single.

* The record is a Redis hash (live: state, step, loss, lr, tokens/s), mirrored to ``emili-models/runs/<id>/
  run.json`` when the run starts and ends, so it outlives Redis.
* The lock is a Redis key set with NX and a short TTL that a heartbeat thread keeps extending. A worker that
  dies stops the heartbeat; the lock expires within a TTL, and the redelivered job can take the run over.
  Two live copies of one run are impossible: the second one finds the lock held and does nothing.
* Cancellation is a flag the training loop checks after every optimiser step.
* Checkpoints are copied to ``runs/<id>/checkpoints/<step>/``; ``runs/<id>/checkpoint.json`` names the last
  complete one and is written only after all its files are, so a half-uploaded checkpoint is never used.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from emili_core.errors import FailedPrecondition, NotFound
from emili_core.keys import run_prefix
from emili_core.objectstore import Bucket, ObjectStore

log = logging.getLogger(__name__)


class RunState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})


class RunLocked(FailedPrecondition):
    """Another worker holds the run (it is running there now)."""


def _encode(values: dict[str, Any]) -> dict[Any, Any]:
    return {k: json.dumps(v) for k, v in values.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _key(kind: str, run_id: str) -> str:
    return f"emili:trainer:{kind}:{run_id}"


class RunStore:
    def __init__(self, client: redis.Redis, objects: ObjectStore, lock_ttl_seconds: float = 60.0) -> None:
        self.redis = client
        self.objects = objects
        self.lock_ttl_ms = int(lock_ttl_seconds * 1000)

    # --- the record ----------------------------------------------------------------------------------------

    def create(self, run_id: str, record: dict[str, Any]) -> bool:
        """Store a new run's record; False (and nothing changed) when the run already exists."""
        fields = _encode({**record, "run_id": run_id, "created_ms": _now_ms()})
        if not self.redis.hsetnx(_key("run", run_id), "run_id", fields["run_id"]):
            return False
        self.redis.hset(_key("run", run_id), mapping=fields)
        self.redis.sadd("emili:trainer:runs", run_id)
        self.mirror(run_id)
        return True

    def get(self, run_id: str) -> dict[str, Any]:
        raw = self.redis.hgetall(_key("run", run_id))
        if raw:
            return {_text(k): json.loads(v) for k, v in raw.items()}
        try:
            return dict(self.objects.get_json(Bucket.MODELS, f"{run_prefix(run_id)}/run.json"))
        except NotFound:
            raise NotFound(f"no run {run_id!r}") from None

    def update(self, run_id: str, **fields: Any) -> None:
        self.redis.hset(_key("run", run_id), mapping=_encode({**fields, "updated_ms": _now_ms()}))

    def mirror(self, run_id: str) -> None:
        self.objects.put_json(Bucket.MODELS, f"{run_prefix(run_id)}/run.json", self.get(run_id))

    def list_ids(self) -> list[str]:
        return sorted(_text(m) for m in self.redis.smembers("emili:trainer:runs"))

    # --- cancellation --------------------------------------------------------------------------------------

    def request_cancel(self, run_id: str) -> None:
        self.redis.set(_key("cancel", run_id), "1")

    def clear_cancel(self, run_id: str) -> None:
        self.redis.delete(_key("cancel", run_id))

    def cancel_requested(self, run_id: str) -> bool:
        return bool(self.redis.exists(_key("cancel", run_id)))

    # --- the lock ------------------------------------------------------------------------------------------

    def lock_holder(self, run_id: str) -> str | None:
        holder = self.redis.get(_key("lock", run_id))
        return _text(holder) if holder else None

    @contextlib.contextmanager
    def lock(self, run_id: str) -> Iterator[str]:
        """Hold the run's lock (with a heartbeat) for the block; :class:`RunLocked` if someone else has it."""
        token = f"{uuid.uuid4().hex}"
        key = _key("lock", run_id)
        if not self.redis.set(key, token, nx=True, px=self.lock_ttl_ms):
            raise RunLocked(f"run {run_id} is already running on another worker ({self.lock_holder(run_id)})")
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(self.lock_ttl_ms / 3000):
                try:
                    # Extend only our own lock: compare-and-set in one round trip.
                    self.redis.eval(_EXTEND, 1, key, token, self.lock_ttl_ms)
                except redis.RedisError as exc:
                    log.warning("could not extend the lock of run %s: %s", run_id, exc)

        thread = threading.Thread(target=heartbeat, name=f"lock-{run_id}", daemon=True)
        thread.start()
        try:
            yield token
        finally:
            stop.set()
            thread.join()
            self.redis.eval(_RELEASE, 1, key, token)

    # --- checkpoints ---------------------------------------------------------------------------------------

    def save_checkpoint(self, run_id: str, folder: Path, step: int) -> None:
        prefix = f"{run_prefix(run_id)}/checkpoints/{step:08d}"
        self.objects.put_folder(Bucket.MODELS, prefix, folder)
        previous = self._checkpoint_marker(run_id)
        self.objects.put_json(Bucket.MODELS, f"{run_prefix(run_id)}/checkpoint.json", {"step": step, "prefix": prefix})
        if previous is not None and previous["prefix"] != prefix:
            for key in self.objects.list_keys(Bucket.MODELS, previous["prefix"].rstrip("/") + "/"):
                self.objects.delete(Bucket.MODELS, key)
        log.info("run %s: checkpoint at step %d saved to object storage", run_id, step)

    def _checkpoint_marker(self, run_id: str) -> dict[str, Any] | None:
        try:
            return dict(self.objects.get_json(Bucket.MODELS, f"{run_prefix(run_id)}/checkpoint.json"))
        except NotFound:
            return None

    def restore_checkpoint(self, run_id: str, work_dir: Path) -> tuple[Path, int] | None:
        """Download the last complete checkpoint into ``work_dir``; None when the run has none."""
        marker = self._checkpoint_marker(run_id)
        if marker is None:
            return None
        step = int(marker["step"])
        folder = work_dir / f"checkpoint-{step}"
        self.objects.get_folder(Bucket.MODELS, marker["prefix"], folder)
        return folder, step


_EXTEND = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def _now_ms() -> int:
    return int(time.time() * 1000)
