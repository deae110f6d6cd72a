"""Where readouts and the short-message reminder go in the model's context, as the original EMILI sends them.

* The reminder for a very short user message comes right after that message (reference section 3).
* The readout before a user message is the one-line form: the original sends the three-line change block only
  when its change trigger fires. ``readout.change_block_before_user_message`` turns the block on there.
* Condensing the context keeps a reply to a short message although the reminder stands between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import redis.asyncio as aioredis

from emili_chat.history import condense
from emili_chat.io_types import Readout, SessionOptions, UserText
from emili_chat.llm import Message
from emili_chat.readout import short_message_reminder
from emili_chat.settings import ReadoutSettings
from emili_core.auth import Principal
from emili_testing.chat import ScriptedBackend

from .conftest import collect, make_engine, make_settings, reading, script

ALICE = Principal("alice", frozenset({"chat"}))


def test_condensing_keeps_the_reply_to_a_short_message_past_its_reminder() -> None:
    reminder = short_message_reminder("ok")
    assert reminder is not None
    messages = [Message("system", "prompt")]
    for i in range(6):
        messages += [Message("system", f"readout {i}"), Message("user", f"ok{i}"), Message("system", reminder)]
        messages += [Message("assistant", f"reply{i}")]
    messages += [Message("system", "readout on change"), Message("assistant", "unprompted remark")]

    def chars(batch: Sequence[Message]) -> int:
        return sum(len(m.content) for m in batch)

    condensed = condense(messages, chars, budget=chars(messages) - 1, keep_last=2)
    older = [m.content for m in condensed[1:-2]]
    # Readouts and reminders go; every user message keeps the reply that answered it.
    assert older == [text for i in range(6) for text in (f"ok{i}", f"reply{i}")]
    assert condensed[-2:] == messages[-2:]


def test_change_block_before_a_user_message_is_off_by_default() -> None:
    assert ReadoutSettings().change_block_before_user_message is False


@pytest.mark.integration
async def test_short_message_reminder_comes_after_the_message(redis_url: str, redis_client: aioredis.Redis) -> None:
    backend = ScriptedBackend(["Hi!", "Tell me more."])
    engine = make_engine(make_settings(redis_url, post_response_reading_s=0.0), redis_client, backend)
    session = await engine.create_session(
        ALICE, store_frames=False, use_for_training=False, arm="", options=SessionOptions()
    )
    await collect(
        engine.converse(
            ALICE,
            session.session_id,
            script(reading(happy=60, neutral=40), 0.6, UserText("ok"), UserText("I went hiking in the rain")),
        )
    )
    events = await engine.store.events(session.session_id)
    kinds = [e.kind for e in events if e.kind in {"readout_injected", "user_message", "reminder", "assistant_message"}]
    assert kinds == [
        "readout_injected",
        "user_message",  # "ok": under 10 characters ...
        "reminder",  # ... so the reminder follows it.
        "assistant_message",
        "readout_injected",
        "user_message",  # A longer message gets none.
        "assistant_message",
    ]
    first_context = backend.calls[0][0]
    assert [m.role for m in first_context] == ["system", "system", "user", "system"]
    assert first_context[2].content == "ok"
    assert "act out" in first_context[3].content
    second_context = backend.calls[1][0]
    assert [m.role for m in second_context[-2:]] == ["system", "user"]  # Readout, then the message: no reminder.


@pytest.mark.integration
@pytest.mark.parametrize("block", [False, True])
async def test_change_block_before_a_user_message_only_when_configured(
    redis_url: str, redis_client: aioredis.Redis, block: bool
) -> None:
    settings = make_settings(
        redis_url, post_response_reading_s=0.0, speak_on_change=False, change_block_before_user_message=block
    )
    engine = make_engine(settings, redis_client)
    session = await engine.create_session(
        ALICE, store_frames=False, use_for_training=False, arm="", options=SessionOptions()
    )
    outputs = await collect(
        engine.converse(
            ALICE,
            session.session_id,
            script(
                reading(neutral=90, happy=10),
                0.6,
                UserText("hello there"),
                *[step for _ in range(4) for step in (reading(sad=85, neutral=15), 0.5)],
                UserText("now I feel worse"),
            ),
        )
    )
    readouts = [o for o in outputs if isinstance(o, Readout)]
    assert [r.cadence for r in readouts] == ["before_user_message", "before_user_message"]
    # The face changed a lot between the two messages (neutral 90 -> sad 85): the block's condition holds.
    lines = readouts[1].text.split("\n")
    if block:
        assert lines[:2] == ["Previously, user looked TOTALLY ZEN (90)", "Change in emotions detected!"]
        assert len(lines) == 3
    else:
        assert len(lines) == 1 and "Change in emotions detected!" not in readouts[1].text
    assert lines[-1].split(" (")[0] in {"Right now, user looks ANGUISHED", "Right now, user looks DESPONDENT"}
