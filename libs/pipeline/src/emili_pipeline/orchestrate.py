"""Submitting the canvas and following it: the producer side of the pipeline (the CLI, tests).

:func:`submit` sends a Celery chain of the steps not yet done, each with a task id recorded in the state.
:class:`Watcher` polls the result backend: each step's state, a training step's progress (the PROGRESS meta of
its task), the final state. When the worker running a step has died (its process is gone, or, on another host,
it stopped answering pings), the watcher resubmits the chain from that step: the step runs again and, being
keyed by content, resumes or finds its outputs instead of making new ones. The dead worker's message comes
back only after the broker's visibility timeout; it then belongs to an older attempt and stops at once. A queued
step whose message the broker no longer holds (a Redis restored from an older copy, a queue deleted by hand) would
wait forever: after as many looks as a dead worker's missed pings, the watcher resubmits from that step too.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery, chain

from emili_core.errors import DependencyUnavailable
from emili_core.keys import run_prefix
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.queues import queue_for
from emili_core.tasks import message_held
from emili_pipeline.describe import describe
from emili_pipeline.pipeline import (
    DONE,
    FAILED,
    STEPS,
    State,
    Superseded,
    broker_client,
    first_unfinished,
    load_state,
    now_ms,
    save_state,
    state_lock,
    stored_state,
    update_state,
)

STEP_TASK = {s.name: s.task for s in STEPS}
LIVE = {"STARTED", "PROGRESS", "RETRY"}


def submit(
    app: Celery, store: ObjectStore, state: State, from_step: str | None = None, *, expect_attempt: int | None = None
) -> State:
    """Send the chain from ``from_step`` (default: the first step not done); returns the submitted state. Its
    attempt is above any stored one. ``expect_attempt``: submit only if the stored pipeline is still at that
    attempt (0: not stored yet) and not cancelled, else raise :class:`Superseded` (someone else acted first)."""
    start = from_step or first_unfinished(state)
    if start is None:
        return state
    names = [s.name for s in STEPS]
    todo = names[names.index(start) :]
    with state_lock(app)(state["pipeline_id"]):
        stored = stored_state(store, state["pipeline_id"]) or {}
        stored_attempt = int(stored.get("attempt", 0))
        if expect_attempt is not None and (stored_attempt != expect_attempt or stored.get("cancelled")):
            raise Superseded(f"pipeline {state['pipeline_id']} was submitted or cancelled elsewhere meanwhile")
        state = {**state, "attempt": max(int(state.get("attempt", 0)), stored_attempt) + 1}
        state.pop("cancelled", None)
        ids = {name: uuid.uuid4().hex for name in todo}
        state["tasks"] = {**state.get("tasks", {}), **ids}
        for name in todo:
            state["steps"][name] = {**state["steps"][name], "state": "pending", "error": None}
        save_state(store, state)  # First: a step of the previous attempt that is still running sees it and stops.
    signatures = [
        app.signature(STEP_TASK[name], args=(state,) if i == 0 else ()).set(task_id=ids[name])
        for i, name in enumerate(todo)
    ]
    chain(*signatures).apply_async()
    return state


def cancel(app: Celery, store: ObjectStore, state: State, why: str) -> tuple[State, list[str]]:
    """Stop a pipeline for good (until it is resumed): its unfinished steps are recorded as failed with ``why``, its
    attempt is bumped so any step of its chain still travelling (queued, or redelivered hours later) stops at its
    start, and its tasks are revoked. The workers run tasks in threads, which cannot be killed: a step already
    running ends its work (sooner when its trainer run is cancelled), records nothing and stops the chain. Returns
    the stored state and the trainer runs (training or evaluation) its running steps reported. It acts on the
    stored state (``state`` names the pipeline), so a step that finished meanwhile stays done."""

    def stop(stored: State) -> State:
        if stored.get("cancelled"):  # Cancelled again: it keeps its first reason; its runs are asked to stop again.
            return stored
        stored = {**stored, "attempt": int(stored.get("attempt", 0)) + 1, "cancelled": {"at_ms": now_ms(), "why": why}}
        for name in _unfinished(stored):
            stored["steps"][name] = {**stored["steps"][name], "state": FAILED, "error": f"cancelled: {why}"}
        return stored

    # First: a step that starts or ends from now on sees the newer attempt.
    state = update_state(store, state["pipeline_id"], stop, state_lock(app))
    unfinished = _unfinished(state)
    tasks = [state["tasks"][name] for name in unfinished if name in state.get("tasks", {})]
    runs: list[str] = []
    if tasks:
        app.control.revoke(tasks)
        for task_id in tasks:
            meta = dict(app.backend.get_task_meta(task_id))
            info = meta.get("result")
            if meta.get("status") == "PROGRESS" and isinstance(info, dict) and info.get("run_id"):
                runs.append(str(info["run_id"]))
    return state, runs


def _unfinished(state: State) -> list[str]:
    return [s.name for s in STEPS if state["steps"][s.name].get("state") != DONE]


def _local_worker_alive(hostname: str) -> bool | None:
    """Whether a worker named ``<service>-<pid>@<host>`` is alive, when it runs on this machine (None: unknown)."""
    name, _, host = hostname.partition("@")
    pid = name.rpartition("-")[2]
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class StepView:
    name: str
    title: str
    state: str = "pending"
    detail: str = ""
    seconds: float | None = None


@dataclass
class Watcher:
    app: Celery
    store: ObjectStore
    state: State
    ping_every_s: float = 10.0
    missed_pings_allowed: int = 3
    # A message lost again and again is being discarded (e.g. by a worker that does not know its task): fail then.
    lost_resubmissions_allowed: int = 3
    resubmissions: list[dict[str, Any]] = field(default_factory=list)
    _missed: dict[str, int] = field(default_factory=dict)
    _last_ping: float = 0.0
    _alive: set[str] = field(default_factory=set)
    _started: dict[str, float] = field(default_factory=dict)
    _last_look: dict[str, float] = field(default_factory=dict)

    @property
    def pipeline_id(self) -> str:
        return str(self.state["pipeline_id"])

    def _meta(self, task_id: str) -> dict[str, Any]:
        return dict(self.app.backend.get_task_meta(task_id))

    def _worker_dead(self, worker: str) -> bool:
        local = _local_worker_alive(worker)
        if local is not None:
            return not local
        now = time.monotonic()
        if now - self._last_ping >= self.ping_every_s:
            self._last_ping = now
            try:
                self._alive = {n for reply in self.app.control.ping(timeout=2) for n in reply}
            except Exception:
                return False  # The broker is unreachable: no evidence about the worker.
            self._missed[worker] = 0 if worker in self._alive else self._missed.get(worker, 0) + 1
        return self._missed.get(worker, 0) >= self.missed_pings_allowed

    def poll(self) -> tuple[list[StepView], str]:
        """Each step's view, and the pipeline's status: running, succeeded or failed (resubmitting as needed)."""
        cancelled = self.state if self.state.get("cancelled") else self._cancelled()
        if cancelled is not None:
            self.state = cancelled
            return [recorded_view(step.name, step.title, cancelled) for step in STEPS], "failed"
        views: list[StepView] = []
        status = "running"
        latest = self.state
        for step in STEPS:
            view = StepView(step.name, step.title)
            views.append(view)
            recorded = latest["steps"][step.name]
            task_id = latest.get("tasks", {}).get(step.name)
            if recorded.get("state") == DONE:
                views[-1] = recorded_view(step.name, step.title, latest)
                continue
            if recorded.get("state") == FAILED:  # Failed by this watcher (a message lost too often).
                views[-1], status = recorded_view(step.name, step.title, latest), "failed"
                break
            if task_id is None:
                continue
            meta = self._meta(task_id)
            celery_state, info = meta.get("status", "PENDING"), meta.get("result")
            if celery_state == "SUCCESS" and isinstance(info, dict):
                latest = info  # The state after this step: what the next steps build on.
                self.state = latest
                views[-1] = recorded_view(step.name, step.title, latest)
            elif celery_state in ("FAILURE", "REVOKED"):
                view.state, view.detail = "failed", _error(info) if celery_state == "FAILURE" else "revoked"
                status = "failed"
                break
            elif celery_state in LIVE:
                view.state = "running" if celery_state != "RETRY" else "retrying"
                self._started.setdefault(step.name, time.monotonic())
                view.seconds = time.monotonic() - self._started[step.name]
                view.detail = _progress(info) if celery_state == "PROGRESS" else ""
                worker = str(meta.get("worker") or (info or {}).get("hostname") or "")
                if celery_state != "RETRY" and worker and self._worker_dead(worker):
                    view.detail = self._resubmit(step.name, f"worker {worker} died")
                break
            else:
                view.state = "queued"
                if self._message_lost(step.name, task_id):
                    view.detail = self._resubmit(step.name, "its queued message was lost", lost=True)
                    if self.state["steps"][step.name].get("state") == FAILED:
                        view.state, status = "failed", "failed"
                break
        if all(v.state == "done" for v in views):
            status = "succeeded"
        return views, status

    def _cancelled(self) -> State | None:
        """The stored state, once a look (one per ``ping_every_s``) finds the pipeline cancelled since this attempt."""
        now = time.monotonic()
        if now - self._last_look.get("cancelled", -self.ping_every_s) < self.ping_every_s:
            return None
        self._last_look["cancelled"] = now
        try:
            stored = load_state(self.store, self.pipeline_id)
        except DependencyUnavailable:
            return None  # Object storage is unreachable: no news.
        newer = int(stored.get("attempt", 0)) > int(self.state.get("attempt", 0))
        return stored if newer and stored.get("cancelled") else None

    def _message_lost(self, step: str, task_id: str) -> bool:
        """Whether, at each of the last ``missed_pings_allowed`` looks (one per ``ping_every_s``), the broker held
        no message of the step's task while its queue's consumers were idle (a busy one may hold a message it has
        popped but not read; several looks: a consumer takes a message off its list a moment before it records it
        as unacknowledged)."""
        now = time.monotonic()
        if now - self._last_look.get(task_id, -self.ping_every_s) < self.ping_every_s:
            return False
        self._last_look[task_id] = now
        queue = queue_for(STEP_TASK[step]).value
        unseen = f"message:{task_id}"
        try:
            held = message_held(broker_client(str(self.app.conf.broker_url)), queue, task_id)
        except (redis.RedisError, ValueError):
            return False  # The broker is unreachable (or not Redis): no evidence about the message.
        if held:
            self._missed[unseen] = 0
            return False
        if not self._consumers_idle(queue):
            return False  # No evidence either way.
        self._missed[unseen] = self._missed.get(unseen, 0) + 1
        return self._missed[unseen] >= self.missed_pings_allowed

    def _consumers_idle(self, queue: str) -> bool:
        """Whether every live worker consuming ``queue`` answers that it runs nothing (none alive: nothing can hold
        a message of the queue outside the broker)."""
        try:
            replies = self.app.control.inspect(timeout=1.0).active_queues() or {}
            consumers = [w for w, queues in replies.items() if any(q.get("name") == queue for q in queues or [])]
            if not consumers:
                return True
            active = self.app.control.inspect(destination=consumers, timeout=2.0, limit=len(consumers)).active()
        except Exception:
            return False  # The broker is unreachable: no evidence.
        return set(active or {}) == set(consumers) and not any((active or {}).values())

    def _resubmit(self, step: str, why: str, lost: bool = False) -> str:
        """Resubmit the chain from ``step`` (unless the pipeline was cancelled or resubmitted elsewhere meanwhile:
        then follow that); returns what happened, for the step's view."""
        known = int(self.state.get("attempt", 0))

        def count_loss(stored: State) -> State:
            if stored.get("cancelled") or int(stored.get("attempt", 0)) != known:
                raise Superseded(self.pipeline_id)
            losses = {**(stored.get("lost_messages") or {})}
            losses[step] = int(losses.get(step, 0)) + 1
            stored["lost_messages"] = losses
            if losses[step] > self.lost_resubmissions_allowed:
                queue = queue_for(STEP_TASK[step]).value
                error = f"its message was lost {losses[step]} times: see the {queue} workers' logs (one discarding it?)"
                stored["steps"][step] = {**stored["steps"][step], "state": FAILED, "error": error}
            return stored

        try:
            if lost:
                stored = update_state(self.store, self.pipeline_id, count_loss, state_lock(self.app))
                if stored["steps"][step]["state"] == FAILED:
                    self.state = stored
                    return str(stored["steps"][step]["error"])
            else:
                stored = load_state(self.store, self.pipeline_id)
            resubmitted = submit(self.app, self.store, stored, from_step=step, expect_attempt=known)
        except Superseded:
            self.state = load_state(self.store, self.pipeline_id)
            return f"{why}; cancelled or resubmitted elsewhere meanwhile"
        self.resubmissions.append({"step": step, "why": why, "attempt": known})
        self._started.pop(step, None)
        self.state = resubmitted
        return f"{why}; resubmitted from this step"

    def wait(self, timeout_s: float | None = None, interval_s: float = 1.0, on_poll: Any = None) -> str:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            views, status = self.poll()
            if on_poll is not None:
                on_poll(views, status)
            if status != "running":
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"pipeline {self.pipeline_id} still running after {timeout_s} s")
            time.sleep(interval_s)


def recorded_view(name: str, title: str, state: State) -> StepView:
    """A step as its pipeline's stored state records it."""
    recorded = state["steps"][name]
    if recorded.get("state") == DONE:
        return StepView(name, title, "done", describe(name, recorded.get("outputs") or {}), step_seconds(recorded))
    return StepView(name, title, str(recorded.get("state", "pending")), str(recorded.get("error") or ""))


def summary(state: State) -> str:
    """A pipeline's state in a few words: finished, cancelled, failed at a step, or the step it is at."""
    if state.get("cancelled"):
        return f"cancelled: {state['cancelled'].get('why', '')}"
    step = first_unfinished(state)
    if step is None:
        return "finished"
    recorded = state["steps"][step]
    return f"{recorded.get('state', 'pending')} at {step}"


def step_seconds(step: dict[str, Any]) -> float | None:
    if step.get("started_ms") and step.get("finished_ms"):
        return (int(step["finished_ms"]) - int(step["started_ms"])) / 1000
    return None


def _error(info: Any) -> str:
    if isinstance(info, dict):
        return f"{info.get('exc_type', 'error')}: {info.get('exc_message', info)}"
    return str(info)


def _progress(info: Any) -> str:
    """A trainer task's PROGRESS meta: step/total, loss, tokens per second."""
    if not isinstance(info, dict):
        return ""
    parts = []
    if info.get("total_steps"):
        parts.append(f"step {info.get('step', 0)}/{info['total_steps']}")
    if info.get("loss") is not None:
        parts.append(f"loss {float(info['loss']):.3f}")
    if info.get("tokens_per_second"):
        parts.append(f"{float(info['tokens_per_second']):,.0f} tok/s")
    if info.get("run_id"):
        parts.append(str(info["run_id"]))
    return " · ".join(parts)


def download_report(store: ObjectStore, eval_run_id: str, folder: Path) -> tuple[str, list[Path]]:
    """An evaluation run's report.md, with report.json and its plots saved into ``folder``."""
    prefix = f"{run_prefix(eval_run_id)}/report"
    folder.mkdir(parents=True, exist_ok=True)
    markdown = store.get_bytes(Bucket.MODELS, f"{prefix}/report.md").decode()
    (folder / "report.md").write_text(markdown, encoding="utf-8")
    store.get_file(Bucket.MODELS, f"{prefix}/report.json", folder / "report.json")
    plots = []
    for key in store.list_keys(Bucket.MODELS, f"{prefix}/plots/"):
        if key.endswith(".png"):
            plots.append(store.get_file(Bucket.MODELS, key, folder / "plots" / Path(key).name))
    return markdown, plots
