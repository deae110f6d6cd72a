"""A live conversation against real faults: FER restarted, Redis SIGKILLed and restarted, one stream flooded.

The chat server runs in this process (so the language model can be the scripted one) and talks over gRPC
to a real FER server process and real Redis servers; each test's FER and Redis are its own processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_chat import engine as engine_module
from emili_chat.conversation import FER_UNAVAILABLE_MESSAGE, Conversation
from emili_chat.main import build_app
from emili_chat.settings import ChatSettings
from emili_core.grpc_client import make_channel
from emili_core.grpc_server import RunningServer, start_server
from emili_core.settings import REPO_ROOT
from emili_testing.chat import ScriptedBackend
from emili_testing.plugin import EntryPointProcess, free_port, token

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FACE = REPO_ROOT / "var" / "artifacts" / "samples" / "face_640x480.jpg"
ECSTATIC = "Right now, user looks ECSTATIC (99)"  # The sample face via the real FER model: happy 99.96%, truncated.


# --- helpers ----------------------------------------------------------------------------------------------


async def start_chat(backend: ScriptedBackend, *, fer_target: str = "127.0.0.1:1", **resilience: Any) -> RunningServer:
    """The chat server in this process (settings from the environment: see ``stack_env``)."""
    settings = ChatSettings()
    options = settings.chat.model_copy(
        update={
            "server": settings.chat.server.model_copy(update={"grpc_port": 0}),
            "fer_target": fer_target,
            "readout": settings.chat.readout.model_copy(update={"post_response_reading_s": 0.0}),
            "resilience": settings.chat.resilience.model_copy(update=resilience),
        }
    )
    settings = settings.model_copy(update={"chat": options})
    server = await start_server(build_app(settings, backend), settings, settings.chat.server)
    await asyncio.wait_for(server.ready.wait(), 60)
    return server


async def wait_serving(target: str, process: EntryPointProcess, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    async with grpc.aio.insecure_channel(target) as channel:
        while time.monotonic() < deadline:
            assert process.alive(), process.tail()
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"{target} never became SERVING: {process.tail()}")


class Client:
    """One Converse stream driven step by step: ``send`` puts a request on it, replies collect in ``replies``."""

    def __init__(self, stub: chat_pb2_grpc.ChatServiceStub, session_id: str) -> None:
        self.stub, self.session_id = stub, session_id
        self.requests: asyncio.Queue[chat_pb2.ConverseRequest | None] = asyncio.Queue()
        self.replies: list[chat_pb2.ConverseResponse] = []
        self.error: grpc.aio.AioRpcError | None = None
        self.task = asyncio.create_task(self._run())

    async def _requests(self) -> AsyncIterator[chat_pb2.ConverseRequest]:
        yield chat_pb2.ConverseRequest(session_id=self.session_id)
        while (request := await self.requests.get()) is not None:
            yield request

    async def _run(self) -> None:
        try:
            async for reply in self.stub.Converse(self._requests()):
                self.replies.append(reply)
        except grpc.aio.AioRpcError as exc:
            self.error = exc

    def say(self, text: str) -> None:
        self.requests.put_nowait(chat_pb2.ConverseRequest(user_message=chat_pb2.UserMessage(text=text)))

    def of(self, kind: str) -> list[Any]:
        return [getattr(r, kind) for r in self.replies if r.WhichOneof("event") == kind]

    async def wait_for(self, kind: str, count: int, limit_s: float = 30) -> Any:
        deadline = time.monotonic() + limit_s
        while len(self.of(kind)) < count:
            if self.task.done():
                raise AssertionError(f"the stream ended ({self.error}) before {count} {kind}: {self.replies}")
            assert time.monotonic() < deadline, f"no {kind} #{count} in {limit_s} s: {self.replies}"
            await asyncio.sleep(0.05)
        return self.of(kind)[count - 1]

    async def close(self) -> None:
        self.requests.put_nowait(None)
        await asyncio.wait_for(self.task, 30)


async def transcript_kinds(stub: chat_pb2_grpc.ChatServiceStub, session_id: str) -> list[chat_pb2.TranscriptEvent]:
    return list((await stub.GetTranscript(chat_pb2.GetTranscriptRequest(session_id=session_id))).events)


# --- (a) FER restarted mid-conversation ---------------------------------------------------------------------


async def test_fer_restart_is_a_recorded_gap_not_no_face(stack_env: dict[str, str], tmp_path: Path) -> None:
    fer_port = free_port()
    env = {
        **os.environ,
        **stack_env,
        "EMILI_FER__SERVER__GRPC_PORT": str(fer_port),
        "EMILI_FER__SERVER__METRICS_PORT": "0",
    }
    fer_target = f"127.0.0.1:{fer_port}"
    fer = EntryPointProcess("emili-fer-server", env, tmp_path / "fer-1.log")
    chat = await start_chat(ScriptedBackend(), fer_target=fer_target, fer_reconnect_max_s=1.0)
    face = FACE.read_bytes()
    sending = True

    async def frames(client: Client) -> None:
        while sending:
            now = int(time.time() * 1000)
            client.requests.put_nowait(
                chat_pb2.ConverseRequest(frame=chat_pb2.FaceFrame(jpeg=face, capture_time_ms=now))
            )
            await asyncio.sleep(0.25)

    try:
        await wait_serving(fer_target, fer)
        async with make_channel(f"127.0.0.1:{chat.port}", token(["chat"], subject="dana"), timeout=30) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            session_id = (await stub.CreateSession(chat_pb2.CreateSessionRequest())).session.session_id
            client = Client(stub, session_id)
            sender = asyncio.create_task(frames(client))
            await asyncio.sleep(1.5)
            client.say("Look at me now.")
            assert (await client.wait_for("readout", 1)).text == ECSTATIC
            await client.wait_for("message", 1)

            fer.kill()
            await asyncio.sleep(2.5)  # Frames keep coming; nobody reads them.
            client.say("And now?")
            assert (await client.wait_for("readout", 2)).text == FER_UNAVAILABLE_MESSAGE
            await client.wait_for("message", 2)

            fer = EntryPointProcess("emili-fer-server", env, tmp_path / "fer-2.log")
            await wait_serving(fer_target, fer)
            serving = time.monotonic()
            while "fer_restored" not in [e.kind for e in await transcript_kinds(stub, session_id)]:
                assert time.monotonic() - serving < 10, "readings did not resume within 10 s of FER serving again"
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)
            client.say("Better?")
            assert (await client.wait_for("readout", 3)).text == ECSTATIC
            await client.wait_for("message", 3)
            sending = False
            await sender
            await client.close()
            assert client.error is None

            events = await transcript_kinds(stub, session_id)
            kinds = [e.kind for e in events]
            assert kinds.count("fer_unavailable") == 1 and kinds.count("fer_restored") == 1
            down, back = kinds.index("fer_unavailable"), kinds.index("fer_restored")
            last_reading = len(kinds) - 1 - kinds[::-1].index("fer_reading")
            assert kinds.index("fer_reading") < down < back < last_reading  # Readings before, then again after.
            assert "User is not visible right now." not in [
                r.text for r in client.of("readout")
            ]  # The gap never reads as "no face".
            readings = [e for e in events if e.kind == "fer_reading"]
            assert all('"face_found": true' in e.payload_json for e in readings)
    finally:
        sending = False
        await chat.stop()
        fer.kill()


# --- (b) Redis SIGKILLed and restarted mid-conversation -------------------------------------------------------


class RedisServer:
    """A redis-server of this test's own, on a fixed port with an append-only file, killable and restartable."""

    def __init__(self, folder: Path) -> None:
        self.port, self.folder = free_port(), folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        local = Path(sys.executable).parent / "redis-server"
        self.binary = str(local) if local.exists() else shutil.which("redis-server") or "redis-server"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)),
                *("--appendonly", "yes", "--save", ""),
            ],
            stdout=(self.folder / "redis.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, (self.folder / "redis.log").read_text()[-2000:]
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.kill()


async def test_conversation_survives_redis_restarts(
    stack_env: dict[str, str], own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMILI_REDIS_URL", own_redis.url)
    backend = ScriptedBackend("I hear you, tell me more about it.", delta_delay_s=0.1)
    chat = await start_chat(backend, redis_retry_s=3.0)
    try:
        async with make_channel(f"127.0.0.1:{chat.port}", token(["chat"], subject="erin"), timeout=30) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            session_id = (await stub.CreateSession(chat_pb2.CreateSessionRequest())).session.session_id
            client = Client(stub, session_id)
            client.say("First message.")
            await client.wait_for("message", 1)

            # A blip shorter than the retry budget: the same stream carries on.
            own_redis.kill()
            restart = asyncio.create_task(asyncio.sleep(1.0))
            client.say("Said while Redis was down.")
            await restart
            await asyncio.to_thread(own_redis.start)
            second = await client.wait_for("accepted", 2)
            await client.wait_for("message", 2)

            # An outage longer than the budget, mid-reply: the stream fails after the message was acknowledged.
            deltas = len(client.of("delta"))
            client.say("Is anybody there?")
            third = await client.wait_for("accepted", 3)
            await client.wait_for("delta", deltas + 1)
            own_redis.kill()
            await asyncio.wait_for(client.task, 30)
            assert client.error is not None and client.error.code() == grpc.StatusCode.UNAVAILABLE
            assert len(client.of("message")) == 2
            await asyncio.to_thread(own_redis.start)

            # The client reconnects to the same session: the lost reply comes first, unasked.
            resumed = Client(stub, session_id)
            await resumed.wait_for("message", 1)
            await resumed.close()
            assert resumed.error is None

            events = await transcript_kinds(stub, session_id)
            ids = [e.event_id for e in events]
            assert second.event_id in ids and third.event_id in ids  # Nothing acknowledged was lost.
            kinds = [e.kind for e in events]
            assert kinds.count("user_message") == 3 and kinds.count("assistant_message") == 3
            assert kinds[-1] == "assistant_message" and kinds.index("assistant_message") > 0
            # Each user message is followed by its reply.
            order = [k for k in kinds if k in ("user_message", "assistant_message")]
            assert order == ["user_message", "assistant_message"] * 3
    finally:
        await chat.stop()


# --- (c) one stream flooded -----------------------------------------------------------------------------------


async def test_flooding_one_stream_is_refused_and_memory_stays_bounded(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conversations: list[Conversation] = []

    class Recorded(Conversation):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            conversations.append(self)

    monkeypatch.setattr(engine_module, "Conversation", Recorded)
    chat = await start_chat(ScriptedBackend("Slowly, slowly.", delta_delay_s=0.5), inbox_size=8)
    try:
        async with make_channel(f"127.0.0.1:{chat.port}", token(["chat"], subject="fred"), timeout=30) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)

            # A burst just past the bound (one being answered, 8 waiting, more), then the client waits:
            # it hears RESOURCE_EXHAUSTED and why. (A client still writing when the server ends the stream may
            # see its own failed write, INTERNAL, instead: gRPC reports the first failure it meets.)
            session_id = (await stub.CreateSession(chat_pb2.CreateSessionRequest())).session.session_id
            call = stub.Converse()
            await call.write(chat_pb2.ConverseRequest(session_id=session_id))
            with contextlib.suppress(asyncio.InvalidStateError):  # The server may end it before the last write.
                for i in range(12):
                    await call.write(chat_pb2.ConverseRequest(user_message=chat_pb2.UserMessage(text=f"message {i}")))
                await call.done_writing()

            async def drain() -> None:  # gRPC gives the status only once every reply before it was read.
                with contextlib.suppress(grpc.aio.AioRpcError):
                    while await call.read() != grpc.aio.EOF:
                        pass

            await asyncio.wait_for(drain(), 60)
            code = await call.code()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, await call.details())
            assert "messages are already waiting for a reply" in await call.details()

            # A real flood: thousands of messages on one stream. The stream is refused once the inbox is full;
            # the server never holds more than the inbox's bound of them.
            flooded = (await stub.CreateSession(chat_pb2.CreateSessionRequest())).session.session_id
            client = Client(stub, flooded)
            for i in range(5_000):
                client.say(f"message {i}")
            # Then the client is done writing, as in the burst above: a request iterator left waiting for more can
            # keep gRPC's aio client from reporting the status the server already sent (seen once in CI).
            client.requests.put_nowait(None)
            await asyncio.wait_for(client.task, 60)
            assert client.error is not None
            assert client.error.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)

            assert len(conversations) == 2
            for conversation in conversations:
                assert conversation.turns.maxsize == 8 and conversation.inbox_high_water <= 8
            for session in (session_id, flooded):
                kinds = [e.kind for e in await transcript_kinds(stub, session)]
                assert kinds.count("user_message") <= 9  # The inbox and the one being answered.
    finally:
        await chat.stop()
