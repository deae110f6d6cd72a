"""Anthropic's Messages API, streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpx

from emili_chat.llm._http import check_status, make_client, parse_event, sse_data, transport_error
from emili_chat.llm.base import (
    BackendError,
    ChatBackend,
    GenerationParams,
    Message,
    ReplyEnd,
    TransientBackendError,
    approximate_tokens,
    fold_system_messages,
)

ANTHROPIC_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
# Error event types worth a retry (https://docs.anthropic.com/en/api/errors).
_TRANSIENT_ERRORS = frozenset({"overloaded_error", "api_error", "rate_limit_error", "timeout_error"})


class AnthropicBackend(ChatBackend):
    """Streams ``POST {base_url}/v1/messages``.

    The API takes one ``system`` string and strictly alternating user/assistant turns, so the conversation is
    rewritten with :func:`~emili_chat.llm.base.fold_system_messages`: later system messages (EMILI's readouts)
    become a bracketed note at the start of the next user turn. ``seed`` is not supported by the API and is
    ignored; the temperature is clamped to the API's range, 0-1.
    """

    name = "anthropic"

    def __init__(
        self,
        api_key: str,
        model: str = "claude-3-haiku-20240307",
        base_url: str = ANTHROPIC_BASE_URL,
        context_window: int = 200_000,
        timeout_s: float = 60.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = f"{(base_url or ANTHROPIC_BASE_URL).rstrip('/')}/v1/messages"
        self.model = model
        self.context_window = context_window
        self._headers = {"x-api-key": api_key, "anthropic-version": ANTHROPIC_VERSION}
        self._owns_client = client is None
        self._client = make_client(client, timeout_s)

    async def load(self) -> None:
        """Nothing to load; the endpoint is not contacted, so the service can start while it is down."""

    def model_id(self, adapter: str | None = None) -> str:
        return self.model if adapter is None else f"{self.model}+{adapter}"

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Approximate (about 4 characters per token); the exact count would need a request to the API."""
        return approximate_tokens(messages)

    def request_body(self, messages: Sequence[Message], params: GenerationParams) -> dict[str, object]:
        """The JSON body sent for ``messages``: system prompt extracted, readouts folded into user turns."""
        system, turns = fold_system_messages(messages)
        body: dict[str, object] = {
            "model": self.model,
            "max_tokens": params.max_new_tokens,
            "messages": [{"role": m.role, "content": m.content} for m in turns],
            "temperature": min(max(params.temperature, 0.0), 1.0),
            "stream": True,
        }
        if system:
            body["system"] = system
        if params.top_p < 1.0:  # Newer models reject temperature and top_p together; send top_p only when set.
            body["top_p"] = params.top_p
        return body

    async def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        adapter: str | None = None,
        end: ReplyEnd | None = None,
    ) -> AsyncIterator[str]:
        if adapter is not None:
            raise BackendError(f"adapters not supported by {self.name}")
        body = self.request_body(messages, params)
        try:
            async with self._client.stream("POST", self.url, json=body, headers=self._headers) as response:
                await check_status(response, self.name)
                async for data in sse_data(response):
                    event = parse_event(data, self.name)
                    kind = event.get("type")
                    if kind == "content_block_delta":
                        delta = event.get("delta")
                        if isinstance(delta, dict) and delta.get("type") == "text_delta" and delta.get("text"):
                            yield str(delta["text"])
                    elif kind == "message_delta":
                        stop = event.get("delta")
                        if end is not None and isinstance(stop, dict) and stop.get("stop_reason"):
                            end.at_limit = stop["stop_reason"] == "max_tokens"
                    elif kind == "message_stop":
                        return
                    elif kind == "error":
                        raise _error_event(event.get("error"), self.name)
        except httpx.TransportError as exc:
            raise transport_error(exc, self.name) from exc
        raise TransientBackendError(f"{self.name}: stream ended before message_stop")

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _error_event(error: object, backend: str) -> BackendError:
    """An ``error`` event sent mid-stream, e.g. ``{"type": "overloaded_error", "message": "Overloaded"}``."""
    kind = error.get("type") if isinstance(error, dict) else None
    message = error.get("message", error) if isinstance(error, dict) else error
    cls = TransientBackendError if kind in _TRANSIENT_ERRORS else BackendError
    return cls(f"{backend}: {kind or 'error'}: {message}")
