"""Simulated users against a real chat server (in-process, scripted model) with real Redis and S3."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_chat.main import build_app
from emili_chat.persist import persist_session
from emili_chat.settings import ChatSettings
from emili_core.grpc_client import make_channel
from emili_core.grpc_server import RunningServer, start_server
from emili_core.keys import session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_pipeline.simulator import (
    SimulatorSettings,
    load_personas,
    lost_events,
    run_users,
    summarize,
    transcript_events,
)
from emili_testing.chat import ScriptedBackend
from emili_testing.plugin import token

pytestmark = pytest.mark.integration

REPLIES = (
    "That sounds like a lot. How are you feeling about it now?",
    "I'm sorry, that must be hard.",
    "Whatever, calm down, it's no big deal.",
)


@pytest.fixture
async def chat_server(stack_env: dict[str, str]) -> AsyncIterator[RunningServer]:
    settings = ChatSettings()
    options = settings.chat.model_copy(
        update={
            "server": settings.chat.server.model_copy(update={"grpc_port": 0, "metrics_port": 0}),
            "readout": settings.chat.readout.model_copy(update={"post_response_reading_s": 1.0}),
        }
    )
    settings = settings.model_copy(update={"chat": options})
    backend = ScriptedBackend(REPLIES, delta_delay_s=0.005)
    server = await start_server(build_app(settings, backend), settings, settings.chat.server)
    await asyncio.wait_for(server.ready.wait(), 60)
    yield server
    await server.stop()


async def test_two_simulated_users_lose_nothing_and_are_marked_synthetic(
    chat_server: RunningServer, stack_env: dict[str, str], object_store: ObjectStore
) -> None:
    settings = SimulatorSettings(turns=3, seconds_between_turns=0.3, frames_per_second=4.0, linger_s=1.2)
    target = f"127.0.0.1:{chat_server.port}"
    outcomes = await run_users(
        2, 2, target, load_personas(), settings, seed=5, token_for=lambda subject: token(["chat"], subject)
    )
    summary = summarize(outcomes, 1.0)
    assert summary["ok"] == 2, summary["errors"]
    assert {o.user_id for o in outcomes} == {"sim-5-0", "sim-5-1"}
    redis_client = redis.Redis.from_url(stack_env["EMILI_REDIS_URL"])
    for outcome in outcomes:
        assert len(outcome.turns) == 3 and len(outcome.accepted_event_ids) == 3
        assert all(t.event_id and t.turn_id and t.reply and t.ttft_s is not None for t in outcome.turns)
        assert outcome.readings_sent >= 4 and outcome.readouts >= 3
        assert set(outcome.ratings) == {"empathy", "relevance", "fluency"}

        async with make_channel(target, token(["chat"], outcome.user_id)) as channel:
            transcript = await chat_pb2_grpc.ChatServiceStub(channel).GetTranscript(
                chat_pb2.GetTranscriptRequest(session_id=outcome.session_id)
            )
        assert transcript.session.synthetic and transcript.session.state == chat_pb2.SESSION_STATE_ENDED
        events = transcript_events(transcript)
        assert lost_events(outcome, events) == []
        kinds = [e["kind"] for e in events]
        assert kinds[0] == "session_created" and events[0]["synthetic"] is True
        assert {"pre_survey", "post_survey", "rating", "fer_reading", "post_response_reading"} <= set(kinds)
        assert kinds[-1] == "session_ended"
        readings = [e for e in events if e["kind"] == "fer_reading" and e["face_found"]]
        assert all(sum(e["probabilities"].values()) == pytest.approx(1.0, abs=1e-4) for e in readings)

        # The stored record (what the chat worker writes on EndSession) holds every acknowledged event too.
        persist_session(redis_client, object_store, outcome.session_id)
        keys = session_record_keys(outcome.session_id)
        manifest = object_store.get_json(Bucket.SESSIONS, keys["session.json"])
        assert manifest["synthetic"] is True and manifest["user_id"] == outcome.user_id
        lines = object_store.get_bytes(Bucket.SESSIONS, keys["events.jsonl"]).decode().splitlines()
        assert lost_events(outcome, [json.loads(line) for line in lines]) == []
