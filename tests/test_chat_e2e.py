"""A chat session end to end: real FER and chat gRPC servers, SmolLM2 offline, Redis, S3, a chat worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_chat.main import build_app as build_chat
from emili_chat.settings import ChatSettings
from emili_core.grpc_client import make_channel
from emili_core.grpc_server import start_server
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import REPO_ROOT
from emili_fer.main import build_app as build_fer
from emili_fer.settings import FerSettings
from emili_testing.plugin import Stack, token

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FACE = REPO_ROOT / "var" / "artifacts" / "samples" / "face_640x480.jpg"
MODEL = REPO_ROOT / "var" / "artifacts" / "chat" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def chat_worker(stack: Stack, tmp_path: Path) -> AsyncIterator[subprocess.Popen[bytes]]:
    env = {**os.environ, **stack.env(), "EMILI_CHAT__WORKER__METRICS_PORT": "0"}
    log = tmp_path / "chat-worker.log"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "emili-chat-worker")],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield process
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)


async def test_session_with_a_real_face_and_smollm2(
    stack_env: dict[str, str], object_store: ObjectStore, chat_worker: subprocess.Popen[bytes]
) -> None:
    if not MODEL.exists():
        pytest.fail(f"{MODEL} is missing; run `make setup`")
    fer_settings = FerSettings()
    fer_settings = fer_settings.model_copy(
        update={
            "fer": fer_settings.fer.model_copy(
                update={"server": fer_settings.fer.server.model_copy(update={"grpc_port": 0})}
            )
        }
    )
    fer = await start_server(build_fer(fer_settings), fer_settings, fer_settings.fer.server)
    chat_settings = ChatSettings()
    options = chat_settings.chat.model_copy(
        update={
            "server": chat_settings.chat.server.model_copy(update={"grpc_port": 0}),
            "fer_target": f"127.0.0.1:{fer.port}",
            "llm": chat_settings.chat.llm.model_copy(update={"max_new_tokens": 48}),
        }
    )
    chat_settings = chat_settings.model_copy(update={"chat": options})
    chat = await start_server(build_chat(chat_settings), chat_settings, chat_settings.chat.server)
    try:
        await asyncio.wait_for(asyncio.gather(fer.ready.wait(), chat.ready.wait()), 180)
        target = f"127.0.0.1:{chat.port}"
        face = FACE.read_bytes()
        async with make_channel(target, token(["chat"], subject="alice"), timeout=30) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            session = (
                await stub.CreateSession(
                    chat_pb2.CreateSessionRequest(consent=chat_pb2.Consent(store_frames=True, use_for_training=True))
                )
            ).session
            assert session.model_id.startswith("SmolLM2") and session.state == chat_pb2.SESSION_STATE_ACTIVE
            await stub.SubmitPreSurvey(
                chat_pb2.SubmitPreSurveyRequest(
                    session_id=session.session_id,
                    survey=chat_pb2.Survey(
                        current_feelings=["Tired"], desired_feelings=["Joyful"], text="I feel tired."
                    ),
                )
            )

            async def requests() -> AsyncIterator[chat_pb2.ConverseRequest]:
                yield chat_pb2.ConverseRequest(session_id=session.session_id)
                for _i in range(3):
                    now = int(time.time() * 1000)
                    yield chat_pb2.ConverseRequest(frame=chat_pb2.FaceFrame(jpeg=face, capture_time_ms=now))
                    await asyncio.sleep(0.4)
                yield chat_pb2.ConverseRequest(user_message=chat_pb2.UserMessage(text="I finally finished my thesis!"))

            replies = [r async for r in stub.Converse(requests())]
            kinds = [r.WhichOneof("event") for r in replies]
            readout = next(r.readout for r in replies if r.WhichOneof("event") == "readout")
            # The smiling astronaut reads ~100% happy: EMILI's top level for happy, in capitals.
            assert readout.text == "Right now, user looks ECSTATIC (99)"  # Happy 99.96%, truncated as EMILI does.
            assert kinds.index("readout") < kinds.index("accepted") < kinds.index("delta") < kinds.index("message")
            deltas = "".join(r.delta.text for r in replies if r.WhichOneof("event") == "delta")
            message = next(r.message for r in replies if r.WhichOneof("event") == "message")
            assert message.text and message.text == deltas.strip() and message.model_id.startswith("SmolLM2")

            await stub.SubmitPostSurvey(
                chat_pb2.SubmitPostSurveyRequest(
                    session_id=session.session_id, survey=chat_pb2.Survey(text="Better now.")
                )
            )
            await stub.SubmitRating(
                chat_pb2.SubmitRatingRequest(session_id=session.session_id, empathy=4, relevance=5, fluency=5)
            )
            ended = (await stub.EndSession(chat_pb2.EndSessionRequest(session_id=session.session_id))).session
            assert ended.state == chat_pb2.SESSION_STATE_ENDED
            transcript = await stub.GetTranscript(chat_pb2.GetTranscriptRequest(session_id=session.session_id))
            assert [e.kind for e in transcript.events].count("fer_reading") == 3

        async with make_channel(target, token(["chat"], subject="mallory")) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await chat_pb2_grpc.ChatServiceStub(channel).GetTranscript(
                    chat_pb2.GetTranscriptRequest(session_id=session.session_id)
                )
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # The chat worker persists the record: events, the FER series, the manifest; frames with consent.
        deadline = time.monotonic() + 60
        key = f"{session.session_id}/session.json"
        while not object_store.exists(Bucket.SESSIONS, key):
            assert time.monotonic() < deadline, "the session record never reached object storage"
            await asyncio.sleep(0.5)
        manifest = object_store.get_json(Bucket.SESSIONS, key)
        assert manifest["state"] == "ended" and manifest["counts"]["fer_reading"] == 3
        fer_lines = object_store.get_bytes(Bucket.SESSIONS, f"{session.session_id}/fer.jsonl").decode().splitlines()
        assert [json.loads(line)["probabilities"]["happy"] > 0.9 for line in fer_lines] == [True] * 3
        events = object_store.get_bytes(Bucket.SESSIONS, f"{session.session_id}/events.jsonl").decode().splitlines()
        assert {"pre_survey", "post_survey", "rating", "user_message", "assistant_message"} <= {
            json.loads(line)["kind"] for line in events
        }
        assert len(object_store.list_keys(Bucket.FRAMES, f"{session.session_id}/frames/")) == 3
    finally:
        await chat.stop()
        await fer.stop()
