"""The HTTP backends (OpenAI-compatible, Anthropic) and stream_with_retries, against a scripted local SSE server."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from emili_chat.llm import (
    AnthropicBackend,
    BackendError,
    ChatBackend,
    GenerationParams,
    Message,
    OpenAICompatBackend,
    ReplyEnd,
    TransientBackendError,
    build_backend,
    fold_system_messages,
    stream_with_retries,
)

SYSTEM_PROMPT = "You are EMILI, a warm and empathetic chat partner."
READOUT = "Right now, user looks HAPPY (46)"
CONVERSATION = [
    Message("system", SYSTEM_PROMPT),
    Message("user", "Hi! I had a long day."),
    Message("assistant", "Oh no, what happened?"),
    Message("system", READOUT),
    Message("user", "It ended well, I got a promotion!"),
]
PARAMS = GenerationParams(temperature=0.7, max_new_tokens=50, seed=3)


# --- a scripted HTTP server ------------------------------------------------------------------------------------


@dataclass
class Reply:
    """One response: ``chunks`` are written in order; a float in them is a pause, in seconds."""

    status: int = 200
    chunks: Sequence[str | float] = ()
    content_type: str = "text/event-stream"


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class ScriptedServer:
    replies: deque[Reply] = field(default_factory=deque)
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            request_line, *header_lines = head.strip().split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(Request(request_line.split()[1], headers, json.loads(body or b"{}")))
            reply = self.replies.popleft()
            writer.write(
                f"HTTP/1.1 {reply.status} Scripted\r\nContent-Type: {reply.content_type}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            for chunk in reply.chunks:
                if isinstance(chunk, float):
                    await writer.drain()
                    await asyncio.sleep(chunk)
                else:
                    writer.write(chunk.encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # The client gave up (a timeout under test).
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer()
    tcp = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
    scripted.url = f"http://127.0.0.1:{tcp.sockets[0].getsockname()[1]}"
    async with tcp:
        yield scripted
    assert not scripted.replies, "a scripted reply was not asked for"


def sse(*events: dict[str, Any] | str, named: bool = False) -> str:
    """Events as ``data:`` lines (``event:`` lines too when ``named``, as Anthropic sends them)."""
    out = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        prefix = f"event: {event['type']}\n" if named and isinstance(event, dict) else ""
        out.append(f"{prefix}data: {data}\n\n")
    return "".join(out)


def openai_chunk(content: str | None = None, finish: str | None = None, role: str | None = None) -> dict[str, Any]:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def openai_reply(*texts: str) -> Reply:
    chunks = [openai_chunk(role="assistant", content="")] + [openai_chunk(t) for t in texts]
    return Reply(chunks=[sse(*chunks, openai_chunk(finish="stop"), "[DONE]")])


def anthropic_events(*texts: str) -> list[dict[str, Any]]:
    return [
        {"type": "message_start", "message": {"id": "m1", "type": "message", "role": "assistant", "content": []}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}} for t in texts),
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
        {"type": "message_stop"},
    ]


def error_reply(status: int, message: str, kind: str = "invalid_request_error") -> Reply:
    body = json.dumps({"type": "error", "error": {"type": kind, "message": message}})
    return Reply(status, [body], content_type="application/json")


async def collect(stream: AsyncIterator[str]) -> list[str]:
    return [delta async for delta in stream]


def openai(server: ScriptedServer, **kwargs: Any) -> OpenAICompatBackend:
    return OpenAICompatBackend(f"{server.url}/v1/", "sk-test", "gpt-test", **kwargs)


def anthropic(server: ScriptedServer) -> AnthropicBackend:
    return AnthropicBackend("ak-test", model="claude-test", base_url=server.url)


# --- OpenAI-compatible --------------------------------------------------------------------------------------------


async def test_openai_streams_deltas_and_sends_messages_as_they_are(server: ScriptedServer) -> None:
    server.replies.append(openai_reply("Con", "gratulations", ", that is great!"))
    backend = openai(server)
    await backend.load()
    assert await collect(backend.stream(CONVERSATION, PARAMS)) == ["Con", "gratulations", ", that is great!"]

    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.body == {
        "model": "gpt-test",
        "messages": [{"role": m.role, "content": m.content} for m in CONVERSATION],
        "stream": True,
        "max_tokens": 50,
        "temperature": 0.7,
        "top_p": 1.0,
        "seed": 3,
    }
    assert backend.model_id() == "gpt-test"
    assert backend.count_tokens(CONVERSATION) == sum(len(m.content) // 4 + 4 for m in CONVERSATION) + 3
    await backend.aclose()


async def test_openai_error_statuses(server: ScriptedServer) -> None:
    backend = openai(server)
    server.replies.append(error_reply(429, "Rate limit reached for requests", "requests"))
    with pytest.raises(TransientBackendError, match="HTTP 429: Rate limit reached"):
        await collect(backend.stream(CONVERSATION, PARAMS))

    server.replies.append(error_reply(400, "max_tokens is too large: 50000"))
    with pytest.raises(BackendError, match="HTTP 400: max_tokens is too large: 50000") as caught:
        await collect(backend.stream(CONVERSATION, PARAMS))
    assert not isinstance(caught.value, TransientBackendError)

    server.replies.append(Reply(502, ["<html>Bad gateway</html>"], content_type="text/html"))
    with pytest.raises(TransientBackendError, match="HTTP 502: <html>Bad gateway</html>"):
        await collect(backend.stream(CONVERSATION, PARAMS))
    await backend.aclose()


async def test_openai_mid_stream_error_and_cut_off_stream(server: ScriptedServer) -> None:
    backend = openai(server)
    server.replies.append(Reply(chunks=[sse(openai_chunk("Hi"), {"error": {"message": "engine died", "code": 500}})]))
    with pytest.raises(TransientBackendError, match="engine died"):
        await collect(backend.stream(CONVERSATION, PARAMS))

    server.replies.append(Reply(chunks=[sse(openai_chunk("Hi"))]))  # Connection closed before [DONE].
    with pytest.raises(TransientBackendError, match="before \\[DONE\\]"):
        await collect(backend.stream(CONVERSATION, PARAMS))
    await backend.aclose()


async def test_connection_refused_is_transient() -> None:
    with_nobody_listening = OpenAICompatBackend("http://127.0.0.1:9", "k", "m", timeout_s=2)
    with pytest.raises(TransientBackendError, match="ConnectError"):
        await collect(with_nobody_listening.stream(CONVERSATION, PARAMS))
    await with_nobody_listening.aclose()


async def test_caller_supplied_client_is_used_and_left_open(server: ScriptedServer) -> None:
    server.replies.append(openai_reply("ok"))
    async with httpx.AsyncClient(headers={"x-trace": "t1"}) as client:
        backend = openai(server, client=client)
        assert await collect(backend.stream(CONVERSATION, PARAMS)) == ["ok"]
        await backend.aclose()
        assert not client.is_closed
    assert server.requests[0].headers["x-trace"] == "t1"


# --- Anthropic ----------------------------------------------------------------------------------------------------


async def test_anthropic_streams_text_deltas(server: ScriptedServer) -> None:
    server.replies.append(Reply(chunks=[sse(*anthropic_events("Con", "gratulations!"), named=True)]))
    backend = anthropic(server)
    assert await collect(backend.stream(CONVERSATION, PARAMS)) == ["Con", "gratulations!"]

    (request,) = server.requests
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == "ak-test"
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.body == {
        "model": "claude-test",
        "max_tokens": 50,
        "system": SYSTEM_PROMPT,
        "messages": [
            {"role": "user", "content": "Hi! I had a long day."},
            {"role": "assistant", "content": "Oh no, what happened?"},
            {
                "role": "user",
                "content": f"[Facial expression readout] {READOUT}\n\nIt ended well, I got a promotion!",
            },
        ],
        "temperature": 0.7,
        "stream": True,
    }
    await backend.aclose()


async def test_anthropic_request_alternates_whatever_the_conversation() -> None:
    backend = AnthropicBackend("k")
    messages = [
        Message("system", SYSTEM_PROMPT),
        Message("system", "User is not visible right now."),
        Message("user", "hello"),
        Message("user", "?"),
        Message("system", "The user's message is very short."),
        Message("assistant", "Hi there!"),
        Message("assistant", ""),
        Message("system", "Previously, user looked Neutral (60)\nChange in emotions detected!\n" + READOUT),
    ]
    body = backend.request_body(messages, GenerationParams(temperature=1.5, top_p=0.9))
    assert body["system"] == SYSTEM_PROMPT
    assert body["messages"] == [
        {
            "role": "user",
            "content": "[Facial expression readout] User is not visible right now.\n\nhello\n\n?\n\n"
            "[System note] The user's message is very short.",
        },
        {"role": "assistant", "content": "Hi there!"},
        {
            "role": "user",
            "content": "[Facial expression readout] Previously, user looked Neutral (60)\n"
            "Change in emotions detected!\nRight now, user looks HAPPY (46)",
        },
    ]
    assert body["temperature"] == 1.0  # Clamped to the API's range.
    assert body["top_p"] == 0.9


async def test_anthropic_errors(server: ScriptedServer) -> None:
    backend = anthropic(server)
    server.replies.append(error_reply(529, "Overloaded", "overloaded_error"))
    with pytest.raises(TransientBackendError, match="HTTP 529: Overloaded"):
        await collect(backend.stream(CONVERSATION, PARAMS))

    server.replies.append(error_reply(400, "messages: roles must alternate"))
    with pytest.raises(BackendError, match="HTTP 400: messages: roles must alternate") as caught:
        await collect(backend.stream(CONVERSATION, PARAMS))
    assert not isinstance(caught.value, TransientBackendError)

    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    events = [*anthropic_events("Hel")[:4], overloaded]
    server.replies.append(Reply(chunks=[sse(*events, named=True)]))
    received: list[str] = []
    with pytest.raises(TransientBackendError, match="overloaded_error: Overloaded"):
        async for delta in backend.stream(CONVERSATION, PARAMS):
            received.append(delta)
    assert received == ["Hel"]

    server.replies.append(Reply(chunks=[sse(*anthropic_events("Hel")[:4], named=True)]))
    with pytest.raises(TransientBackendError, match="before message_stop"):
        await collect(backend.stream(CONVERSATION, PARAMS))
    await backend.aclose()


async def test_adapters_are_not_supported_remotely(server: ScriptedServer) -> None:
    for backend in (openai(server), anthropic(server)):
        with pytest.raises(BackendError, match="adapters not supported"):
            await backend.add_adapter("a", Path("."))
        with pytest.raises(BackendError, match="adapters not supported"):
            await collect(backend.stream(CONVERSATION, PARAMS, adapter="a"))
        assert backend.adapters() == []
        await backend.aclose()


# --- stream_with_retries ------------------------------------------------------------------------------------------


def retrying(backend: ChatBackend, **kwargs: Any) -> AsyncIterator[str]:
    options: dict[str, Any] = {"attempts": 3, "first_token_timeout_s": 5.0, "idle_timeout_s": 5.0, "backoff_s": 0.01}
    return stream_with_retries(backend, CONVERSATION, PARAMS, **(options | kwargs))


async def test_retries_a_503_before_the_first_token(server: ScriptedServer) -> None:
    server.replies.extend([error_reply(503, "upstream busy", "server_error"), openai_reply("Hello", " again")])
    backend = openai(server)
    assert await collect(retrying(backend)) == ["Hello", " again"]
    assert len(server.requests) == 2
    await backend.aclose()


async def test_gives_up_after_the_last_attempt(server: ScriptedServer) -> None:
    server.replies.extend(error_reply(503, f"busy {i}", "server_error") for i in range(3))
    backend = openai(server)
    with pytest.raises(TransientBackendError, match="busy 2"):
        await collect(retrying(backend))
    assert len(server.requests) == 3
    await backend.aclose()


async def test_does_not_retry_permanent_errors(server: ScriptedServer) -> None:
    server.replies.append(error_reply(400, "bad request"))
    backend = anthropic(server)
    with pytest.raises(BackendError, match="bad request"):
        await collect(retrying(backend))
    assert len(server.requests) == 1
    await backend.aclose()


async def test_does_not_retry_after_partial_output(server: ScriptedServer) -> None:
    server.replies.extend([Reply(chunks=[sse(openai_chunk("Half a"))]), openai_reply("never", " sent")])
    backend = openai(server)
    received: list[str] = []
    with pytest.raises(TransientBackendError, match="before \\[DONE\\]"):
        async for delta in retrying(backend):
            received.append(delta)
    assert received == ["Half a"]  # Not repeated, and no second attempt.
    assert len(server.requests) == 1
    server.replies.clear()
    await backend.aclose()


async def test_first_token_timeout_is_transient_and_retried(server: ScriptedServer) -> None:
    stalled = Reply(chunks=[": keep-alive\n\n", 2.0, sse(openai_chunk("late"), "[DONE]")])
    server.replies.extend([stalled, stalled])
    backend = openai(server)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TransientBackendError, match=r"no first token in 0\.2 s"):
        await collect(retrying(backend, attempts=2, first_token_timeout_s=0.2))
    assert loop.time() - start < 1.5
    assert len(server.requests) == 2
    await backend.aclose()


async def test_idle_timeout_after_partial_output_is_not_retried(server: ScriptedServer) -> None:
    server.replies.append(Reply(chunks=[sse(openai_chunk("Hi")), 2.0, sse(openai_chunk("late"), "[DONE]")]))
    backend = openai(server)
    received: list[str] = []
    with pytest.raises(TransientBackendError, match=r"no text for 0\.2 s"):
        async for delta in retrying(backend, idle_timeout_s=0.2):
            received.append(delta)
    assert received == ["Hi"]
    assert len(server.requests) == 1
    await backend.aclose()


class FlakyBackend(ChatBackend):
    """Fails transiently a given number of times, then streams; counts how often it was asked."""

    name = "flaky"
    context_window = 100

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.closed = 0

    async def load(self) -> None:
        pass

    def model_id(self, adapter: str | None = None) -> str:
        return "flaky"

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return 0

    async def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        adapter: str | None = None,
        end: ReplyEnd | None = None,
    ) -> AsyncIterator[str]:
        self.calls += 1
        try:
            yield ""  # Empty deltas are not text: they neither count as output nor reach the caller.
            if self.calls <= self.failures:
                raise TransientBackendError("try again")
            yield "ok"
        finally:
            self.closed += 1


async def test_empty_deltas_do_not_count_as_output_and_streams_are_closed() -> None:
    backend = FlakyBackend(failures=2)
    assert await collect(retrying(backend)) == ["ok"]
    assert backend.calls == backend.closed == 3


async def test_consumer_leaving_closes_the_backend_stream() -> None:
    backend = FlakyBackend(failures=0)
    stream = retrying(backend)
    assert await anext(stream) == "ok"
    await stream.aclose()  # type: ignore[attr-defined]
    assert backend.closed == 1


class DrippingBackend(FlakyBackend):
    """Sends nothing but empty deltas, as a server's keep-alives would look."""

    async def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        adapter: str | None = None,
        end: ReplyEnd | None = None,
    ) -> AsyncIterator[str]:
        self.calls += 1
        while True:
            await asyncio.sleep(0.05)
            yield ""


async def test_empty_deltas_do_not_extend_the_first_token_deadline() -> None:
    backend = DrippingBackend(failures=0)
    async with asyncio.timeout(5):  # Fail fast, rather than hang, if the deadline were reset.
        with pytest.raises(TransientBackendError, match="no first token"):
            await collect(retrying(backend, attempts=1, first_token_timeout_s=0.3, idle_timeout_s=0.2))
    assert backend.calls == 1


# --- helpers --------------------------------------------------------------------------------------------------------


def test_fold_system_messages() -> None:
    system, turns = fold_system_messages(CONVERSATION)
    assert system == SYSTEM_PROMPT
    assert [t.role for t in turns] == ["user", "assistant", "user"]
    assert turns[2].content == f"[Facial expression readout] {READOUT}\n\nIt ended well, I got a promotion!"

    system, turns = fold_system_messages([Message("assistant", "Hello, I'm EMILI."), Message("user", "hi")])
    assert system == ""
    assert turns == [
        Message("user", "[System note] The conversation begins."),
        Message("assistant", "Hello, I'm EMILI."),
        Message("user", "hi"),
    ]


def test_build_backend() -> None:
    assert isinstance(build_backend("openai", base_url="", api_key="k", model="m"), OpenAICompatBackend)
    anthropic_backend = build_backend("anthropic", api_key="k", base_url="")
    assert isinstance(anthropic_backend, AnthropicBackend)
    assert anthropic_backend.url == "https://api.anthropic.com/v1/messages"
    with pytest.raises(ValueError, match="unknown backend kind"):
        build_backend("ollama", api_key="k")  # type: ignore[arg-type]


async def test_each_api_backend_says_whether_the_reply_was_cut_off_at_the_token_limit(server: ScriptedServer) -> None:
    openai_backend = openai(server)
    await openai_backend.load()
    for finish, at_limit in (("stop", False), ("length", True)):
        chunks = [openai_chunk(role="assistant", content=""), openai_chunk("Well,"), openai_chunk(finish=finish)]
        server.replies.append(Reply(chunks=[sse(*chunks, "[DONE]")]))
        end = ReplyEnd()
        assert await collect(openai_backend.stream(CONVERSATION, PARAMS, end=end)) == ["Well,"]
        assert end.at_limit is at_limit
    await openai_backend.aclose()

    anthropic_backend = anthropic(server)
    for stop_reason, at_limit in (("end_turn", False), ("max_tokens", True)):
        events = anthropic_events("Well,")
        events[-2] = {"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": {"output_tokens": 50}}
        server.replies.append(Reply(chunks=[sse(*events, named=True)]))
        end = ReplyEnd()
        assert await collect(stream_with_retries(anthropic_backend, CONVERSATION, PARAMS, end=end)) == ["Well,"]
        assert end.at_limit is at_limit
    await anthropic_backend.aclose()
