"""Chat test helpers: a scripted LLM backend (a test double for the code around the model) and engines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from emili_chat.engine import ChatEngine
from emili_chat.llm import ChatBackend, GenerationParams, Message
from emili_chat.settings import ChatSettings
from emili_chat.store import SessionStore


class ScriptedBackend(ChatBackend):
    """Replies with canned text in small deltas and records what it was asked."""

    name = "scripted"
    context_window = 4096

    def __init__(self, reply: str = "That sounds lovely. What made you smile?") -> None:
        self.reply = reply
        self.calls: list[tuple[list[Message], GenerationParams, str | None]] = []
        self._adapters: list[str] = []

    async def load(self) -> None:
        return None

    def model_id(self, adapter: str | None = None) -> str:
        return "scripted" + (f"+{adapter}" if adapter else "")

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(len(m.content.split()) for m in messages)

    async def stream(
        self, messages: Sequence[Message], params: GenerationParams, adapter: str | None = None
    ) -> AsyncIterator[str]:
        self.calls.append((list(messages), params, adapter))
        for word in self.reply.split(" "):
            await asyncio.sleep(0)
            yield word + " "

    async def add_adapter(self, adapter_id: str, path: Path) -> None:
        self._adapters.append(adapter_id)

    def adapters(self) -> list[str]:
        return list(self._adapters)


def make_settings(redis_url: str, **readout: object) -> ChatSettings:
    settings = ChatSettings(redis_url=redis_url)
    options = settings.chat.model_copy(update={"readout": settings.chat.readout.model_copy(update=readout)})
    return settings.model_copy(update={"chat": options})


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def make_engine(settings: ChatSettings, client: aioredis.Redis, backend: ChatBackend | None = None) -> ChatEngine:
    return ChatEngine(settings, backend or ScriptedBackend(), SessionStore(client))
