"""The conversation the model saw, rebuilt from events the way chat builds its context and the labeler its data."""

from __future__ import annotations

from typing import Any

import pytest

from emili_session.conversation import (
    INJECTED_KINDS,
    ROLES,
    Turn,
    conversation,
    conversation_messages,
    system_prompt_of,
)
from emili_session.events import Event, EventKind, MalformedEvent

SYSTEM = "You are EMILI."


def events() -> list[dict[str, Any]]:
    return [
        {"event_id": "1", "kind": "session_created", "time_ms": 0, "model_arm": "base", "system_prompt": SYSTEM},
        {"event_id": "2", "kind": "pre_survey", "time_ms": 1, "text": "sad"},
        {"event_id": "3", "kind": "readout_injected", "time_ms": 2, "text": "Right now, user looks SAD (60)"},
        {"event_id": "4", "kind": "fer_reading", "time_ms": 3, "capture_time_ms": 3, "face_found": False},
        {"event_id": "5", "kind": "reminder", "time_ms": 4, "text": "short"},
        {"event_id": "6", "kind": "user_message", "time_ms": 5, "text": "hi"},
        {"event_id": "7", "kind": "assistant_message", "time_ms": 6, "text": "Hello!", "turn_id": "t1"},
        {"event_id": "8", "kind": "post_response_reading", "time_ms": 7, "turn_id": "t1", "delay_s": 5},
        {"event_id": "9", "kind": "assistant_message", "time_ms": 8, "text": "You smile.", "turn_id": "t2"}
        | {"unprompted": True},
        {"event_id": "10", "kind": "rating", "time_ms": 9, "empathy": 5, "relevance": 5, "fluency": 5},
    ]


def test_roles_and_injected_kinds() -> None:
    assert dict(ROLES) == {
        "user_message": "user",
        "assistant_message": "assistant",
        "readout_injected": "system",
        "reminder": "system",
    }
    assert frozenset({"readout_injected", "reminder"}) == INJECTED_KINDS


def test_only_what_the_model_saw_in_order() -> None:
    assert conversation(system_prompt_of(events()), events()) == [
        Turn(None, "system", SYSTEM),
        Turn(EventKind.READOUT_INJECTED, "system", "Right now, user looks SAD (60)"),
        Turn(EventKind.REMINDER, "system", "short"),
        Turn(EventKind.USER_MESSAGE, "user", "hi"),
        Turn(EventKind.ASSISTANT_MESSAGE, "assistant", "Hello!", "t1", False),
        Turn(EventKind.ASSISTANT_MESSAGE, "assistant", "You smile.", "t2", True),
    ]


def test_chat_events_and_stored_lines_give_the_same_conversation() -> None:
    header = ("event_id", "kind", "time_ms")
    as_events = [
        Event(e["event_id"], EventKind(e["kind"]), e["time_ms"], {k: v for k, v in e.items() if k not in header})
        for e in events()
    ]
    nested = [{"kind": e["kind"], "payload": {k: v for k, v in e.items() if k != "kind"}} for e in events()]
    assert conversation(SYSTEM, as_events) == conversation(SYSTEM, events()) == conversation(SYSTEM, nested)


def test_messages_carry_turn_ids_and_an_empty_prompt_is_left_out() -> None:
    assert conversation_messages("  ", events()) == [
        {"role": "system", "content": "Right now, user looks SAD (60)"},
        {"role": "system", "content": "short"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!", "turn_id": "t1"},
        {"role": "assistant", "content": "You smile.", "turn_id": "t2"},
    ]


def test_broken_messages_are_refused_but_other_kinds_are_not_checked() -> None:
    with pytest.raises(MalformedEvent, match="'x' has no turn_id"):
        conversation(SYSTEM, [{"event_id": "x", "kind": "assistant_message", "text": "a"}])
    with pytest.raises(ValueError, match="has no text"):
        conversation(SYSTEM, [{"event_id": "y", "kind": "user_message"}])
    # Readings and surveys never reach the model, so a reader of the conversation does not depend on them.
    assert conversation("", [{"kind": "fer_reading", "capture_time_ms": "?"}]) == []


def test_system_prompt_of() -> None:
    assert system_prompt_of(events()) == SYSTEM
    assert system_prompt_of([{"kind": "session_created", "model_arm": "a", "model_id": "m"}]) == ""
    assert system_prompt_of([{"kind": "user_message", "text": "hi"}]) == ""
    nested = [{"kind": "session_created", "payload": {"model_arm": "a", "model_id": "m", "system_prompt": "P"}}]
    assert system_prompt_of(nested) == "P"
