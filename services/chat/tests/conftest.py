"""Chat test helpers: settings, a Redis client and engines with the scripted model of ``emili_testing.chat``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from emili_chat.engine import ChatEngine
from emili_chat.io_types import ClientReading, ConverseInput, ConverseOutput
from emili_chat.llm import ChatBackend
from emili_chat.settings import ChatSettings
from emili_chat.store import SessionStore
from emili_session.emotions import EMOTIONS
from emili_testing.chat import ScriptedBackend


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


def reading(**scores: float) -> ClientReading:
    probabilities = {e: 0.0 for e in EMOTIONS} | {e: v / 100.0 for e, v in scores.items()}
    return ClientReading(True, probabilities, int(time.time() * 1000))


async def script(*steps: ConverseInput | float) -> AsyncIterator[ConverseInput]:
    """Inputs in order; a number means: wait that many seconds."""
    for step in steps:
        if isinstance(step, float | int):
            await asyncio.sleep(step)
        else:
            yield step


async def collect(outputs: AsyncIterator[ConverseOutput]) -> list[ConverseOutput]:
    return [o async for o in outputs]
