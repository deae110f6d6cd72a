"""What the HTTP backends share: their client, Server-Sent Events, and mapping HTTP failures to backend errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from emili_chat.llm.base import BackendError, TransientBackendError


def is_transient_status(status: int) -> bool:
    # 408 request timeout, 429 rate limit, 5xx server trouble (Anthropic's 529 "overloaded" included).
    return status in (408, 429) or status >= 500


def error_message(body: bytes) -> str:
    """The server's own explanation: OpenAI/vLLM/Anthropic JSON error bodies, else the (truncated) text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500] or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if isinstance(error, str):
            return error
        if "message" in data:
            return str(data["message"])
    return json.dumps(data)[:500]


async def check_status(response: httpx.Response, backend: str) -> None:
    """Raise the right :class:`BackendError` for a non-2xx response, with the server's message."""
    if response.is_success:
        return
    message = error_message(await response.aread())
    error = TransientBackendError if is_transient_status(response.status_code) else BackendError
    raise error(f"{backend}: HTTP {response.status_code}: {message}")


def transport_error(exc: httpx.TransportError, backend: str) -> TransientBackendError:
    """Connection refused or reset, timeouts, a stream cut off: all worth another try."""
    return TransientBackendError(f"{backend}: {type(exc).__name__}: {str(exc) or 'connection lost'}")


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The ``data`` of each Server-Sent Event (multi-line data joined with newlines); other fields are ignored."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            lines.append(value.removeprefix(" "))
    if lines:
        yield "\n".join(lines)


def stream_error(error: object, backend: str) -> BackendError:
    """An error reported inside an otherwise successful stream (OpenAI, vLLM: ``{"error": {...}}``)."""
    if not isinstance(error, dict):
        return BackendError(f"{backend}: {error}")
    code, kind = error.get("code"), error.get("type")
    transient = (isinstance(code, int) and is_transient_status(code)) or kind in ("server_error", "rate_limit_error")
    return (TransientBackendError if transient else BackendError)(f"{backend}: {error.get('message', error)}")


def parse_event(data: str, backend: str) -> dict[str, object]:
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise BackendError(f"{backend}: malformed event {data[:200]!r}") from exc
    if not isinstance(event, dict):
        raise BackendError(f"{backend}: unexpected event {data[:200]!r}")
    return event


def make_client(client: httpx.AsyncClient | None, timeout_s: float) -> httpx.AsyncClient:
    # The read timeout bounds the gap between two chunks of the stream, not the whole reply.
    return client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)))
