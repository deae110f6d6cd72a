"""The LLM's view of a session, and EMILI's way of condensing it near the context window."""

from __future__ import annotations

from collections.abc import Sequence

from emili_chat.history import condense, messages_from_events
from emili_chat.llm import Message
from emili_session.events import Event


def words(messages: Sequence[Message]) -> int:
    return sum(len(m.content.split()) for m in messages)


def test_events_become_messages_in_order() -> None:
    events = [
        Event("1-0", "session_created", 0, {}),
        Event("2-0", "readout_injected", 1, {"text": "Right now, user looks HAPPY (46)"}),
        Event("3-0", "user_message", 2, {"text": "hello"}),
        Event("4-0", "fer_reading", 3, {"face_found": True}),
        Event("5-0", "assistant_message", 4, {"text": "hi!", "turn_id": "t1"}),
        Event("6-0", "rating", 5, {"empathy": 5}),
    ]
    messages = messages_from_events("PROMPT", events)
    assert [(m.role, m.content) for m in messages] == [
        ("system", "PROMPT"),
        ("system", "Right now, user looks HAPPY (46)"),
        ("user", "hello"),
        ("assistant", "hi!"),
    ]


def test_short_history_is_untouched() -> None:
    messages = [Message("system", "p"), Message("user", "a b"), Message("assistant", "c")]
    assert condense(messages, words, budget=100, keep_last=2) == messages


def test_condense_keeps_prompt_exchanges_and_last_turns() -> None:
    messages = [Message("system", "prompt")]
    for i in range(10):
        messages += [
            Message("system", f"readout {i} " + "x " * 5),
            Message("user", f"user {i}"),
            Message("assistant", f"reply {i}"),
        ]
    messages.append(Message("assistant", "unprompted remark " + "y " * 5))
    condensed = condense(messages, words, budget=60, keep_last=4)
    assert condensed[0].content == "prompt"
    assert condensed[-4:] == messages[-4:]  # The last turns stay verbatim, readout included.
    older = condensed[1:-4]
    assert all(not m.content.startswith("readout") for m in older)  # Older readouts go first.
    assert [m.content for m in older][:2] == ["user 0", "reply 0"]  # Exchanges stay, oldest first.
    assert words(condensed) <= 60


def test_condense_drops_oldest_exchanges_when_still_too_long() -> None:
    messages = [Message("system", "prompt")] + [
        m for i in range(20) for m in (Message("user", f"user {i} " + "w " * 8), Message("assistant", f"reply {i}"))
    ]
    condensed = condense(messages, words, budget=50, keep_last=2)
    assert words(condensed) <= 50
    assert condensed[0].content == "prompt" and condensed[-2:] == messages[-2:]
    contents = [m.content.split()[0] + m.content.split()[1] for m in condensed[1:]]
    assert "user0" not in contents and "user17" in contents  # Oldest dropped, newest kept.
