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

MAX_LABEL_READS = 16  # Labels read per look: a look stays well within the monitor's lock.
RETIRED_REASON = "retired: people it learned from withdrew their data; it gets no new participant"
PRODUCTION_RETIRED_REASON = "the production arm it was compared with was retired; the study serves its own arm again"
LabelReader = Callable[[str], Awaitable[SessionReactions]]


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidate: str = Field(description="A registered model version the evaluation gate did not reject")
    production: str | None = Field(None, description="The arm it stands in for; default: the study's first arm")
    share: float | None = Field(None, gt=0, le=0.5, description="Share of that arm's new participants it gets")


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
        while True:
            try:
                await self.tick()
            except Exception:  # A Redis or S3 outage: the next tick tries again.
                log.exception("canary monitor: a look failed")
            await asyncio.sleep(self.options.interval_s)

    async def tick(self) -> list[Canary]:
        if not await self.studies.take_lock("canary-monitor", self.options.interval_s * 2):
            return []
        decided = []
        running = await self.studies.running_canaries()
        self._seen = set()
        for canary in running:
            looked = await self.look(canary)
            if looked.state != "running":
                decided.append(looked)
        self._reactions = {k: v for k, v in self._reactions.items() if k in self._seen}
        self.metrics.canaries_running.set(len(running) - len(decided))
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

    async def look(self, canary: Canary) -> Canary:
        if await self.studies.retired(canary.candidate):
            looked = _decided(canary, "rolled_back", RETIRED_REASON)
        elif await self.studies.retired(canary.production):
            looked = _decided(canary, "rolled_back", PRODUCTION_RETIRED_REASON)
        else:
            looked = await self._compare(canary)
        if not await self.studies.save_canary(looked, while_running=True):
            # A researcher rolled it back (or another replica decided) while this look ran: that decision stands, and
            # this look decided nothing (the caller counts only its own decisions).
            log.info("canary %s in %s: decided while looked at; not overwritten", canary.candidate, canary.study_id)
            return canary
        if looked.state != "running":
            self.metrics.canary_decisions.labels(looked.state).inc()
            log.info("canary %s in %s: %s (%s)", canary.candidate, canary.study_id, looked.state, looked.reason)
        return looked

    async def _compare(self, canary: Canary) -> Canary:
        records = await self.studies.study_sessions(canary.study_id)
        idle_before = _now_ms() - self.studies.options.abandoned_after_seconds * 1000
        by_role = {
            role: canary_sessions(records, arm, canary.started_ms)
            for role, arm in (("candidate", canary.candidate), ("production", canary.production))
        }
        arms = [r for rs in by_role.values() for r in rs]
        self._seen.update(r.session_id for r in arms)
        pending = await self.read_labels(arms)
        sessions = {role: sorted(r.session_id for r in rs) for role, rs in by_role.items()}
        return decide(
            self.options,
            canary.model_copy(update={"labels_pending": pending, "sessions": sessions}),
            session_outcomes(records, canary.candidate, canary.started_ms, idle_before, self._reactions),
            session_outcomes(records, canary.production, canary.started_ms, idle_before, self._reactions),
            OUTCOMES if self.labels is not None else RATED_OUTCOMES,
        )
