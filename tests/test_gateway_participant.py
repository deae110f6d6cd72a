"""Simulated participants (emili_pipeline.simulator.gateway_participant) against a real gateway over real sockets.

The gateway runs under uvicorn in a thread (HTTP and the conversation WebSocket as a browser meets them), chat is
the real gRPC server with a scripted model, FER a stand-in that finds a face in every frame; Redis and S3 are the
repository's fixtures. Here, not in libs/pipeline/tests: the pipeline library must not import the gateway.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import uvicorn
import yaml

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_core.keys import model_registry_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import AuthSettings, S3Settings
from emili_gateway.app import create_app
from emili_gateway.canary import CanaryMonitor
from emili_gateway.metrics import gateway_metrics
from emili_gateway.settings import CanarySettings, GatewaySettings
from emili_gateway.studies import StudyEngine
from emili_pipeline.gate import Evidence
from emili_pipeline.loop import Loop, LoopPolicy, RedisLease
from emili_pipeline.loop_actions import SystemActions
from emili_pipeline.simulator.faces import FaceModelSettings, FaceSet
from emili_pipeline.simulator.gateway_participant import NotSynthetic, run_participant, websocket_url
from emili_pipeline.simulator.personas import load_personas
from emili_pipeline.simulator.run import SimulatorSettings
from emili_pipeline.study_sim import ScopedStateStore
from emili_testing.chat import ScriptedBackend
from emili_testing.plugin import TEST_SECRET, free_port, token
from emili_testing.servers import chat_and_fer

pytestmark = pytest.mark.integration

REPLY = "I hear you. What would make today a little better?"
# A candidate whose replies the simulated users' hidden state takes badly (dismissive, unasked-for advice).
HARMFUL_VERSION = "sft-gwharmful0001"
HARMFUL = "Whatever, just get over it. You should stop complaining."


def _admin_headers() -> dict[str, str]:
    """A fresh admin token per use: a module-level one expires before a long test run reaches this module."""
    return {"Authorization": f"Bearer {token(['admin'], 'researcher-1')}"}


SETTINGS = SimulatorSettings(turns=2, seconds_between_turns=0.0, frames_per_second=2.0, linger_s=0.0)


@dataclass
class Gateway:
    url: str
    chat_target: str


@pytest.fixture(scope="module")
def gateway(redis_url: str, s3_settings: S3Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    artifacts = tmp_path_factory.mktemp("chat")
    backend = ScriptedBackend(REPLY, by_adapter={HARMFUL_VERSION: HARMFUL})
    with chat_and_fer(redis_url, s3_settings, artifacts, backend) as servers:
        auth = AuthSettings(secret=TEST_SECRET)  # type: ignore[arg-type]
        settings = GatewaySettings(env="test", redis_url=redis_url, s3=s3_settings, auth=auth)
        base = settings.gateway
        options = base.model_copy(
            update={
                "chat_target": servers.chat_target,
                "fer_target": servers.fer_target,
                "server": base.server.model_copy(update={"metrics_port": 0}),
                # Every participant redeems from 127.0.0.1; the canary's monitor is not needed to count participants.
                "limits": base.limits.model_copy(update={"redeem_per_minute": 100000, "requests_per_minute": 100000}),
                "canary": base.canary.model_copy(update={"monitor": False}),
            }
        )
        port = free_port()
        config = uvicorn.Config(
            create_app(settings.model_copy(update={"gateway": options})),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        yield Gateway(f"http://127.0.0.1:{port}", servers.chat_target)
        server.should_exit = True
        thread.join(30)


def _admin(gateway: Gateway, method: str, path: str, **kwargs: Any) -> Any:
    response = httpx.request(method, f"{gateway.url}/api/v1{path}", headers=_admin_headers(), timeout=30, **kwargs)
    assert response.is_success, response.text
    return response.json()


def _study(gateway: Gateway, **changes: Any) -> tuple[str, str]:
    spec = {"name": "Simulated", "arms": [{"arm": "base"}], "consent_text": "Simulated users only.", "max_turns": 2}
    study_id = _admin(gateway, "POST", "/studies", json=spec | changes)["study_id"]
    invite = _admin(gateway, "POST", f"/studies/{study_id}/invites", json={"max_uses": 100})["invites"][0]["code"]
    return study_id, invite


def _faces() -> FaceSet:
    crops = np.random.default_rng(0).integers(0, 255, size=(2, 48, 48), dtype=np.uint8)
    return FaceSet("test", {"happy": crops, "neutral": crops}, FaceModelSettings())


async def _participant(gateway: Gateway, invite: str, seed: int, faces: FaceSet | None = None) -> Any:
    persona = load_personas()[seed % 3]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        return await run_participant(http, invite, persona, SETTINGS, seed, faces=faces)


def test_websocket_url() -> None:
    assert websocket_url("http://h:8080", "s1") == "ws://h:8080/api/v1/sessions/s1/converse"
    assert websocket_url("https://h/emili/", "s1") == "wss://h/emili/api/v1/sessions/s1/converse"


async def test_a_study_not_recording_synthetic_sessions_is_refused_before_any_session(gateway: Gateway) -> None:
    study_id, invite = _study(gateway)
    with pytest.raises(NotSynthetic):
        await _participant(gateway, invite, 0)
    assert _admin(gateway, "GET", f"/studies/{study_id}/progress")["sessions"] == 0


async def test_a_participant_takes_part_as_the_web_app_does(gateway: Gateway) -> None:
    study_id, invite = _study(gateway, synthetic=True)
    outcome = await _participant(gateway, invite, 1, faces=_faces())
    assert outcome.ok, outcome.errors
    assert [t.reply for t in outcome.turns] == [REPLY, REPLY]
    assert len(outcome.accepted_event_ids) == 2 and outcome.frames_sent > 0
    assert set(outcome.ratings) == {"empathy", "relevance", "fluency"}
    progress = _admin(gateway, "GET", f"/studies/{study_id}/progress")
    assert progress["sessions"] == 1 and progress["participants"] == 1
    arm = progress["arms"][0]
    assert (arm["arm"], arm["assigned"], arm["completed"], arm["active"]) == ("base", 1, 1, 0), arm


def _register(store: ObjectStore, version: str) -> None:
    store.put_bytes(Bucket.MODELS, f"adapters/{version}/adapter_config.json", b"{}")
    store.put_json(
        Bucket.MODELS, model_registry_key(version), {"version": version, "adapter_prefix": f"adapters/{version}/"}
    )


async def test_the_canary_allocates_simulated_participants(gateway: Gateway, s3_settings: S3Settings) -> None:
    version = "sft-gwparticipant01"
    store = ObjectStore(s3_settings)
    _register(store, version)
    study_id, invite = _study(gateway, synthetic=True)
    _admin(gateway, "POST", f"/studies/{study_id}/canary", json={"candidate": version, "share": 0.5})
    random.seed(7)  # The canary's draw uses the process's random generator; seeded, 8 participants split.
    outcomes = [await _participant(gateway, invite, seed) for seed in range(8)]
    assert all(o.ok for o in outcomes), [o.errors for o in outcomes]
    canary = _admin(gateway, "GET", f"/studies/{study_id}/canary")
    arms = {a["arm"]: a for a in _admin(gateway, "GET", f"/studies/{study_id}/progress")["arms"]}
    # The candidate stands in for the study's arm: progress assigns its participants there and completes only
    # the production arm's sessions; the canary counts the rest.
    assert 1 <= canary["participants"] < 8 and canary["state"] == "running", canary
    assert list(arms) == ["base"] and arms["base"]["assigned"] == 8, arms
    assert arms["base"]["completed"] + canary["participants"] == 8, (arms, canary)


@dataclass
class ScriptedTraining:
    """The loop's actions with training scripted (each round's candidate is the next of ``candidates``, a registered
    scripted model, with evidence the test's gate passes) and the canary real: the loop's own calls to the gateway."""

    gateway: SystemActions
    candidates: list[str]
    sessions: list[str] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)

    def eligible_sessions(self, include_synthetic: bool) -> list[str]:
        return list(self.sessions)

    def start_pipeline(self, session_ids: Sequence[str], baseline: str) -> str:
        self.baselines.append(baseline)
        return f"pl-scripted-{len(self.baselines)}"

    def pipeline_outcome(self, pipeline_id: str) -> tuple[str, str | None, dict[str, Evidence]]:
        candidate = self.candidates[int(pipeline_id.rsplit("-", 1)[1]) - 1]
        return "done", candidate, {"reply_words": Evidence([12.0] * 4)}

    def start_canary(
        self, candidate: str, production: str, share: float, studies: Sequence[str] | None, synthetic: bool
    ) -> list[str]:
        return self.gateway.start_canary(candidate, production, share, studies, synthetic)

    def canary_outcome(self, candidate: str) -> str:
        return self.gateway.canary_outcome(candidate)


async def test_the_loops_canary_rolls_back_a_harmful_model_and_promotes_an_as_good_one(
    gateway: Gateway, redis_url: str, s3_settings: S3Settings, tmp_path: Path
) -> None:
    """The loop gives each candidate a canary through the gateway; simulated participants rate what the scripted
    models say; the gateway's monitor decides on their sessions, and the loop acts on the decision: a rolled back
    candidate changes nothing, a promoted one becomes the production arm the next candidate is compared with."""
    store = ObjectStore(s3_settings)
    as_good = "sft-gwasgood00001"  # The scripted model's usual reply, as the production arm gives.
    for version in (HARMFUL_VERSION, as_good):
        _register(store, version)
    study_id, invite = _study(gateway, synthetic=True)
    gate = tmp_path / "gate.yaml"
    checks = [{"name": "length", "metric": "reply_words", "kind": "within", "low": 3, "high": 120, "min_n": 2}]
    gate.write_text(yaml.safe_dump({"gate": {"name": "scripted", "checks": checks}}))
    # In its own study: the test stack's other studies serve base too.
    policy = LoopPolicy(
        enabled=True, min_new_sessions=2, canary_in="study", study_id=study_id, canary_share=0.5, gate=gate
    )

    def admin_http() -> httpx.Client:
        return httpx.Client(base_url=gateway.url, headers=_admin_headers(), timeout=30)

    actions = ScriptedTraining(SystemActions(store, None, gate, gateway=admin_http), [HARMFUL_VERSION, as_good])
    state_store = ScopedStateStore(store, f"test-loops/{study_id}/state.json")
    lease = RedisLease(redis.Redis.from_url(redis_url), key=f"emili:test-loop:{study_id}")
    loop = Loop(policy, cast(Any, state_store), lease, actions, owner="test")
    # A small planned canary, as the loop demo's: harm may be called after 4 sessions per arm, a promotion after 6.
    options = CanarySettings(min_sessions=4, max_sessions=6, margin=0.75, monitor=False)
    client = aioredis.Redis.from_url(redis_url)
    studies = StudyEngine(GatewaySettings().gateway.studies, client, store)  # The app's, through its Redis and S3.
    monitor = CanaryMonitor(options, studies, gateway_metrics())

    async def round_until_decided(new_sessions: list[str], seeds: range) -> Any:
        actions.sessions += new_sessions
        phases = [(loop.tick() or pytest.fail()).phase for _ in range(3)]
        assert phases == ["training", "gating", "canary"], loop.state().history
        for seed in seeds:
            outcome = await _participant(gateway, invite, seed)
            assert outcome.ok, outcome.errors
            if decided := await monitor.tick():
                after = loop.tick() or pytest.fail()
                assert after.phase == "idle", after.history
                return decided[0], after
        pytest.fail(f"no decision: {_admin(gateway, 'GET', f'/studies/{study_id}/canary')}")

    random.seed(11)  # The canary's draw uses the process's random generator.
    try:
        harmful, state = await round_until_decided(["s-1", "s-2"], range(100, 140))
        assert harmful.state == "rolled_back" and harmful.reason.startswith("harm"), harmful
        rating = harmful.looks[0]
        assert rating.outcome == "rating" and rating.difference is not None and rating.difference < -0.5
        assert (harmful.candidate, harmful.production) == (HARMFUL_VERSION, "base")
        assert state.history[-1]["event"] == "canary rolled back" and state.production is None

        promoted, state = await round_until_decided(["s-3", "s-4"], range(200, 240))
        assert promoted.state == "promoted", promoted
        assert min(promoted.looks[0].n_candidate, promoted.looks[0].n_production) >= options.max_sessions
        assert state.history[-1]["event"] == "canary promoted" and state.production == as_good
    finally:
        await client.aclose()
    # Later newcomers get the promoted version in the study arm's place, and the next candidate is judged against it.
    newcomer = await _participant(gateway, invite, 300)
    assert newcomer.ok and _admin(gateway, "GET", f"/studies/{study_id}/canary")["state"] == "promoted"
    actions.sessions += ["s-5", "s-6"]
    assert (loop.tick() or pytest.fail()).phase == "training" and actions.baselines == ["base", "base", as_good]


async def test_a_synthetic_study_records_synthetic_sessions(gateway: Gateway) -> None:
    _, invite = _study(gateway, synthetic=True)
    outcome = await _participant(gateway, invite, 2)
    assert outcome.ok, outcome.errors
    async with grpc.aio.insecure_channel(gateway.chat_target) as channel:
        reply = await chat_pb2_grpc.ChatServiceStub(channel).GetTranscript(
            chat_pb2.GetTranscriptRequest(session_id=outcome.session_id),
            metadata=(("authorization", f"Bearer {token(['chat'], outcome.user_id)}"),),
        )
    assert reply.session.synthetic


async def test_the_demo_study_is_made_only_where_sessions_are_recorded_synthetic(gateway: Gateway) -> None:
    from emili_pipeline.loop_demo import ensure_demo_study

    async with httpx.AsyncClient(base_url=gateway.url, headers=_admin_headers(), timeout=30) as admin:
        study = await ensure_demo_study(admin, "base")
        assert study is not None
        again = await ensure_demo_study(admin, "base")
    assert again is not None and again.reused and again.study_id == study.study_id
    assert again.invite_code == study.invite_code


async def test_the_demo_sends_participants_until_the_loop_decides(gateway: Gateway) -> None:
    from emili_pipeline.loop import LoopState
    from emili_pipeline.loop_demo import DemoRun, DemoStudy

    study_id, invite = _study(gateway, synthetic=True)
    lines: list[str] = []
    runs: list[DemoRun] = []

    def loop_state() -> LoopState:
        """A loop in its canary phase that promotes once three simulated sessions are done."""
        state = LoopState(phase="canary", candidate="v1")
        if runs and runs[0].tally.ok >= 3:
            state.history.append({"at_ms": int(time.time() * 1000), "event": "canary promoted", "candidate": "v1"})
        return state

    async with httpx.AsyncClient(base_url=gateway.url, headers=_admin_headers(), timeout=30) as admin:
        run = DemoRun(gateway.url, admin, loop_state, load_personas(), SETTINGS, None, report_every_s=0.5, poll_s=0.1)
        run.say = lines.append
        runs.append(run)
        decision, _ = await run.run(DemoStudy(study_id, invite, reused=False), deadline_s=120)
    assert decision is not None and decision["event"] == "canary promoted"
    assert run.tally.ok >= 3 and run.tally.failed == 0 and run.tally.ok == run.tally.started
    assert any("loop canary" in line and "canary: none yet" in line for line in lines), lines
    assert _admin(gateway, "GET", f"/studies/{study_id}/progress")["sessions"] == run.tally.ok
