"""Run records, the run lock, cancellation and checkpoints: what makes a training run resumable and single.

* The record is a Redis hash (live: state, step, loss, lr, tokens/s), mirrored to ``emili-models/runs/<id>/
  run.json`` when the run starts and ends, so it outlives Redis.
* The lock is a Redis key set with NX and a short TTL that a heartbeat thread keeps extending. A worker that
  dies stops the heartbeat; the lock expires within a TTL, and the redelivered job can take the run over.
  Two live copies of one run are impossible: the second one finds the lock held and does nothing.
* Cancellation is a flag the training loop checks after every optimiser step (an evaluation, after every set of
  replies: one arm's to one source's contexts, with one seed). A run asked for again before its cancel took effect
  goes on.
* Checkpoints are copied to ``runs/<id>/checkpoints/<step>/``; ``runs/<id>/checkpoint.json`` names the last
  complete one and is written only after all its files are, so a half-uploaded checkpoint is never used.

Code reads and writes records as :class:`RunRecord`; the stored form (one JSON value per hash field, the same
object in run.json) is what :meth:`RunRecord.to_json` gives and :meth:`RunRecord.from_json` reads.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import redis

from emili_core.errors import FailedPrecondition, NotFound
from emili_core.keys import run_prefix
from emili_core.leases import RELEASE_IF_HELD
from emili_core.objectstore import Bucket, ObjectStore
from emili_trainer.metrics import TRAINING

log = logging.getLogger(__name__)


class RunState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})
RunKind = Literal["sft", "dpo", "eval"]


@dataclass(frozen=True)
class RunRecord:
    """A run as stored: its request, its live progress and its outcome.

    Fields that belong to one kind of run (the recipe and dataset of training runs, the arms and contexts of
    evaluations) are None for the other kind, and None fields are left out of the stored form. Keys this class
    does not know are kept in ``extra`` and written back unchanged, so records written by another version of the
    trainer survive being read and mirrored by this one.
    """

    run_id: str
    kind: RunKind
    state: RunState = RunState.QUEUED
    attempts: int = 0  # Times a worker started it (more than 1: resumed after a worker died).
    created_ms: int = 0
    updated_ms: int = 0
    # Training runs.
    recipe: Mapping[str, Any] | None = None  # The recipe as a dict (Recipe.to_dict()).
    recipe_source: str | None = None  # The recipe's name, or where its YAML came from.
    dataset_id: str | None = None
    dataset_kind: str | None = None
    init_version: str | None = None  # The adapter a DPO run starts from; None: the base model.
    # Live progress (evaluations count answered contexts as steps).
    step: int = 0
    total: int = 0
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    tokens_seen: int | None = None
    resumed_from_step: int = 0
    # Outcome.
    model_version: str | None = None  # Training runs that succeeded.
    error: str | None = None  # Why the run failed.
    metrics: Mapping[str, Any] | None = None  # Final training metrics, or the evaluation's summary.
    report_prefix: str | None = None  # Evaluations that succeeded (bucket models).
    # Evaluation runs.
    arms: tuple[str, ...] | None = None
    max_examples: int | None = None
    session_ids: tuple[str, ...] | None = None
    rating_session_ids: tuple[str, ...] | None = None  # None: every recorded session.
    delta_table: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    note: str | None = None  # Why this copy of a job did nothing; never stored.

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_json(self) -> dict[str, Any]:
        """The stored form, with ``note`` when there is one (a job's result, not a record to store)."""
        out = dict(self.extra)
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = _plain(value)
        if self.note is not None:
            out["note"] = self.note
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        """Reads every record written so far; a missing or null field takes its default."""
        if data.get("kind") not in get_args(RunKind):
            raise ValueError(f"run {data.get('run_id')!r} has an unknown kind {data.get('kind')!r}")
        values: dict[str, Any] = {name: _PARSE[name](data[name]) for name in _FIELDS if data.get(name) is not None}
        extra = {k: v for k, v in data.items() if k not in _FIELDS and k != "note"}
        return cls(**values, extra=extra)

    def with_note(self, note: str) -> RunRecord:
        return replace(self, note=note)


def _plain(value: Any) -> Any:
    if isinstance(value, RunState):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _strings(values: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


_PARSE: dict[str, Any] = {
    "run_id": str,
    "kind": str,
    "state": RunState,
    "attempts": int,
    "created_ms": int,
    "updated_ms": int,
    "recipe": dict,
    "recipe_source": str,
    "dataset_id": str,
    "dataset_kind": str,
    "init_version": str,
    "step": int,
    "total": int,
    "epoch": float,
    "loss": float,
    "learning_rate": float,
    "tokens_per_second": float,
    "tokens_seen": int,
    "resumed_from_step": int,
    "model_version": str,
    "error": str,
    "metrics": dict,
    "report_prefix": str,
    "arms": _strings,
    "max_examples": int,
    "session_ids": _strings,
    "rating_session_ids": _strings,
    "delta_table": dict,
}
_FIELDS = tuple(f.name for f in fields(RunRecord) if f.name not in ("extra", "note"))
assert set(_PARSE) == set(_FIELDS), "every stored field needs a parser"


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

    def create(self, record: RunRecord) -> bool:
        """Store a new run's record; False (and nothing changed) when the run already exists."""
        run_id = record.run_id
        stored = replace(record, created_ms=_now_ms(), note=None).to_json()
        encoded = _encode(stored)
        if not self.redis.hsetnx(_key("run", run_id), "run_id", encoded["run_id"]):
            return False
        self.redis.hset(_key("run", run_id), mapping=encoded)
        self.redis.sadd("emili:trainer:runs", run_id)
        self.mirror(run_id)
        return True

    def get(self, run_id: str) -> RunRecord:
        raw = self.redis.hgetall(_key("run", run_id))
        if raw:
            return RunRecord.from_json({_text(k): json.loads(v) for k, v in raw.items()})
        try:
            return RunRecord.from_json(self.objects.get_json(Bucket.MODELS, f"{run_prefix(run_id)}/run.json"))
        except NotFound:
            raise NotFound(f"no run {run_id!r}") from None

    def update(self, run_id: str, **changes: Any) -> None:
        """Set some fields of the record (names and values as in :class:`RunRecord`; None clears a field)."""
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise ValueError(f"run records have no field {', '.join(sorted(unknown))}")
        values = {name: _plain(value) for name, value in changes.items()}
        self.redis.hset(_key("run", run_id), mapping=_encode({**values, "updated_ms": _now_ms()}))
        state = changes.get("state")
        if state == RunState.RUNNING:
            TRAINING.started(run_id)
        elif state in FINAL_STATES:
            TRAINING.ended(run_id, str(state))

    def mirror(self, run_id: str) -> None:
        self.objects.put_json(Bucket.MODELS, f"{run_prefix(run_id)}/run.json", self.get(run_id).to_json())

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
            TRAINING.left(run_id)  # Also when the run stays "running" to be retried: it is no longer in hand here.
            self.redis.eval(RELEASE_IF_HELD, 1, key, token)

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


def _now_ms() -> int:
    return int(time.time() * 1000)
