"""The pipeline's state: what each step received and produced, kept in object storage after every step.

The canvas is a Celery chain of step tasks, one per service queue (:data:`STEPS`). Each task takes the
accumulated ``state`` dict from the step before, runs its step (the work lives in the service whose worker runs
it: ``emili_<service>.pipeline_steps``) through :func:`run_step` and returns the state with its outputs merged;
the same state is written to ``emili-models/pipelines/<id>/state.json`` so ``emili pipeline status ID`` works
later and a pipeline can be resumed from its first unfinished step.

Every step's work is keyed by content (session records, labels, dataset ids, run ids), so running a step
again (a redelivered message, a resubmitted chain) finds or rewrites the same objects. A resubmission bumps
``attempt``; a step of an older chain that is still travelling sees the newer attempt and stops its chain. A
cancelled pipeline (:func:`emili_pipeline.orchestrate.cancel`) has its attempt bumped the same way, its unfinished
steps failed with the reason, and ``cancelled`` set until it is resumed.

Object storage offers no compare-and-set (rclone's S3 server has no conditional writes), so every write that first
checks the stored attempt does both under one lock per pipeline in the broker's Redis (:func:`state_lock`): a step
that ends while its pipeline is cancelled either writes before the cancel reads, or sees the cancel and stops.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import redis

from emili_core.errors import NotFound
from emili_core.keys import pipeline_state_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.tasks import TRANSIENT_ERRORS
from emili_pipeline.config import PipelineConfig

State = dict[str, Any]


@dataclass(frozen=True)
class Step:
    name: str
    task: str  # The Celery task that runs it (its queue is the service whose worker must run it).
    title: str


STEPS: tuple[Step, ...] = (
    Step("collect", "chat.pipeline_collect", "persist the collected sessions"),
    Step("label", "labeler.pipeline_label", "gold VAD labels and reaction flags"),
    Step("datasets", "labeler.pipeline_datasets", "SFT and DPO datasets"),
    Step("sft", "trainer.pipeline_sft", "LoRA SFT"),
    Step("dpo", "trainer.pipeline_dpo", "LoRA DPO from the SFT adapter"),
    Step("arm_sessions", "chat.pipeline_arm_sessions", "simulated users per arm"),
    Step("delta_table", "labeler.pipeline_delta_table", "Table 2: Delta VAD per arm"),
    Step("evaluate", "trainer.pipeline_evaluate", "base vs SFT vs SFT+DPO, report"),
)
STEP_NAMES = tuple(s.name for s in STEPS)
PENDING, RUNNING, RETRYING, DONE, FAILED = "pending", "running", "retrying", "done", "failed"


class Superseded(Exception):
    """A newer submission of the same pipeline exists: this chain must stop."""


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def now_ms() -> int:
    return int(time.time() * 1000)


def pipeline_id(config: PipelineConfig, session_ids: Sequence[str]) -> str:
    """Same (resolved) config and same collected sessions: same pipeline."""
    return f"pl-{_digest({'config': config.model_dump(mode='json'), 'sessions': sorted(session_ids)})[:16]}"


def _split_draw(seed: int, session_id: str) -> float:
    """A session's fixed draw in [0, 1) for the split: the same in every pipeline with this seed."""
    return int(hashlib.sha256(f"{seed}:{session_id}".encode()).hexdigest()[:15], 16) / 16**15


def heldout_split(session_ids: Sequence[str], share: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training, held-out) session ids. A session is held out when its draw (a hash of seed and id) is below
    ``share``, so its side never depends on which other sessions are in the set: as the loop's sessions grow, one
    an earlier candidate (the next one's baseline) trained on is never held out to judge the two, and the order of
    collection does not matter. With two or more sessions and ``share > 0`` at least one is held out and never all
    (the lowest, or the highest, draw moves), which only small sets need."""
    ids = sorted(set(session_ids))
    if share <= 0 or len(ids) < 2:
        return ids, []
    draws = {s: _split_draw(seed, s) for s in ids}
    ranked = sorted(ids, key=draws.__getitem__)
    heldout = {s for s in ids if draws[s] < share}
    if not heldout:
        heldout = {ranked[0]}
    elif len(heldout) == len(ids):
        heldout.discard(ranked[-1])
    return [s for s in ids if s not in heldout], sorted(heldout)


def new_state(config: PipelineConfig, session_ids: Sequence[str], collected: dict[str, Any] | None = None) -> State:
    train, heldout = heldout_split(session_ids, config.heldout_share, config.seed)
    return {
        "pipeline_id": pipeline_id(config, session_ids),
        "config": config.model_dump(mode="json"),
        "sessions": sorted(set(session_ids)),
        "train_sessions": train,
        "heldout_sessions": heldout,
        "collected": collected or {},
        "attempt": 0,
        "tasks": {},
        "created_ms": now_ms(),
        "steps": {s.name: {"state": PENDING} for s in STEPS},
    }


def failure(state: State, max_chars: int = 400) -> dict[str, str]:
    """Why a pipeline stopped, for the loop's history and the researcher page: its first failed step with that
    step's error (cut to ``max_chars``), or its cancel's reason; empty when nothing failed."""
    if cancelled := state.get("cancelled"):
        return {"why": f"cancelled: {cancelled.get('why', '')}"[:max_chars]}
    for step in STEPS:
        recorded = state["steps"][step.name]
        if recorded.get("state") == FAILED:
            return {"step": step.name, "error": str(recorded.get("error") or "")[:max_chars]}
    return {}


def config_of(state: State) -> PipelineConfig:
    return PipelineConfig.model_validate(state["config"])


def outputs(state: State, step: str) -> dict[str, Any]:
    """What a finished step produced (empty if it has not finished)."""
    return dict(state["steps"].get(step, {}).get("outputs") or {})


def model_arms(state: State) -> dict[str, str]:
    """Label -> chat model arm of every model the pipeline has: base, the production arm the candidate is
    compared with (``baseline``, when it is not the base model), and the SFT and DPO versions it trained."""
    arms = {"base": "base"}
    trained = {step: str(v) for step in ("sft", "dpo") if (v := outputs(state, step).get("model_version"))}
    # Read from the stored config (validated when the state was made); a config without it compares with base.
    baseline = str((state.get("config") or {}).get("baseline") or "base")
    if baseline not in ("base", *trained.values()):
        arms["baseline"] = baseline
    return arms | trained


def evaluated_arms(state: State) -> dict[str, str]:
    """The arms the pipeline evaluates (simulated users, offline replies): every model (``evaluation.arms: all``),
    or only those the gate compares (``gate``): the baseline and the candidate."""
    arms = model_arms(state)
    if config_of(state).evaluation.arms == "all":
        return arms
    keep = {"baseline" if "baseline" in arms else "base", "dpo" if "dpo" in arms else "sft"}
    return {label: arm for label, arm in arms.items() if label in keep}


def candidate_version(state: State) -> str | None:
    """The version the pipeline offers to the gate: the last one it trained (DPO, else SFT); None if none."""
    arms = model_arms(state)
    return arms.get("dpo") or arms.get("sft")


def first_unfinished(state: State) -> str | None:
    return next((name for name in STEP_NAMES if state["steps"][name].get("state") != DONE), None)


def is_finished(state: State) -> bool:
    return first_unfinished(state) is None


# --- object storage --------------------------------------------------------------------------------------------


def save_state(store: ObjectStore, state: State) -> None:
    store.put_json(Bucket.MODELS, pipeline_state_key(state["pipeline_id"]), {**state, "updated_ms": now_ms()})


def load_state(store: ObjectStore, pipeline: str) -> State:
    try:
        return dict(store.get_json(Bucket.MODELS, pipeline_state_key(pipeline)))
    except NotFound:
        raise NotFound(f"no pipeline {pipeline!r} in object storage") from None


StateLock = Callable[[str], AbstractContextManager[Any]]
# Held for one read and one write of a small object; a holder that dies loses it after LOCK_EXPIRY_S.
LOCK_EXPIRY_S, LOCK_WAIT_S = 30.0, 30.0


def no_lock(pipeline: str) -> AbstractContextManager[Any]:
    """For a single process (unit tests, a broker that is not Redis): nothing else writes the state."""
    return nullcontext()


def state_lock(app: Any) -> StateLock:
    """The lock that serialises a pipeline's checked state writes across processes: a Redis lock in the broker of
    the Celery ``app``, which every worker and producer of the pipeline already reaches (none for a broker that is
    not Redis)."""
    broker_url = str(app.conf.broker_url or "")
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return no_lock
    client = broker_client(broker_url)

    def lock(pipeline: str) -> AbstractContextManager[Any]:
        held = client.lock(f"emili:pipeline-state:{pipeline}", timeout=LOCK_EXPIRY_S, blocking_timeout=LOCK_WAIT_S)
        return cast(AbstractContextManager[Any], held)

    return lock


@functools.cache
def broker_client(broker_url: str) -> redis.Redis:
    """One Redis client per broker and process (its pool is thread-safe), for the pipeline's own broker reads."""
    return redis.Redis.from_url(broker_url, socket_timeout=5)


def update_state(store: ObjectStore, pipeline: str, change: Callable[[State], State], lock: StateLock) -> State:
    """Read the stored state, change it and write it back, with no other checked write in between."""
    with lock(pipeline):
        state = change(load_state(store, pipeline))
        save_state(store, state)
        return state


def stored_state(store: ObjectStore, pipeline: str) -> State | None:
    try:
        return load_state(store, pipeline)
    except NotFound:
        return None


def _stored_attempt(store: ObjectStore, pipeline: str) -> int:
    return int((stored_state(store, pipeline) or {}).get("attempt", 0))


# --- running one step ------------------------------------------------------------------------------------------


def run_step(
    store: ObjectStore,
    state: State,
    name: str,
    work: Callable[[State], dict[str, Any]],
    *,
    task_id: str = "",
    worker: str = "",
    lock: StateLock = no_lock,
) -> State:
    """Run step ``name`` of the pipeline in ``state``: record it as running, call ``work`` (which returns the
    step's outputs), record the outputs, and return the new state. A step already done returns the state
    unchanged; a state from an older submission raises :class:`Superseded`. ``lock``: :func:`state_lock`
    wherever another process may write the same pipeline's state."""
    if name not in STEP_NAMES:
        raise ValueError(f"unknown pipeline step {name!r}")
    pipeline = state["pipeline_id"]
    step = state["steps"][name]
    with lock(pipeline):
        _stop_if_superseded(store, state, name)
        if step.get("state") == DONE:
            return state
        step.update(state=RUNNING, started_ms=now_ms(), task_id=task_id, worker=worker, error=None)
        step["runs"] = int(step.get("runs", 0)) + 1
        save_state(store, state)
    try:
        result = work(state)
    except Exception as exc:
        transient = isinstance(exc, TRANSIENT_ERRORS)
        step.update(state=RETRYING if transient else FAILED, error=f"{type(exc).__name__}: {exc}")
        with lock(pipeline):
            if not _superseded(store, state):
                save_state(store, state)
        raise
    # A step that ran on while its pipeline was resubmitted or cancelled must not write its older copy over the
    # newer state (its outputs, keyed by content, are stored either way).
    with lock(pipeline):
        _stop_if_superseded(store, state, name)
        step.update(state=DONE, finished_ms=now_ms(), outputs=result)
        save_state(store, state)
    return state


def _superseded(store: ObjectStore, state: State) -> bool:
    """Whether the stored pipeline was resubmitted or cancelled since ``state`` was submitted."""
    return _stored_attempt(store, state["pipeline_id"]) > int(state.get("attempt", 0))


def _stop_if_superseded(store: ObjectStore, state: State, name: str) -> None:
    if _superseded(store, state):
        pipeline = state["pipeline_id"]
        raise Superseded(f"pipeline {pipeline} was resubmitted or cancelled; this copy of step {name} stops")


def run_step_task(
    task: Any, store: ObjectStore, state: State, name: str, work: Callable[[State], dict[str, Any]]
) -> State:
    """The body of every ``*.pipeline_*`` Celery task: :func:`run_step`, and a superseded chain stops quietly."""
    from celery.exceptions import Ignore

    request = task.request
    lock = state_lock(task.app)
    try:
        return run_step(store, state, name, work, task_id=request.id or "", worker=request.hostname or "", lock=lock)
    except Superseded:
        raise Ignore() from None
