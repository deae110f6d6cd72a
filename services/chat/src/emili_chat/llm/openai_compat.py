"""OpenAI-compatible chat completions (OpenAI itself, vLLM, and other servers speaking the same API)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpx

from emili_chat.llm._http import check_status, make_client, parse_event, sse_data, stream_error, transport_error
from emili_chat.llm.base import BackendError, ChatBackend, GenerationParams, Message, approximate_tokens

OPENAI_BASE_URL = "https://api.openai.com/v1"


class OpenAICompatBackend(ChatBackend):
    """Streams ``POST {base_url}/chat/completions``.

    Mid-conversation system messages are sent as they are: OpenAI and vLLM both accept system messages
    anywhere (how a vLLM-served model then renders them is up to its chat template).
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        context_window: int = 8192,
        timeout_s: float = 60.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = f"{(base_url or OPENAI_BASE_URL).rstrip('/')}/chat/completions"
        self.model = model
        self.context_window = context_window
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_client = client is None
        self._client = make_client(client, timeout_s)

    async def load(self) -> None:
        """Nothing to load; the endpoint is not contacted, so the service can start while it is down."""

    def model_id(self, adapter: str | None = None) -> str:
        # vLLM serves each LoRA adapter as a model name of its own; choose it with ``model``.
        return self.model if adapter is None else f"{self.model}+{adapter}"

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Approximate (about 4 characters per token): the server's tokenizer is not available here."""
        return approximate_tokens(messages)

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams, adapter: str | None = None
    ) -> AsyncIterator[str]:
        if adapter is not None:
            raise BackendError(f"adapters not supported by {self.name}")
        body: dict[str, object] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        finished = False
        try:
            async with self._client.stream("POST", self.url, json=body, headers=self._headers) as response:
                await check_status(response, self.name)
                async for data in sse_data(response):
                    if data.strip() == "[DONE]":
                        return
                    event = parse_event(data, self.name)
                    if "error" in event:  # vLLM reports failures that happen mid-stream this way.
                        raise stream_error(event["error"], self.name)
                    for choice in _choices(event):
                        delta = choice.get("delta")
                        content = delta.get("content") if isinstance(delta, dict) else None
                        if isinstance(content, str) and content:
                            yield content
                        finished = finished or choice.get("finish_reason") is not None
        except httpx.TransportError as exc:
            raise transport_error(exc, self.name) from exc
        if not finished:
            # Neither [DONE] nor a finish_reason: the reply was cut off, e.g. by a proxy closing the connection.
            raise transport_error(httpx.RemoteProtocolError("stream ended before [DONE]"), self.name)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _choices(event: dict[str, object]) -> list[dict[str, object]]:
    """The first choice, when there is one: usage-only chunks come with an empty list."""
    choices = event.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return [choices[0]]
    return []
