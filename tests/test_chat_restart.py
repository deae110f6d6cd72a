"""The chat server as real processes: frames reach FER, and SIGKILL mid-reply loses no acknowledged event."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_core.grpc_client import make_channel
from emili_core.settings import REPO_ROOT
from emili_testing.plugin import EntryPointProcess, Stack, free_port, token

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent
FACE = REPO_ROOT / "var" / "artifacts" / "samples" / "face_640x480.jpg"


class Server(EntryPointProcess):
    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        super().__init__(f"emili-{name}-server", env, log)


async def wait_serving(target: str, server: Server, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    async with grpc.aio.insecure_channel(target) as channel:
        while time.monotonic() < deadline:
            assert server.process.poll() is None, server.log.read_text()[-3000:]
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"{target} never became SERVING: {server.log.read_text()[-3000:]}")


async def test_sigkill_mid_reply_loses_no_acknowledged_event(stack: Stack, tmp_path: Path) -> None:
    fer_port, chat_port = free_port(), free_port()
    env = {
        **os.environ,
        **stack.env(),
        "EMILI_FER__SERVER__GRPC_PORT": str(fer_port),
        "EMILI_FER__SERVER__METRICS_PORT": "0",
        "EMILI_CHAT__SERVER__GRPC_PORT": str(chat_port),
        "EMILI_CHAT__SERVER__METRICS_PORT": "0",
        "EMILI_CHAT__FER_TARGET": f"127.0.0.1:{fer_port}",
        "EMILI_CHAT__READOUT__POST_RESPONSE_READING_S": "0",
    }
    fer = Server("fer", env, tmp_path / "fer.log")
    chat = Server("chat", env, tmp_path / "chat-1.log")
    target = f"127.0.0.1:{chat_port}"
    try:
        await wait_serving(f"127.0.0.1:{fer_port}", fer)
        await wait_serving(target, chat)
        face = FACE.read_bytes()
        async with make_channel(target, token(["chat"], subject="carol"), timeout=30) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            session = (await stub.CreateSession(chat_pb2.CreateSessionRequest())).session

            async def requests() -> AsyncIterator[chat_pb2.ConverseRequest]:
                yield chat_pb2.ConverseRequest(session_id=session.session_id)
                for _ in range(2):
                    now = int(time.time() * 1000)
                    yield chat_pb2.ConverseRequest(frame=chat_pb2.FaceFrame(jpeg=face, capture_time_ms=now))
                    await asyncio.sleep(0.6)
                yield chat_pb2.ConverseRequest(user_message=chat_pb2.UserMessage(text="Guess what happened today?"))
                await asyncio.sleep(60)  # Keep the stream open; the server dies first.

            accepted, readout = None, None
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for reply in stub.Converse(requests()):
                    kind = reply.WhichOneof("event")
                    if kind == "readout":
                        readout = reply.readout.text
                    elif kind == "accepted":
                        accepted = reply.accepted.event_id
                    elif kind == "delta":
                        chat.kill()  # Mid-reply, after the message was acknowledged.
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            assert accepted is not None
            assert readout == "Right now, user looks ECSTATIC (99)"  # Frames went to the FER process.

        chat = Server("chat", env, tmp_path / "chat-2.log")
        await wait_serving(target, chat)
        async with make_channel(target, token(["chat"], subject="carol"), timeout=30) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            transcript = await stub.GetTranscript(chat_pb2.GetTranscriptRequest(session_id=session.session_id))
            by_id = {e.event_id: e for e in transcript.events}
            assert accepted in by_id and by_id[accepted].kind == "user_message"
            assert [e.kind for e in transcript.events].count("fer_reading") == 2
            assert "assistant_message" not in [e.kind for e in transcript.events]  # It died before finishing.

            async def follow_up() -> AsyncIterator[chat_pb2.ConverseRequest]:
                yield chat_pb2.ConverseRequest(session_id=session.session_id)
                yield chat_pb2.ConverseRequest(user_message=chat_pb2.UserMessage(text="Are you still there?"))

            replies = [r async for r in stub.Converse(follow_up())]
            assert any(r.WhichOneof("event") == "message" and r.message.text for r in replies)
    finally:
        chat.kill()
        fer.kill()
