"""OpenAI-compatible chat completions (OpenAI itself, vLLM, and other servers speaking the same API).

With vLLM, each registered model version is a LoRA adapter of the one base model the server runs, asked for
by name (``model: <adapter>``). Adapters reach the server in one of two ways:

* loaded at runtime (``lora_dir`` set): :meth:`OpenAICompatBackend.add_adapter` calls vLLM's
  ``POST /v1/load_lora_adapter`` (the server needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``) with the
  adapter's folder as the server sees it, ``<lora_dir>/<folder name>`` (a volume both mount);
* preloaded (``vllm serve --lora-modules name=path``, or loaded by another chat replica): listed by
  ``GET /v1/models``, which :meth:`OpenAICompatBackend.has_adapter` asks.

A request for an adapter the server does not have fails (HTTP 404 from vLLM): the base model never answers in
its place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx

from emili_chat.llm._http import (
    check_status,
    error_message,
    make_client,
    parse_event,
    sse_data,
    stream_error,
    transport_error,
)
from emili_chat.llm.base import BackendError, ChatBackend, GenerationParams, Message, ReplyEnd, approximate_tokens

OPENAI_BASE_URL = "https://api.openai.com/v1"


class AdapterNotLoaded(BackendError):
    """The server does not serve the adapter asked for (never loaded, unloaded, or the server restarted)."""


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
        lora_dir: str = "",
    ) -> None:
        self.base_url = (base_url or OPENAI_BASE_URL).rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.context_window = context_window
        # Where the server reads adapter folders; empty: the server loads none at runtime (OpenAI itself).
        self.lora_dir = lora_dir.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_client = client is None
        self._client = make_client(client, timeout_s)
        self._served: set[str] = set()  # Adapters the server is known to serve.

    async def load(self) -> None:
        """Nothing to load; the endpoint is not contacted, so the service can start while it is down."""

    def model_id(self, adapter: str | None = None) -> str:
        return self.model if adapter is None else f"{self.model}+{adapter}"

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Approximate (about 4 characters per token): the server's tokenizer is not available here."""
        return approximate_tokens(messages)

    def adapters(self) -> list[str]:
        return sorted(self._served)

    async def has_adapter(self, adapter_id: str) -> bool:
        """Whether the server serves ``adapter_id``: loaded through this backend, or listed by ``/models``."""
        if adapter_id in self._served:
            return True
        try:
            response = await self._client.get(f"{self.base_url}/models", headers=self._headers)
        except httpx.TransportError as exc:
            raise transport_error(exc, self.name) from exc
        await check_status(response, self.name)
        listed = parse_event(response.text, self.name).get("data")
        if isinstance(listed, list) and any(isinstance(m, dict) and m.get("id") == adapter_id for m in listed):
            self._served.add(adapter_id)
            return True
        return False

    async def add_adapter(self, adapter_id: str, path: Path) -> None:
        """Load the adapter folder ``path`` (seen by the server as ``<lora_dir>/<path.name>``) as ``adapter_id``."""
        if not self.lora_dir:
            raise BackendError(f"adapters not supported by {self.name} without llm.lora_dir (runtime LoRA loading)")
        body = {"lora_name": adapter_id, "lora_path": f"{self.lora_dir}/{path.name}"}
        try:
            response = await self._client.post(f"{self.base_url}/load_lora_adapter", json=body, headers=self._headers)
        except httpx.TransportError as exc:
            raise transport_error(exc, self.name) from exc
        # Another chat replica may have loaded it first: vLLM answers 400 "... has already been loaded".
        if response.status_code == 400 and "already been loaded" in error_message(response.content):
            self._served.add(adapter_id)
            return
        try:
            await check_status(response, self.name)
        except BackendError as exc:
            raise type(exc)(f"loading adapter {adapter_id!r} from {body['lora_path']} failed: {exc}") from exc
        self._served.add(adapter_id)

    async def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        adapter: str | None = None,
        end: ReplyEnd | None = None,
    ) -> AsyncIterator[str]:
        if adapter is not None and not (self.lora_dir or adapter in self._served):
            raise BackendError(f"adapters not supported by {self.name} without llm.lora_dir (runtime LoRA loading)")
        body: dict[str, object] = {
            # vLLM serves each LoRA adapter as a model of its own name.
            "model": self.model if adapter is None else adapter,
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
                if adapter is not None and response.status_code == 404:
                    # Forgotten, so that the next session start loads it again (after a server restart, say).
                    self._served.discard(adapter)
                    message = error_message(await response.aread())
                    raise AdapterNotLoaded(f"{self.name}: adapter {adapter!r} is not served: {message}")
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
                        reason = choice.get("finish_reason")
                        if reason is not None and end is not None:
                            end.at_limit = reason == "length"
                        finished = finished or reason is not None
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
