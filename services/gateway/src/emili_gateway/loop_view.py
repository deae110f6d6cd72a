"""The automatic loop as researchers see it: its phase, every decision it took, and for each candidate the gate's
verdict and the sessions behind it, so that a decision can be traced back to the data it came from.

The loop (``emili_pipeline.loop``) keeps its records in object storage; the gateway only reads them, through
:mod:`emili_session.loop_records` (the keys and their fields), never importing the pipeline. What a decision
leads to:

- its pipeline (``GET /api/v1/loop/pipelines/{id}``): the sessions it was started on, split into training and
  held-out ones, and its steps;
- its candidate (``GET /api/v1/loop/candidates/{version}``): the gate's verdict (each check's estimate,
  interval, n and reason), the pipeline, the version's lineage in the model registry (the sessions it learned
  from, its datasets and parents) and, when the loop gave it a canary, the canary's outcome across the studies it
  ran in.

A loop that has never run is no error: the view says so (``ran`` false) with empty lists.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError, field_validator

from emili_core.errors import FailedPrecondition, InvalidInput, NotFound
from emili_core.objectstore import ObjectStore
from emili_gateway.canary import CanaryGroup
from emili_gateway.studies import StudyEngine
from emili_session import loop_records
from emili_session.registry import check_version, registered_model

M = TypeVar("M", bound=BaseModel)

MAX_CANDIDATES = 20  # Verdicts read for one view of the loop (the newest candidates its history names).
# History fields shown as links; the rest of an entry are its numbers.
_EVENT_FIELDS = ("at_ms", "event", "phase", "candidate", "pipeline_id", "study_id", "studies")


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class LoopEvent(BaseModel):
    """One decision of the loop, as it appended it to its history."""

    at_ms: int | None = None
    event: str = ""
    phase: str | None = None  # The phase the decision led to.
    candidate: str | None = None
    pipeline_id: str | None = None
    studies: list[str] = Field(default_factory=list)  # Where the candidate's canary runs (events that started one).
    numbers: dict[str, Any] = Field(default_factory=dict, description="Everything else the loop recorded")


class GateCheckView(BaseModel):
    name: str
    metric: str = ""
    kind: str = ""
    passed: bool = False
    n: int = 0
    estimate: float | None = None  # candidate - baseline (the candidate's mean for "within").
    ci: tuple[float, float] | None = None
    reason: str = ""
    margin: float | None = None  # What the policy asked (verdicts from before these were kept: None and 0).
    min_n: int = 0
    paired: bool | None = None
    p_value: float | None = None  # An "associated" check's one-sided permutation p-value (its estimate: Spearman).

    @field_validator("estimate", "p_value", mode="before")
    @classmethod
    def _finite_number(cls, value: Any) -> Any:
        return _finite(value)

    @field_validator("ci", mode="before")
    @classmethod
    def _finite_ci(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and any(_finite(v) is None for v in value):
            return None
        return value


class GateVerdictView(BaseModel):
    version: str
    policy: str = ""
    passed: bool = False
    decided_ms: int | None = None
    pipeline_id: str | None = None
    sessions: int | None = None  # How many sessions the candidate's pipeline started from.
    checks: list[GateCheckView] = Field(default_factory=list)


class LoopCandidate(BaseModel):
    """A candidate the loop's history names, with its latest decision and the gate's verdict (None: not judged)."""

    version: str
    latest_event: str = ""
    latest_ms: int | None = None
    pipeline_id: str | None = None
    studies: list[str] = Field(default_factory=list)  # Where its canary ran, when the loop started one.
    verdict: GateVerdictView | None = None


class LoopView(BaseModel):
    ran: bool = Field(description="False until the loop first saved its state: then everything else is empty")
    phase: str = "idle"
    candidate: str | None = None
    pipeline_id: str | None = None
    production: str | None = None  # The version the loop promoted last (None: none yet, the study's own arm).
    sessions: int = 0  # Of the candidate in progress.
    used_sessions: int = 0  # Sessions earlier candidates were built from (never used again).
    events: int = 0  # Decisions in the whole history; ``history`` holds the newest of them.
    history: list[LoopEvent] = Field(default_factory=list, description="Newest first")
    candidates: list[LoopCandidate] = Field(default_factory=list, description="Newest first")


class LoopPipeline(BaseModel):
    pipeline_id: str
    baseline: str | None = None  # The production arm its candidate was compared with.
    created_ms: int | None = None
    updated_ms: int | None = None
    sessions: list[str] = Field(default_factory=list)
    train_sessions: list[str] = Field(default_factory=list)
    heldout_sessions: list[str] = Field(default_factory=list)
    steps: dict[str, str] = Field(default_factory=dict, description="Step name -> its state")
    models: dict[str, str] = Field(default_factory=dict, description="sft, dpo -> the model version it trained")


class LoopCandidateDetail(BaseModel):
    version: str
    verdict: GateVerdictView | None = None
    pipeline: LoopPipeline | None = None
    registered: bool = False
    lineage_sessions: list[str] = Field(default_factory=list, description="The sessions the version learned from")
    lineage_datasets: list[dict[str, Any]] = Field(default_factory=list)
    lineage_parents: list[str] = Field(default_factory=list)
    studies: list[str] = Field(default_factory=list)  # The studies of its canary, when the loop started one.
    canary: CanaryGroup | None = None  # Its canary across those studies: one decision, pooled numbers.
    history: list[LoopEvent] = Field(default_factory=list, description="The decisions about it, newest first")


class _StateRecord(BaseModel):
    phase: str = "idle"
    pipeline_id: str | None = None
    candidate: str | None = None
    production: str | None = None
    sessions: list[str] = Field(default_factory=list)
    used_sessions: list[str] = Field(default_factory=list)
    history: list[dict[str, Any]] = Field(default_factory=list)


def _parse(model: type[M], raw: Mapping[str, Any], what: str) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'the object'}: {e['msg']}" for e in exc.errors()[:3]
        )
        raise FailedPrecondition(f"{what} is not as the loop writes it ({problems})") from None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def event_view(entry: Mapping[str, Any]) -> LoopEvent:
    at_ms = entry.get("at_ms")
    return LoopEvent(
        at_ms=at_ms if isinstance(at_ms, int) and not isinstance(at_ms, bool) else None,
        event=str(entry.get("event", "")),
        phase=_text(entry.get("phase")),
        candidate=_text(entry.get("candidate")),
        pipeline_id=_text(entry.get("pipeline_id")),
        studies=_studies(entry),
        numbers={k: _finite(v) for k, v in entry.items() if k not in _EVENT_FIELDS},
    )


def _studies(entry: Mapping[str, Any]) -> list[str]:
    """The studies an event names: ``studies``, or ``study_id`` as the loop wrote it before canaries spanned
    studies."""
    listed = entry.get("studies")
    if isinstance(listed, list):
        return [s for s in listed if isinstance(s, str) and s]
    single = _text(entry.get("study_id"))
    return [single] if single else []


def verdict_view(version: str, raw: Mapping[str, Any]) -> GateVerdictView:
    return _parse(GateVerdictView, {**raw, "version": version}, f"the gate's verdict on {version}")


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def pipeline_view(pipeline_id: str, raw: Mapping[str, Any]) -> LoopPipeline:
    steps = _mapping(raw.get("steps"))
    models = {}
    for step in ("sft", "dpo"):
        version = _mapping(_mapping(steps.get(step)).get("outputs")).get("model_version")
        if isinstance(version, str) and version:
            models[step] = version
    kept = ("created_ms", "updated_ms", "sessions", "train_sessions", "heldout_sessions")
    fields: dict[str, Any] = {k: raw[k] for k in kept if raw.get(k) is not None}
    fields["baseline"] = _text(_mapping(raw.get("config")).get("baseline"))
    fields["steps"] = {name: str(_mapping(s).get("state", "")) for name, s in steps.items()}
    return _parse(LoopPipeline, {**fields, "pipeline_id": pipeline_id, "models": models}, f"pipeline {pipeline_id}")


def _newest_first(history: list[dict[str, Any]]) -> list[LoopEvent]:
    return [event_view(e) for e in reversed(history) if isinstance(e, Mapping)]


class LoopReader:
    """Reads the loop's records (object storage) and the canaries (the study engine) for the researcher API."""

    def __init__(self, store: ObjectStore, studies: StudyEngine) -> None:
        self.store, self.studies = store, studies

    async def _s3(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def _state(self) -> _StateRecord | None:
        raw = await self._s3(loop_records.loop_state, self.store)
        return None if raw is None else _parse(_StateRecord, raw, "the loop's state")

    async def _verdict(self, version: str) -> GateVerdictView | None:
        raw = await self._s3(loop_records.gate_verdict, self.store, version)
        return None if raw is None else verdict_view(version, raw)

    async def _listed_verdict(self, version: str) -> GateVerdictView | None:
        try:
            return await self._verdict(version)
        except InvalidInput:  # A name no verdict can have: the view lists the decision without one.
            return None

    async def view(self, limit: int) -> LoopView:
        """The loop's phase, its newest ``limit`` decisions and the gate's verdicts on the candidates they name."""
        state = await self._state()
        if state is None:
            return LoopView(ran=False)
        events = _newest_first(state.history)
        shown = events[:limit]
        candidates: dict[str, LoopCandidate] = {}
        if state.candidate:
            candidates[state.candidate] = LoopCandidate(version=state.candidate, pipeline_id=state.pipeline_id)
        for event in events:  # The whole history, so each candidate gets its pipeline and study.
            if not event.candidate:
                continue
            seen = candidates.setdefault(event.candidate, LoopCandidate(version=event.candidate))
            if not seen.latest_event:
                seen.latest_event, seen.latest_ms = event.event, event.at_ms
            seen.pipeline_id = seen.pipeline_id or event.pipeline_id
            seen.studies = seen.studies or event.studies
        named = {e.candidate for e in shown if e.candidate} | ({state.candidate} if state.candidate else set())
        listed = [c for c in candidates.values() if c.version in named][:MAX_CANDIDATES]
        verdicts = await asyncio.gather(*(self._listed_verdict(c.version) for c in listed))
        for candidate, verdict in zip(listed, verdicts, strict=True):
            candidate.verdict = verdict
            if verdict is not None:
                candidate.pipeline_id = candidate.pipeline_id or verdict.pipeline_id
        return LoopView(
            ran=True,
            phase=state.phase,
            candidate=state.candidate,
            pipeline_id=state.pipeline_id,
            production=state.production,
            sessions=len(state.sessions),
            used_sessions=len(state.used_sessions),
            events=len(events),
            history=shown,
            candidates=listed,
        )

    async def pipeline(self, pipeline_id: str) -> LoopPipeline:
        raw = await self._s3(loop_records.pipeline_record, self.store, pipeline_id)
        if raw is None:
            raise NotFound(f"no pipeline {pipeline_id!r} in object storage (it may not have started yet)")
        return pipeline_view(pipeline_id, raw)

    async def candidate(self, version: str) -> LoopCandidateDetail:
        """Everything behind one candidate: verdict, pipeline and its sessions, lineage, canary, decisions."""
        check_version(version)
        state, verdict = await asyncio.gather(self._state(), self._verdict(version))
        history = [e for e in _newest_first(state.history) if e.candidate == version] if state else []
        try:
            entry: dict[str, Any] | None = await self._s3(registered_model, self.store, version)
        except NotFound:
            entry = None
        current = state is not None and state.candidate == version
        if verdict is None and entry is None and not history and not current:
            raise NotFound(f"the loop has no candidate {version!r}: it is in none of its decisions")
        pipeline_id = next((e.pipeline_id for e in history if e.pipeline_id), None)
        if pipeline_id is None and verdict is not None:
            pipeline_id = verdict.pipeline_id
        if pipeline_id is None and current and state is not None:
            pipeline_id = state.pipeline_id
        pipeline = None
        if pipeline_id:
            try:
                raw = await self._s3(loop_records.pipeline_record, self.store, pipeline_id)
            except InvalidInput:  # The loop recorded an id no pipeline can have: there is none to show.
                raw = None
            pipeline = None if raw is None else pipeline_view(pipeline_id, raw)
        lineage = _mapping((entry or {}).get("lineage"))
        studies = next((e.studies for e in history if e.studies), [])
        # Only for a candidate the loop gave a canary: without one, finding that out would look through every study.
        canaries = await self.studies.candidate_canaries(version) if studies else []
        canary = CanaryGroup.of(canaries) if canaries else None
        return LoopCandidateDetail(
            version=version,
            verdict=verdict,
            pipeline=pipeline,
            registered=entry is not None,
            lineage_sessions=sorted(str(s) for s in lineage.get("sessions") or []),
            lineage_datasets=[d for d in lineage.get("datasets") or [] if isinstance(d, Mapping)],
            lineage_parents=[str(p) for p in lineage.get("parents") or []],
            studies=studies,
            canary=canary,
            history=history,
        )
