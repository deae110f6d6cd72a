"""Canaries: a candidate model version gets a small share of a study's new participants, blinded, and is then
promoted or rolled back on what happened in its sessions.

A canary stands in for one of the study's arms, its *production* arm. While it runs, a new participant whom
allocation gives the production arm goes to the candidate instead with probability ``share`` (they never see
which model they talk to). After every completed session the monitor looks at the two arms' outcomes with the
canary rule (:mod:`emili_affect.canary`, shared with the loop simulation study): an always-valid sequential test
rolls back at once on harm; with ``max_sessions`` rated per arm and no harm, the candidate is promoted when its
rating is shown not worse than ``margin``, otherwise rolled back.

Outcomes per session: ``rating`` (the mean of the participant's three 1-5 ratings, for rated sessions),
``completed`` (1 when the session ended with a rating, 0 when it was abandoned) and, from the labeler's label of each
finished session whose participant let it be used for training (the label the loop trains on): ``delta_v`` (valence
after minus before, from the surveys) and ``positive_reaction`` (the share of replies whose read reaction was flagged
positive). A finished session whose label cannot be read yet (the labeler down, the record not yet persisted) holds
back a promotion, never a harm decision, until it is read or ``label_grace_s`` has passed.

A promoted candidate takes the production arm's place for every later participant of the study (the study itself
never changes; the gateway maps the arm); a rolled back one gets no new participant. Each decision, with its
numbers and the ids of the sessions it rests on per arm, is kept with the canary (``GET
/api/v1/studies/{id}/canary``, the researcher page) and counted in metrics.

One candidate can run in several studies at once (``POST /api/v1/canaries``: by default every study the production
version serves now): one canary per study, started together and listing each other (``studies``). They are one
experiment: every look pools their sessions, and a decision (the monitor's, or a researcher's rollback in any of them)
is claimed once for the experiment, atomically, before it is written into each study's canary; whichever comes second
gives way. So the studies never end up serving different versions, and a decision is counted once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from emili_affect.canary import OUTCOMES, RATED_OUTCOMES, CanaryState, OutcomeLook, judge
from emili_core.errors import FailedPrecondition, InvalidInput
from emili_gateway.chat_client import SessionReactions
from emili_gateway.models import SessionRecord
from emili_gateway.settings import CanarySettings

log = logging.getLogger(__name__)

LOCK = "canary-monitor"  # One replica's monitor looks at a time.
MAX_LABEL_READS = 16  # Labels read per look: a look stays well within the monitor's lock.
RETIRED_REASON = "retired: people it learned from withdrew their data; it gets no new participant"
PRODUCTION_RETIRED_REASON = "the production arm it was compared with was retired; the study serves its own arm again"
LabelReader = Callable[[str], Awaitable[SessionReactions]]
# What one look decides, recorded alike in each study's canary of an experiment.
DECISION_FIELDS = ("state", "reason", "decided_ms", "looks", "labels_pending", "sessions")


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidate: str = Field(description="A registered model version the evaluation gate did not reject")
    production: str | None = Field(None, description="The arm it stands in for; default: the study's first arm")
    share: float | None = Field(None, gt=0, le=0.5, description="Share of that arm's new participants it gets")


class CanariesRequest(BaseModel):
    """A canary of one candidate in several studies at once, decided together."""

    model_config = ConfigDict(extra="forbid")

    candidate: str = Field(description="A registered model version the evaluation gate did not reject")
    production: str = Field(min_length=1, description="The version it stands in for: what the gate judged it against")
    share: float | None = Field(None, gt=0, le=0.5, description="Share of that version's new participants it gets")
    studies: list[str] | None = Field(
        None,
        min_length=1,
        description="The studies it runs in; default: every running study (an invite left) that ``production`` "
        "serves now and that runs no other canary",
    )
    synthetic: bool = Field(
        False,
        description="A candidate that learned from simulated sessions (demos, simulation studies): it runs only in "
        "studies of simulated participants, never in people's",
    )


class Canary(BaseModel):
    study_id: str
    candidate: str
    production: str
    share: float = Field(gt=0, le=0.5)
    state: CanaryState = "running"
    started_ms: int
    started_by: str
    decided_ms: int | None = None
    reason: str = ""
    looks: list[OutcomeLook] = Field(default_factory=list)  # The last look, one per outcome.
    participants: int = 0  # New participants the candidate got while it ran (filled in when read).
    labels_pending: int = 0  # Finished sessions whose label could not be read at the last look.
    # The sessions its last look compared, by role ("candidate", "production"): what its decision rests on.
    sessions: dict[str, list[str]] = Field(default_factory=dict)
    # The studies it was started in together with this one (itself included), pooled and decided as one; empty: a
    # canary of this study alone.
    studies: list[str] = Field(default_factory=list)

    def pooled_studies(self) -> list[str]:
        return self.studies or [self.study_id]

    def same_experiment(self, other: Canary) -> bool:
        return (other.candidate, other.started_ms) == (self.candidate, self.started_ms)

    def with_decision(self, decision: Canary) -> Canary:
        """This study's canary with its experiment's decision (or latest look) in it."""
        return self.model_copy(update={key: getattr(decision, key) for key in DECISION_FIELDS})


class CanaryGroup(BaseModel):
    """A candidate's canary across the studies it runs in: their common state and, per study, its canary."""

    candidate: str
    production: str
    state: CanaryState
    reason: str = ""
    started_ms: int
    decided_ms: int | None = None
    participants: int = 0
    looks: list[OutcomeLook] = Field(default_factory=list)
    sessions: dict[str, list[str]] = Field(default_factory=dict)
    canaries: list[Canary]
    skipped: dict[str, str] = Field(
        default_factory=dict, description="Studies left out when it started (another canary running there), and why"
    )

    @classmethod
    def of(cls, canaries: Sequence[Canary], skipped: Mapping[str, str] | None = None) -> CanaryGroup:
        """The experiment's state: its decision once any of its studies' canaries has it (one decision is claimed for
        all of them, and written into the others at once or at the monitor's next look), else running. Its numbers
        are those of its newest look (the same pooled look in each)."""
        decided = [c for c in canaries if c.state != "running"]
        shown = decided[0] if decided else max(canaries, key=lambda c: sum(look.n_candidate for look in c.looks))
        state = shown.state
        first = canaries[0]
        return cls(
            candidate=first.candidate,
            production=first.production,
            state=state,
            reason=shown.reason if state != "running" else "",
            started_ms=first.started_ms,
            decided_ms=shown.decided_ms if state != "running" else None,
            participants=sum(c.participants for c in canaries),
            looks=shown.looks,
            sessions=shown.sessions,
            canaries=list(canaries),
            skipped=dict(skipped or {}),
        )


def canary_sessions(records: Sequence[SessionRecord], arm: str, since_ms: int) -> list[SessionRecord]:
    """``arm``'s sessions begun since ``since_ms`` (the canary's start: earlier sessions of the production arm met
    another time), withdrawn ones excluded."""
    return [r for r in records if r.arm == arm and r.created_ms >= since_ms and not r.withdrawn]


def labelled(record: SessionRecord) -> bool:
    """Whether the session's outcomes include its label's: finished, and its participant let it be used for training
    (the labeler labels no other session)."""
    return record.state == "ended" and record.use_for_training


def session_outcomes(
    records: Sequence[SessionRecord],
    arm: str,
    since_ms: int,
    idle_before_ms: int,
    reactions: Mapping[str, SessionReactions] | None = None,
) -> dict[str, list[float]]:
    """The outcomes of ``arm``'s finished sessions (:func:`canary_sessions`); ``reactions`` are the labels read so
    far, by session id."""
    mine = canary_sessions(records, arm, since_ms)
    rated = [r for r in mine if r.state == "ended" and r.rated and r.rating]
    abandoned = [r for r in mine if not r.rated and max(r.last_activity_ms, r.created_ms) < idle_before_ms]
    read = [(reactions or {}).get(r.session_id) for r in mine if labelled(r)]
    return {
        "rating": [sum(r.rating.values()) / len(r.rating) for r in rated if r.rating],
        "completed": [1.0] * len(rated) + [0.0] * len(abandoned),
        "delta_v": [x.delta_v for x in read if x is not None and x.delta_v is not None],
        "positive_reaction": [x.positive_reaction for x in read if x is not None and x.positive_reaction is not None],
    }


def decide(
    options: CanarySettings,
    canary: Canary,
    candidate: dict[str, list[float]],
    production: dict[str, list[float]],
    outcomes: Sequence[str] = OUTCOMES,
) -> Canary:
    """The canary after one more look (:func:`emili_affect.canary.judge`): still running, or promoted or rolled back
    with the reason and numbers. ``outcomes``: those compared (the first is the rating), sharing ``alpha`` for harm."""
    verdict = judge(
        options.rule(),
        candidate,
        production,
        outcomes,
        previous_p_harm={look.outcome: look.p_harm for look in canary.looks},
        labels_pending=canary.labels_pending,
    )
    updated = canary.model_copy(update={"looks": list(verdict.looks)})
    return updated if verdict.state == "running" else _decided(updated, verdict.state, verdict.reason)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _decided(canary: Canary, state: CanaryState, reason: str) -> Canary:
    return canary.model_copy(update={"state": state, "reason": reason, "decided_ms": _now_ms()})


def draw_candidate(canary: Canary | None, arm: str, rng: random.Random | None = None) -> str:
    """The arm a new participant gets once allocation chose ``arm``: the candidate for a ``share`` of the
    production arm's participants while its canary runs."""
    if canary is None or canary.state != "running" or arm != canary.production:
        return arm
    return canary.candidate if (rng or random).random() < canary.share else arm


class CanaryMonitor:
    """Looks at every running canary every ``interval_s`` and records its decision; one gateway replica at a time
    (a Redis lock), so two replicas never decide the same canary twice."""

    def __init__(self, options: CanarySettings, studies: Any, metrics: Any, labels: LabelReader | None = None) -> None:
        """``labels`` reads a finished session's label (the labeler's LabelSession); None compares the rating and
        completion only."""
        self.options, self.studies, self.metrics, self.labels = options, studies, metrics, labels
        self._reactions: dict[str, SessionReactions] = {}  # A finished session's label does not change.
        self._seen: set[str] = set()  # Sessions of the canaries looked at in this tick: the cache keeps these only.

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.tick()
                except Exception:  # A Redis or S3 outage: the next tick tries again.
                    log.exception("canary monitor: a look failed")
                await asyncio.sleep(self.options.interval_s)
        finally:
            # Stopped (the replica shuts down): another replica's monitor takes over at once, not after the TTL.
            try:
                await self.studies.release_lock(LOCK)
            except Exception as exc:
                log.warning("canary monitor: could not give up its lock (%s); it lapses on its own", exc)

    async def tick(self) -> list[Canary]:
        """One look at every running canary; the canaries it decided (one per study)."""
        if not await self.studies.take_lock(LOCK, self.options.interval_s * 2):
            return []
        decided: list[Canary] = []
        running = await self.studies.running_canaries()
        experiments: dict[tuple[str, int], list[Canary]] = {}
        for canary in running:
            experiments.setdefault((canary.candidate, canary.started_ms), []).append(canary)
        self._seen = set()
        for members in experiments.values():
            decided += [c for c in await self.look(members) if c.state != "running"]
        self._reactions = {k: v for k, v in self._reactions.items() if k in self._seen}
        self.metrics.canaries_running.set(len(experiments) - len({(c.candidate, c.started_ms) for c in decided}))
        return decided

    async def read_labels(self, records: Sequence[SessionRecord]) -> int:
        """Read the labels of finished sessions not read yet (at most ``MAX_LABEL_READS``); how many are still
        unread and worth waiting for."""
        if self.labels is None:
            return 0
        reader = self.labels
        now = _now_ms()

        def waiting(record: SessionRecord) -> bool:
            finished = max(record.ended_ms, record.last_activity_ms, record.created_ms)
            return now - finished < self.options.label_grace_s * 1000

        missing = [r for r in records if labelled(r) and r.session_id not in self._reactions]
        limit = asyncio.Semaphore(4)

        async def read(record: SessionRecord) -> bool:
            async with limit:
                try:
                    self._reactions[record.session_id] = await reader(record.session_id)
                    return False
                except (FailedPrecondition, InvalidInput) as exc:
                    # Refused for good (no training consent, deleted): the session has no label outcomes.
                    log.warning("canary: session %s cannot be labelled: %s", record.session_id, exc)
                    self._reactions[record.session_id] = SessionReactions(None, None)
                    return False
                except Exception as exc:
                    # Not persisted yet, the labeler down or refusing the gateway's token: asked again at the next
                    # look; waited for until label_grace_s has passed, then left out until it can be read.
                    if waiting(record):
                        return True
                    log.warning(
                        "canary: session %s has no label yet; its outcomes leave it out (%s)", record.session_id, exc
                    )
                    return False

        now_read, later = missing[:MAX_LABEL_READS], missing[MAX_LABEL_READS:]
        pending = sum(await asyncio.gather(*(read(r) for r in now_read)))
        return pending + len(later)

    async def look(self, members: Sequence[Canary]) -> list[Canary]:
        """One look at one experiment: the running canaries of one candidate started together (one per study). A
        decision is claimed for the whole experiment first (:meth:`StudyEngine.claim_decision`; one taken earlier,
        such as a researcher's rollback in one of its studies, stands) and then written into each study's canary."""
        first, elsewhere = members[0], None
        if (decision := await self.studies.experiment_decision(first)) is None:
            if await self.studies.retired(first.candidate):
                decision = _decided(first, "rolled_back", RETIRED_REASON)
            elif await self.studies.retired(first.production):
                decision = _decided(first, "rolled_back", PRODUCTION_RETIRED_REASON)
            elif (elsewhere := await self._decided_elsewhere(first, members)) is not None:
                # Decided in one of its studies without a recorded claim (before claims existed, or the key was lost
                # with Redis): that decision, a rollback first, is the experiment's.
                decision = elsewhere.model_copy(update={"study_id": first.study_id})
            else:
                decision = await self._compare(members)
            if decision.state != "running":
                decision, claimed = await self.studies.claim_decision(decision)
                if claimed and elsewhere is None:  # Counted once, by whoever decided, as soon as it is claimed.
                    self.metrics.canary_decisions.labels(decision.state).inc()
                    where = ", ".join(c.study_id for c in members)
                    log.info("canary %s in %s: %s (%s)", first.candidate, where, decision.state, decision.reason)
        saved = []
        for canary in members:
            mine = canary.with_decision(decision)
            if await self.studies.save_canary(mine, while_running=True):
                saved.append(mine)
            else:
                # Decided while this look ran (its decision was claimed first and is written there): not overwritten.
                log.info("canary %s in %s: decided while looked at; not overwritten", canary.candidate, canary.study_id)
        return saved

    async def _decided_elsewhere(self, first: Canary, members: Sequence[Canary]) -> Canary | None:
        """A canary of the same experiment, in a study not among the running ``members``, that is decided: a
        rollback if there is one, else a promotion."""
        running = {c.study_id for c in members}
        decided = []
        for study_id in first.pooled_studies():
            if study_id in running:
                continue
            other = await self.studies.canary_of(study_id, first.candidate)
            if other is not None and other.same_experiment(first) and other.state != "running":
                decided.append(other)
        return min(decided, key=lambda c: c.state != "rolled_back", default=None)

    async def _compare(self, members: Sequence[Canary]) -> Canary:
        """The experiment's sessions pooled over its studies (sessions of studies whose canary no longer runs, such as
        one promoted at an earlier look of a replica that then stopped, count too)."""
        first = members[0]
        records = [r for study_id in first.pooled_studies() for r in await self.studies.study_sessions(study_id)]
        idle_before = _now_ms() - self.studies.options.abandoned_after_seconds * 1000
        by_role = {
            role: canary_sessions(records, arm, first.started_ms)
            for role, arm in (("candidate", first.candidate), ("production", first.production))
        }
        arms = [r for rs in by_role.values() for r in rs]
        self._seen.update(r.session_id for r in arms)
        pending = await self.read_labels(arms)
        sessions = {role: sorted(r.session_id for r in rs) for role, rs in by_role.items()}
        return decide(
            self.options,
            first.model_copy(update={"labels_pending": pending, "sessions": sessions}),
            session_outcomes(records, first.candidate, first.started_ms, idle_before, self._reactions),
            session_outcomes(records, first.production, first.started_ms, idle_before, self._reactions),
            OUTCOMES if self.labels is not None else RATED_OUTCOMES,
        )
