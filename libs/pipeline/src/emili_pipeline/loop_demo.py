"""``emili loop demo`` (``make loop-demo``): the automatic loop taken from base to a decision on the local stack,
with SIMULATED participants going through the gateway like people.

1. A demo study of simulated participants is created through the gateway's admin API (or reused: same name, one
   arm, the policy's production arm), with ``synthetic: true`` so that every session of it is recorded as
   synthetic, and an invite of many uses.
2. The loop process runs the demo policy with that study's id: the copy is written to ``var/run`` and the stack
   updated, so ``emili loop run`` (re)starts with it.
3. Simulated participants (:mod:`emili_pipeline.simulator.gateway_participant`) redeem the invite and take part,
   a few at a time (one while the loop trains or gates: the two cores are the trainer's then), until the loop
   records a decision on a candidate: the gate failed, the canary promoted it, or the canary rolled it back (or the
   pipeline failed; a round whose sessions gave nothing to train on is not a decision: the loop waits for more
   sessions and the demo with it). Progress is printed as it goes: the loop's phase, sessions, the canary's counts
   per arm.

A gateway that cannot record a study's sessions as synthetic gets no simulated participant (they would pass for
people): the demo then says so, runs the loop without a study (candidates stop after the gate) and follows it to
its decision on the sessions already recorded.

Only HTTP to the gateway (admin token) and the loop's stored state are used; no service code is imported.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from emili_core.errors import NotFound
from emili_core.objectstore import Bucket, ObjectStore
from emili_pipeline.loop import NO_CANARY, NO_CANDIDATE, STATE_KEY, LoopPolicy, LoopState
from emili_pipeline.simulator.faces import FaceSet
from emili_pipeline.simulator.gateway_participant import NotSynthetic, run_participant
from emili_pipeline.simulator.personas import Persona, pick
from emili_pipeline.simulator.run import SessionOutcome, SimulatorSettings, user_seed

API = "/api/v1"
STUDY_NAME = "EMILI loop demo (SIMULATED participants)"
CONSENT = (
    "A demonstration of EMILI's automatic loop. Every participant of this study is SIMULATED by the EMILI user "
    "simulator; its sessions are recorded as synthetic and are never counted as people's."
)
INVITE_USES = 100_000  # One invite for every simulated participant of the demo (the gateway's maximum).
INVITE_SECONDS = 7 * 24 * 3600
# The events with which the loop closes a candidate's round: a decision the demo waits for.
DECISIONS = (
    "gate failed",
    NO_CANARY,
    "canary promoted",
    "canary rolled back",
    "canary refused",
)
FAILED_PIPELINE = "pipeline failed"


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


@dataclass
class DemoStudy:
    study_id: str
    invite_code: str
    reused: bool


async def _admin(http: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        return await http.request(method, f"{API}{path}", **kwargs)
    except httpx.HTTPError as exc:
        raise DemoError(f"the gateway at {http.base_url} cannot be reached ({exc}); is the stack up?") from None


def _refused(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", ""))[:400]
    except ValueError:
        return response.text[:400]


async def ensure_demo_study(http: httpx.AsyncClient, production: str) -> DemoStudy | None:
    """The demo study (synthetic, one arm: ``production``) and an invite to it; None when the gateway cannot
    record a study's sessions as synthetic (it refuses the field). ``http`` carries an admin token."""
    listed = await _admin(http, "GET", "/studies")
    if not listed.is_success:
        raise DemoError(f"listing studies: HTTP {listed.status_code} {_refused(listed)}")
    mine = [
        s
        for s in listed.json()["studies"]
        if s["name"] == STUDY_NAME and s.get("synthetic") is True and [a["arm"] for a in s["arms"]] == [production]
    ]
    if mine:
        study, reused = mine[-1], True
    else:
        spec = {
            "name": STUDY_NAME,
            "arms": [{"arm": production, "weight": 1}],
            "consent_text": CONSENT,
            "max_turns": 2,
            "synthetic": True,
        }
        created = await _admin(http, "POST", "/studies", json=spec)
        if created.status_code in (400, 422) and "synthetic" in _refused(created):  # Its StudySpec lacks the field.
            return None
        if created.status_code != 201:
            raise DemoError(f"creating the demo study: HTTP {created.status_code} {_refused(created)}")
        study, reused = created.json(), False
    if study.get("synthetic") is not True:
        return None  # A gateway that dropped the field silently: its sessions would not be synthetic.
    study_id = study["study_id"]
    now_ms = int(time.time() * 1000)
    invites = await _admin(http, "GET", f"/studies/{study_id}/invites")
    usable = [
        i
        for i in (invites.json()["invites"] if invites.is_success else [])
        if i["uses"] < i["max_uses"] - 1000 and i["expires_ms"] > now_ms + 24 * 3600 * 1000
    ]
    if usable:
        return DemoStudy(study_id, usable[-1]["code"], reused)
    body = {"count": 1, "max_uses": INVITE_USES, "expires_in_seconds": INVITE_SECONDS}
    made = await _admin(http, "POST", f"/studies/{study_id}/invites", json=body)
    if made.status_code != 201:
        raise DemoError(f"an invite to {study_id}: HTTP {made.status_code} {_refused(made)}")
    return DemoStudy(study_id, made.json()["invites"][0]["code"], reused)


def write_runtime_policy(policy: LoopPolicy, study_id: str, target: Path, source: Path | None = None) -> Path:
    """The policy the loop process runs: ``policy`` (paths already absolute, read from ``source``) with the demo
    study's id."""
    data = policy.model_copy(update={"study_id": study_id}).model_dump(mode="json")
    target.parent.mkdir(parents=True, exist_ok=True)
    origin = f" from {source}: edit that one" if source is not None else ""
    header = f"# Written by `emili loop demo`{origin}.\n"
    target.write_text(header + yaml.safe_dump({"loop": data}, sort_keys=False))
    return target


def read_state(store: ObjectStore) -> LoopState:
    try:
        return LoopState.model_validate(store.get_json(Bucket.MODELS, STATE_KEY))
    except NotFound:
        return LoopState()


def decision_after(state: LoopState, since_ms: int) -> dict[str, Any] | None:
    """The first decision on a candidate the loop recorded at or after ``since_ms``."""
    for entry in state.history:
        if int(entry.get("at_ms", 0)) >= since_ms and entry.get("event") in (*DECISIONS, FAILED_PIPELINE):
            return entry
    return None


@dataclass
class Tally:
    started: int = 0
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)

    def add(self, outcome: SessionOutcome) -> None:
        if outcome.session_id:
            self.sessions.append(outcome.session_id)
        if outcome.ok:
            self.ok += 1
        else:
            self.failed += 1
            self.errors.extend(outcome.errors[:2])


@dataclass
class DemoRun:
    """What the demo drives: the gateway (``gateway_url``; ``admin`` a client with an admin token), the loop's
    stored state (``loop_state`` reads it: :func:`read_state`), the simulated participants' shape."""

    gateway_url: str
    admin: httpx.AsyncClient
    loop_state: Callable[[], LoopState]
    personas: Sequence[Persona]
    simulator: SimulatorSettings
    faces: FaceSet | None
    at_once: int = 2
    seed: int = 0
    report_every_s: float = 30.0
    poll_s: float = 2.0
    say: Callable[[str], None] = print
    tally: Tally = field(default_factory=Tally)

    def participants_wanted(self, phase: str) -> int:
        # Training and evaluation need the two cores: one participant keeps sessions coming without starving them.
        return 1 if phase in ("training", "gating") else self.at_once

    async def _participant(self, http: httpx.AsyncClient, study: DemoStudy, index: int) -> None:
        persona = pick(self.personas, index)
        outcome = await run_participant(
            http, study.invite_code, persona, self.simulator, user_seed(self.seed, index), faces=self.faces
        )
        self.tally.add(outcome)

    async def canary_line(self, study_id: str) -> str:
        response = await _admin(self.admin, "GET", f"/studies/{study_id}/canary")
        if response.status_code == 404:
            return "canary: none yet"
        if not response.is_success:
            return f"canary: HTTP {response.status_code}"
        canary = response.json()
        rating = next((look for look in canary.get("looks", []) if look.get("outcome") == "rating"), None)
        counts = (
            f"rated sessions candidate {rating['n_candidate']} / production {rating['n_production']}"
            if rating
            else "no look yet"
        )
        return (
            f"canary {canary['candidate']}: {canary['state']}, {canary.get('participants', 0)} participants, {counts}"
        )

    async def run(self, study: DemoStudy | None, deadline_s: float) -> tuple[dict[str, Any] | None, LoopState]:
        """Participants until the loop decides on a candidate or ``deadline_s`` passes; (decision, last state)."""
        since_ms = int(time.time() * 1000)
        started = time.monotonic()
        running: set[asyncio.Task[None]] = set()
        index = 0
        last_report = -self.report_every_s
        state = LoopState()
        rounds_without_candidate = 0
        async with httpx.AsyncClient(base_url=self.gateway_url, timeout=60.0) as http:
            try:
                while True:
                    state = await asyncio.to_thread(self.loop_state)
                    decision = decision_after(state, since_ms)
                    if decision is not None or time.monotonic() - started > deadline_s:
                        return decision, state
                    empty = [e for e in state.history if e.get("event") == NO_CANDIDATE and e["at_ms"] >= since_ms]
                    for entry in empty[rounds_without_candidate:]:
                        self.say(f"a round without a candidate ({entry.get('why', '')}); the loop waits for more")
                    rounds_without_candidate = len(empty)
                    for task in [t for t in running if t.done()]:
                        running.discard(task)
                        if isinstance(task.exception(), NotSynthetic):
                            raise DemoError(str(task.exception()))
                        if task.exception() is not None:
                            self.tally.failed += 1
                            self.tally.errors.append(f"{type(task.exception()).__name__}: {task.exception()}")
                    while study is not None and len(running) < self.participants_wanted(state.phase):
                        running.add(asyncio.create_task(self._participant(http, study, index)))
                        index += 1
                        self.tally.started += 1
                    if time.monotonic() - last_report >= self.report_every_s:
                        last_report = time.monotonic()
                        await self.report(state, study, time.monotonic() - started)
                    await asyncio.sleep(self.poll_s)
            finally:
                await self._finish(running)

    async def _finish(self, running: set[asyncio.Task[None]]) -> None:
        """Participants under way finish their sessions (a minute at most), so none is left half done."""
        if running:
            self.say(f"waiting for the {len(running)} participant(s) under way to finish")
            _, pending = await asyncio.wait(running, timeout=90)
            for task in pending:
                task.cancel()

    async def report(self, state: LoopState, study: DemoStudy | None, elapsed_s: float) -> None:
        parts = [
            f"[{elapsed_s / 60:5.1f} min] loop {state.phase}",
            f"candidate {state.candidate or '-'}",
            f"round sessions {len(state.sessions)}",
            f"participants started {self.tally.started}, sessions ok {self.tally.ok}, failed {self.tally.failed}",
        ]
        if study is not None:
            parts.append(await self.canary_line(study.study_id))
        self.say("; ".join(parts))
