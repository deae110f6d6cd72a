"""Chat metrics per model arm: tokens in and out and time to first token, labelled by the arm's version."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from emili_chat.engine import ChatEngine
from emili_chat.io_types import ConverseInput, SessionOptions, UserText
from emili_chat.llm import Message
from emili_chat.metrics import reply_tokens
from emili_chat.store import SessionStore
from emili_core.auth import Principal
from emili_core.objectstore import Bucket, ObjectStore
from emili_testing.chat import ScriptedBackend

from .conftest import make_settings

pytestmark = pytest.mark.integration

ALICE = Principal("alice", frozenset({"chat"}))
REPLY = "Glad to hear it, what happened next?"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"emili_chat_{name}", labels) or 0.0


async def one_message() -> AsyncIterator[ConverseInput]:
    yield UserText("I went for a long walk by the sea today")


def test_reply_tokens_leave_out_the_message_framing() -> None:
    def framed(messages: Sequence[Message]) -> int:
        return sum(len(m.content.split()) + 4 for m in messages) + 3

    assert reply_tokens(framed, "three small words") == 3
    assert reply_tokens(framed, "") == 0


async def test_tokens_and_time_to_first_token_by_arm(
    redis_url: str, redis_client: aioredis.Redis, object_store: ObjectStore, tmp_path: Path
) -> None:
    version = f"v-{uuid.uuid4().hex[:8]}"
    object_store.put_bytes(Bucket.MODELS, f"adapters/{version}/adapter_config.json", b'{"r": 4}')
    object_store.put_bytes(Bucket.MODELS, f"adapters/{version}/adapter_model.safetensors", b"weights")
    object_store.put_json(Bucket.MODELS, f"registry/{version}.json", {"adapter_prefix": f"adapters/{version}/"})
    backend = ScriptedBackend(REPLY)
    settings = make_settings(redis_url, post_response_reading_s=0.0, speak_on_change=False)
    engine = ChatEngine(
        settings.model_copy(update={"artifacts_dir": tmp_path}),
        backend,
        SessionStore(redis_client),
        objects=object_store,
    )
    before = {
        arm: (sample("tokens_total", direction="in", arm=arm), sample("tokens_total", direction="out", arm=arm))
        for arm in ("base", version)
    }
    ttft_before = {arm: sample("time_to_first_token_seconds_count", arm=arm) for arm in ("base", version)}
    for arm in (version, "base", version):
        session = await engine.create_session(
            ALICE, store_frames=False, use_for_training=True, arm=arm, options=SessionOptions()
        )
        _ = [o async for o in engine.converse(ALICE, session.session_id, one_message())]

    for arm in ("base", version):
        prompts = [messages for messages, _, adapter in backend.calls if (adapter or "base") == arm]
        tokens_in = sample("tokens_total", direction="in", arm=arm) - before[arm][0]
        tokens_out = sample("tokens_total", direction="out", arm=arm) - before[arm][1]
        assert tokens_in == sum(backend.count_tokens(prompt) for prompt in prompts)
        assert tokens_out == len(prompts) * reply_tokens(backend.count_tokens, REPLY)
        assert sample("time_to_first_token_seconds_count", arm=arm) - ttft_before[arm] == len(prompts)
    assert len(backend.calls) == 3
