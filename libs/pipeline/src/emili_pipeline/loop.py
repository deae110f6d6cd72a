"""The loop that runs itself: new sessions -> candidate model -> evaluation gate -> canary -> promote or roll back.

One :class:`Loop` instance acts at a time, whatever the number of processes running it: each tick first takes
(or renews) a Redis lease, atomically, and a process without it does nothing; every write of the state renews it
again first, so a tick that outlived its lease stops before writing over its successor's state. Its state is one
object in storage (``loop/state.json``, bucket models), written before every action that starts something, so a
restarted process carries on where the last one stopped and never starts a second candidate: a pipeline's id is a
digest of its configuration and sessions, so starting it again finds the same pipeline.

Phases, one step per tick:

- ``idle``: when at least ``min_new_sessions`` eligible sessions (recorded, consented to training, not deleted,
  not synthetic unless the policy allows, never a pipeline evaluation's simulated users, of the policy's study
  only when ``sessions_from: study``, not used by an earlier candidate) exist, start a pipeline on every
  eligible session -> ``training``;
- ``training``: wait for the pipeline; its candidate is its last trained version (DPO, else SFT) -> ``gating``;
  a failed pipeline goes back to ``idle`` (its sessions count as used, so a bad batch is not retried forever);
- ``gating``: judge the candidate's evidence with the gate policy; the verdict is stored with the model
  (``gates/<version>.json``); passed -> start a canary -> ``canary``; failed (evidence it cannot read included)
  -> ``idle`` (never served); a canary the gateway refuses for good (the candidate retired meanwhile, another
  canary running in the named study) -> ``idle``, "canary refused", with the gateway's reason;
- ``canary``: wait for the gateway's decision (promoted or rolled back) -> ``idle`` (a canary that is missing,
  because the process stopped before starting it, or because no study could take it yet, is started).

Where the canary runs (``canary_in``; default: ``study`` when the policy names a ``study_id``, else
``running_studies``): in every running study (an invite left) that the production version serves now, as one
experiment whose sessions the gateway pools and decides once for all of them, so the studies never serve different
versions; or only in ``study_id``; or nowhere (candidates stop after the gate). A policy with ``include_synthetic``
(its candidates may learn from simulated sessions) gets canaries only in studies of simulated participants, never in
people's. While no study can take it (none serves the production version, or each runs another canary), the
candidate waits in ``canary``, asked again at every tick, for up to ``max_canary_wait_s``; the round ends sooner when
the production version it was judged against is retired meanwhile.

The production arm: candidates are compared with ``policy.production`` (``base``) until the loop promotes one;
from then on with the promoted version (``LoopState.production``), which the next pipeline gets as its baseline.
When the promoted version is retired (people it learned from withdrew, ``retention.withdrawn_models: retire``), the
idle loop goes back to ``policy.production`` and retrains at once on the sessions that remain. When it is only
marked (``mark``), it keeps serving and, with ``retrain_on_withdrawal``, the idle loop trains its replacement at once
on the sessions that remain, once per withdrawal mark. A candidate whose round a withdrawal ended (retired while
its canary ran, so the gateway rolled it back or refused it) is replaced the same way, once: its data minus the
withdrawn sessions gets the canary the withdrawal took away.

Every transition is appended to the state's history with its numbers, so a decision can be traced back to the
pipeline, its sessions and the verdict.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from emili_core.errors import DependencyUnavailable, NotFound
from emili_core.leases import RELEASE_IF_HELD, TAKE_OR_RENEW
from emili_core.objectstore import Bucket, ObjectStore
from emili_pipeline.config import PipelineConfig
from emili_pipeline.gate import SHIPPED as SHIPPED_GATE
from emili_pipeline.gate import (
    VERDICT_HEADING,
    Evidence,
    GatePolicy,
    Verdict,
    judge,
    load_policy,
    unreadable_evidence,
    verdict_markdown,
)
from emili_pipeline.loop_metrics import loop_metrics
from emili_session.gate_items import SIGNAL_METRIC
from emili_session.loop_records import LOOP_STATE_KEY, gate_key
from emili_session.registry import is_retired, model_withdrawal

log = logging.getLogger(__name__)

STATE_KEY = LOOP_STATE_KEY  # Where the loop's records live is defined once, with their readers (the gateway's).
NO_CANDIDATE = "no candidate"
NO_CANDIDATE_WHY = "the pipeline finished without training a model: no SFT or DPO examples in these sessions"
WAITING = "canary waiting for a study"
NO_CANARY = "gate passed; no canary"
Phase = Literal["idle", "training", "gating", "canary"]


class LoopPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    interval_s: float = Field(300.0, gt=0)
    min_new_sessions: int = Field(50, ge=1)
    include_synthetic: bool = False  # Only simulation studies set it: real candidates learn from people.
    # Where a candidate that passed the gate gets its canary: every running study its production version serves
    # now ("running_studies"), only ``study_id`` ("study"), or nowhere ("none": candidates stop after the gate).
    # Unset: "study" when ``study_id`` is set (what such a policy meant before canaries spanned studies), else
    # "running_studies".
    canary_in: Literal["running_studies", "study", "none"] | None = None
    # How long a candidate that passed the gate waits for a study to take its canary before its round ends.
    max_canary_wait_s: float = Field(7 * 24 * 3600.0, gt=0)
    study_id: str = ""  # The gateway study of ``canary_in: study`` and ``sessions_from: study``.
    # Which sessions candidates learn from: "all" recorded ones, or only those of ``study_id`` ("study"), so that
    # a simulation study's loop does not take other runs' synthetic sessions (with no study_id: none).
    sessions_from: Literal["all", "study"] = "all"
    canary_share: float = Field(0.1, gt=0, le=0.5)
    # What serves the study's production arm before the loop has promoted anything: the first baseline.
    production: str = Field("base", min_length=1)
    gate: Path = SHIPPED_GATE
    pipeline: Path = Path("libs/pipeline/configs/loop.yaml")
    # People the promoted version learned from withdrew, and it was only marked (retention.withdrawn_models: mark):
    # train its replacement without their sessions at once (it keeps serving until a replacement is promoted).
    # A retired one is always replaced at once.
    retrain_on_withdrawal: bool = True

    @model_validator(mode="after")
    def _canary_in_default(self) -> LoopPolicy:
        if self.canary_in is None:
            self.canary_in = "study" if self.study_id else "running_studies"
        return self

    def no_canary(self) -> str | None:
        """Why a candidate that passed the gate gets no canary (it stops there); None: it gets one."""
        if self.canary_in == "none":
            return "canary_in: none"
        if self.canary_in == "study" and not self.study_id:
            return "canary_in: study, and no study_id"
        return None

    def canary_studies(self) -> list[str] | None:
        """The studies to run the canary in; None: every running study the production version serves."""
        return [self.study_id] if self.canary_in == "study" else None

    def canary_where(self) -> str:
        if why := self.no_canary():
            return f"nowhere ({why}): candidates stop after the gate"
        if self.canary_in == "study":
            return f"study {self.study_id}"
        whose = "simulated participants" if self.include_synthetic else "people"
        return f"every running study of {whose} that the production version serves"

    def sessions_study(self) -> str | None:
        """The study eligible sessions must belong to; None: any session, of a study or not."""
        return self.study_id if self.sessions_from == "study" else None


def load_loop_policy(path: Path | str) -> LoopPolicy:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return LoopPolicy.model_validate(raw.get("loop", raw))


class LoopState(BaseModel):
    phase: Phase = "idle"
    pipeline_id: str | None = None
    candidate: str | None = None
    production: str | None = None  # The version the loop promoted last; None: the policy's production arm.
    sessions: list[str] = Field(default_factory=list)  # Of the candidate in progress.
    used_sessions: list[str] = Field(default_factory=list)  # Sessions some earlier candidate was built from.
    # "<version>@<digest of its withdrawn sessions>" of each withdrawal mark on production a replacement was trained
    # for.
    retrained_for: list[str] = Field(default_factory=list)
    history: list[dict[str, Any]] = Field(default_factory=list)


def evidence_ceiling(config: PipelineConfig) -> dict[str, int]:
    """The most items per arm a pipeline's evaluation can give each gate metric, from its config alone: its
    simulated users per arm (Δv, the mean reaction and the negative-reaction rate, one each; negative reactions, one
    per turn) and its contexts
    (up to ``max_examples`` from the held-out sessions and as many from EmpatheticDialogues). MMLU's depend on the
    trainer's copy: not bounded here."""
    users = config.evaluation.users_per_arm
    contexts = 2 * config.evaluation.max_examples
    return {
        "delta_v": users,
        "reaction": users,
        "negative_reaction_rate": users,
        "negative_reaction": users * config.simulator_settings().turns,
        "diff_epitome_mean": contexts,
        "reply_words": contexts,
    }


def undersized_checks(config: PipelineConfig, gate: GatePolicy) -> list[str]:
    """The gate's checks that the pipeline can never give enough evidence for: each fails every candidate."""
    ceiling = evidence_ceiling(config)
    return [
        f"gate {gate.name}, check {check.name}: needs {check.min_n} {check.metric} items per arm, and pipeline "
        f"{config.name} gives at most {ceiling[check.metric]} (evaluation.users_per_arm, simulator turns, "
        "evaluation.max_examples)"
        for check in gate.checks
        if check.metric in ceiling and ceiling[check.metric] < check.min_n
    ]


def short_of_users(policy: LoopPolicy, gate: GatePolicy) -> list[str]:
    """The gate's checks on the pipeline's own users (the label step's :data:`~emili_session.gate_items.SIGNAL_METRIC`)
    that need more users than the policy's ``min_new_sessions`` guarantees: a candidate started at that threshold
    (one user per session at best) fails them for want of evidence until more sessions have come in."""
    return [
        f"gate {gate.name}, check {check.name}: needs {check.min_n} users with a read reaction and both surveys, and "
        f"a candidate is trained once {policy.min_new_sessions} new sessions exist (min_new_sessions)"
        for check in gate.checks
        if check.metric == SIGNAL_METRIC and check.min_n > policy.min_new_sessions
    ]


def unmeasurable_checks(gate: GatePolicy, unmeasurable: Mapping[str, str]) -> list[str]:
    """The gate's checks on a metric the trainer's evaluations cannot measure (``unmeasurable``: metric -> why, the
    trainer's ``GetUnmeasurable``): each fails every candidate for want of evidence."""
    return [
        f"gate {gate.name}, check {check.name}: {check.metric} cannot be measured: {unmeasurable[check.metric]}"
        for check in gate.checks
        if check.metric in unmeasurable
    ]


class LeaseLost(Exception):
    """The instance's lease lapsed during its tick (the tick outlived the lease's TTL) and may belong to another
    instance now: the tick writes nothing more."""


class CanaryRefused(Exception):
    """The gateway refused the candidate's canary for good (the candidate was retired or rejected meanwhile, the
    named study runs another canary, or it no longer exists): asking again would be refused again."""


class NoStudyForCanary(Exception):
    """No study can take the canary now (none is served by the production version, or each runs another canary):
    the candidate waits and asks again."""


class Actions(Protocol):
    """What the loop asks of the rest of the system (the pipeline, the gateway); faked in unit tests."""

    def eligible_sessions(self, include_synthetic: bool) -> list[str]: ...

    def start_pipeline(self, session_ids: Sequence[str], baseline: str) -> str: ...

    def pipeline_outcome(self, pipeline_id: str) -> tuple[str, str | None, dict[str, Evidence]]: ...

    def start_canary(
        self, candidate: str, production: str, share: float, studies: Sequence[str] | None, synthetic: bool
    ) -> list[str]:
        """Start ``candidate``'s canary, standing in for ``production`` (the version the gate judged it against), in
        ``studies`` (None: every running study ``production`` serves now: people's, or with ``synthetic`` (a
        candidate that learned from simulated sessions) only studies of simulated participants);
        returns the studies it runs in. Refused for good (:class:`CanaryRefused`) when a named study serves
        something else; :class:`NoStudyForCanary` when no study can take it now."""

    def canary_outcome(self, candidate: str) -> str:
        """``running``, ``promoted``, ``rolled_back`` (in every study it runs in), or ``missing``."""


class Lease(Protocol):
    def take(self, owner: str, ttl_s: float) -> bool: ...

    def release(self, owner: str) -> None: ...


class RedisLease:
    """A lease in Redis: taken when free, renewed by its owner; it lapses ``ttl_s`` after the owner stops."""

    def __init__(self, client: Any, key: str = "emili:loop:lease") -> None:
        self.client, self.key = client, key

    def take(self, owner: str, ttl_s: float) -> bool:
        return bool(self.client.eval(TAKE_OR_RENEW, 1, self.key, owner, int(ttl_s * 1000)))

    def release(self, owner: str) -> None:
        """Give the lease up if ``owner`` holds it, so a successor acts at once instead of after the TTL."""
        self.client.eval(RELEASE_IF_HELD, 1, self.key, owner)


@dataclass
class Loop:
    policy: LoopPolicy
    store: ObjectStore
    lease: Lease
    actions: Actions
    owner: str = ""

    def __post_init__(self) -> None:
        self.owner = self.owner or secrets.token_hex(8)
        self.gate_policy: GatePolicy = load_policy(self.policy.gate)

    def state(self) -> LoopState:
        try:
            return LoopState.model_validate(self.store.get_json(Bucket.MODELS, STATE_KEY))
        except NotFound:
            return LoopState()

    def _save(self, state: LoopState, event: str, **numbers: Any) -> LoopState:
        # Renewed (or found lost) just before the write: a tick that outlived its lease, e.g. on a pipeline call that
        # hung, must not write over the state of the instance that took the lease over.
        if not self.lease.take(self.owner, self.lease_ttl_s):
            raise LeaseLost(f"loop instance {self.owner} lost its lease during a tick; {event!r} was not saved")
        state.history.append({"at_ms": int(time.time() * 1000), "event": event, "phase": state.phase, **numbers})
        self.store.put_json(Bucket.MODELS, STATE_KEY, state.model_dump(mode="json"))
        log.info("loop: %s (%s)", event, numbers)
        loop_metrics().event(event)
        return state

    def release(self) -> None:
        """Stop acting: the lease goes to the next instance that ticks."""
        self.lease.release(self.owner)

    def baseline(self, state: LoopState) -> str:
        """What the next candidate is compared with: the version promoted last, else the policy's production arm."""
        return state.production or self.policy.production

    @property
    def lease_ttl_s(self) -> float:
        return self.policy.interval_s * 3

    def tick(self) -> LoopState | None:
        """One step of the loop; None when another instance holds the lease, or took it over during the step."""
        if not self.lease.take(self.owner, self.lease_ttl_s):
            return None
        state = self.state()
        step = {"idle": self._idle, "training": self._training, "gating": self._gating, "canary": self._canary}
        try:
            state = step[state.phase](state)
        except LeaseLost as exc:
            log.warning("loop: %s", exc)
            return None
        loop_metrics().in_phase(state.phase)
        return state

    def _idle(self, state: LoopState) -> LoopState:
        used = set(state.used_sessions)
        eligible = self.actions.eligible_sessions(self.policy.include_synthetic)
        if state.production and is_retired(self.store, state.production):
            return self._production_retired(state, eligible)
        if (mark := self._unanswered_withdrawal(state)) and eligible:
            state.retrained_for.append(mark)
            return self._retrain(state, eligible, replaces=state.production)
        if (key := self._candidate_lost_to_withdrawal(state)) and eligible:
            state.retrained_for.append(key)
            return self._retrain(state, eligible, replaces=state.candidate)
        new = [s for s in eligible if s not in used]
        if len(new) < self.policy.min_new_sessions:
            return state
        state.phase, state.sessions = "training", sorted(eligible)
        state.pipeline_id = None
        # Saved before the pipeline starts: a restart sees "training" and never starts another candidate.
        self._save(state, "enough new sessions", new_sessions=len(new), sessions=len(eligible))
        return self._start_pipeline(state)

    def _unanswered_withdrawal(self, state: LoopState) -> str | None:
        """The production version's withdrawal mark (people it learned from withdrew) that no replacement was
        trained for yet, as ``version@digest of its withdrawn sessions``; None when there is none or the policy
        waits for new sessions."""
        if not (self.policy.retrain_on_withdrawal and state.production):
            return None
        mark = model_withdrawal(self.store, state.production)
        if not mark:
            return None
        # Keyed by the withdrawn sessions, not the mark's time: a mark written again with nothing new is no withdrawal.
        sessions = ",".join(sorted(str(s) for s in mark.get("withdrawn_sessions", [])))
        key = f"{state.production}@{hashlib.sha256(sessions.encode()).hexdigest()[:16]}"
        return None if key in state.retrained_for else key

    def _candidate_lost_to_withdrawal(self, state: LoopState) -> str | None:
        """``version@retired`` when the last round's candidate (not the production version) is retired and its round
        ended at the canary (refused or rolled back), and no replacement was trained for it yet; else None. The
        gateway rolls back or refuses a retired candidate, so the withdrawal most likely ended the round; a candidate
        rolled back for harm and retired only later gets a replacement too, which must pass the gate and a canary
        again. A candidate the gate rejected is not replaced: the withdrawal did not end its round."""
        candidate = state.candidate
        if not candidate or candidate == state.production or not state.history:
            return None
        ended = state.history[-1]
        if ended.get("candidate") != candidate or ended.get("event") not in {"canary refused", "canary rolled back"}:
            return None
        key = f"{candidate}@retired"
        if key in state.retrained_for or not is_retired(self.store, candidate):
            return None
        return key

    def _production_retired(self, state: LoopState, eligible: Sequence[str]) -> LoopState:
        """People the promoted version learned from withdrew and it was retired: production goes back to the
        policy's arm (the gateway serves that study arm again), and a replacement is trained at once on the sessions
        that remain (withdrawn ones are no longer eligible), without waiting for new ones."""
        retired, state.production = state.production, None
        self._save(state, "production retired", retired=retired, production=self.baseline(state))
        if not eligible:
            return state
        return self._retrain(state, eligible, replaces=retired)

    def _retrain(self, state: LoopState, eligible: Sequence[str], replaces: str | None) -> LoopState:
        """A replacement for ``replaces``, trained at once on the sessions that remain (withdrawn ones are no
        longer eligible), without waiting for new ones."""
        state.phase, state.sessions, state.pipeline_id = "training", sorted(eligible), None
        self._save(state, "retraining without the withdrawn sessions", sessions=len(eligible), replaces=replaces)
        return self._start_pipeline(state)

    def _start_pipeline(self, state: LoopState) -> LoopState:
        baseline = self.baseline(state)
        state.pipeline_id = self.actions.start_pipeline(state.sessions, baseline)
        return self._save(state, "pipeline started", pipeline_id=state.pipeline_id, baseline=baseline)

    def _training(self, state: LoopState) -> LoopState:
        if state.pipeline_id is None:  # Stopped between saving "training" and starting it: start it now.
            return self._start_pipeline(state)
        outcome, candidate, _ = self.actions.pipeline_outcome(state.pipeline_id)
        if outcome == "running":
            return state
        state.used_sessions = sorted(set(state.used_sessions) | set(state.sessions))
        if outcome != "done":
            state.phase = "idle"
            why = self._pipeline_failure(state.pipeline_id)
            return self._save(state, "pipeline failed", pipeline_id=state.pipeline_id, outcome=outcome, **why)
        if candidate is None:
            # Not a failure: e.g. no reaction was positive enough to flag a turn, so there was nothing to learn from.
            # The next round (new sessions) tries again on every session so far.
            state.phase = "idle"
            return self._save(state, NO_CANDIDATE, pipeline_id=state.pipeline_id, why=NO_CANDIDATE_WHY)
        state.phase, state.candidate = "gating", candidate
        return self._save(state, "candidate trained", candidate=candidate, pipeline_id=state.pipeline_id)

    def _gating(self, state: LoopState) -> LoopState:
        assert state.candidate is not None and state.pipeline_id is not None
        try:
            _, _, evidence = self.actions.pipeline_outcome(state.pipeline_id)
            verdict: Verdict = judge(self.gate_policy, evidence)
        except ValueError as exc:  # Malformed evidence: judged again on every tick, it would stall the loop.
            verdict = unreadable_evidence(self.gate_policy, str(exc))
        record = {
            **verdict.to_json(),
            "version": state.candidate,
            "pipeline_id": state.pipeline_id,
            "sessions": len(state.sessions),
        }
        self.store.put_json(Bucket.MODELS, gate_key(state.candidate), record)
        self._verdict_into_report(state.pipeline_id, record)
        failed = [c.name for c in verdict.checks if not c.passed]
        no_canary = self.policy.no_canary()
        if not verdict.passed or no_canary:
            state.phase = "idle"
            if not verdict.passed:
                return self._save(state, "gate failed", candidate=state.candidate, failed_checks=failed)
            return self._save(state, NO_CANARY, candidate=state.candidate, why=no_canary)
        state.phase = "canary"
        self._save(state, "gate passed", candidate=state.candidate)
        return self._start_canary(state)

    def _pipeline_failure(self, pipeline_id: str) -> dict[str, str]:
        """The failed step and its error (or the cancel's reason), so the history says what to fix; empty when the
        stored state cannot be read (the failure is recorded either way)."""
        from emili_pipeline.pipeline import failure, load_state

        try:
            return failure(load_state(self.store, pipeline_id))
        except (NotFound, DependencyUnavailable, KeyError, TypeError) as exc:
            log.warning("loop: why pipeline %s failed cannot be read: %s", pipeline_id, exc)
            return {}

    def _verdict_into_report(self, pipeline_id: str, record: dict[str, Any]) -> None:
        """The verdict into the candidate's evaluation report: ``report.json`` gets ``gate_verdict`` and
        ``report.md`` a section (replaced when judged again), so the report reads with its decision. A report that
        cannot be found or written is logged; the verdict itself is already stored with the model."""
        from emili_pipeline.pipeline import load_state, outputs

        try:
            prefix = outputs(load_state(self.store, pipeline_id), "evaluate").get("report_prefix")
            if not prefix:
                return
            report = self.store.get_json(Bucket.MODELS, f"{prefix}/report.json")
            markdown = self.store.get_bytes(Bucket.MODELS, f"{prefix}/report.md").decode()
            before = markdown.split(f"\n{VERDICT_HEADING}\n", 1)[0].rstrip("\n")
            self.store.put_json(Bucket.MODELS, f"{prefix}/report.json", {**report, "gate_verdict": record})
            section = f"{before}\n\n{verdict_markdown(record)}".encode()
            self.store.put_bytes(Bucket.MODELS, f"{prefix}/report.md", section, content_type="text/markdown")
        except (NotFound, DependencyUnavailable, ValueError, TypeError, AttributeError) as exc:
            # An outage, or a report of another shape: the decision must not wait on it.
            log.warning("loop: the verdict on pipeline %s could not go into its report: %s", pipeline_id, exc)

    def _start_canary(self, state: LoopState) -> LoopState:
        try:
            studies = self.actions.start_canary(
                str(state.candidate),
                self.baseline(state),
                self.policy.canary_share,
                self.policy.canary_studies(),
                self.policy.include_synthetic,
            )
        except CanaryRefused as exc:
            # The round ends (retrying would stall the loop on the same refusal); new sessions start the next one.
            state.phase = "idle"
            return self._save(state, "canary refused", candidate=state.candidate, why=str(exc))
        except NoStudyForCanary as exc:
            return self._wait_for_a_study(state, str(exc))
        return self._save(state, "canary started", candidate=state.candidate, studies=studies)

    def _wait_for_a_study(self, state: LoopState, why: str) -> LoopState:
        """No study can take the canary now: wait in "canary" and ask again next tick (recorded once), unless the
        version it was judged against is retired (the idle loop then goes back to the policy's production arm and
        retrains) or it has waited ``max_canary_wait_s``."""
        if state.production and is_retired(self.store, state.production):
            state.phase = "idle"
            why = f"the production version {state.production} it was judged against was retired while it waited"
            return self._save(state, "canary refused", candidate=state.candidate, why=why)
        last = state.history[-1] if state.history else {}
        if (last.get("event"), last.get("candidate")) != (WAITING, state.candidate):
            return self._save(state, WAITING, candidate=state.candidate, why=why)
        waited_s = time.time() - int(last.get("at_ms", 0)) / 1000
        if waited_s > self.policy.max_canary_wait_s:
            state.phase = "idle"
            why = f"no study took its canary in {waited_s / 3600:.1f} h (max_canary_wait_s); last: {why}"
            return self._save(state, "canary refused", candidate=state.candidate, why=why)
        return state

    def _canary(self, state: LoopState) -> LoopState:
        assert state.candidate is not None
        outcome = self.actions.canary_outcome(state.candidate)
        if outcome == "missing":  # Stopped between saving "canary" and starting it.
            return self._start_canary(state)
        if outcome == "running":
            return state
        state.phase = "idle"
        if outcome == "promoted":
            state.production = state.candidate  # The gateway serves it now: the next candidate must beat it.
        return self._save(state, f"canary {outcome.replace('_', ' ')}", candidate=state.candidate)
