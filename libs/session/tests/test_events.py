"""Event kinds keep the stored strings; every kind parses from what chat writes; malformed events say why."""

from __future__ import annotations

import json
from typing import Any

import pytest

from emili_session.events import (
    AssistantMessage,
    Event,
    EventKind,
    FerReading,
    FerRestored,
    FerUnavailable,
    FramesDropped,
    FrameStored,
    MalformedEvent,
    Payload,
    PostResponseReading,
    PostSurvey,
    PreSurvey,
    Rating,
    ReadoutInjected,
    Reminder,
    SessionCreated,
    SessionEnded,
    UserMessage,
    event_fields,
    event_kind,
    parse_event,
    payload_fields,
    payloads_of,
)

FACE = {"angry": 0.0, "disgust": 0.0, "fear": 0.0, "happy": 0.9, "sad": 0.0, "surprise": 0.0, "neutral": 0.1}
SCORES = {"angry": 0, "disgust": 0, "fear": 0, "happy": 90, "sad": 0, "surprise": 0, "neutral": 10}

# One payload per kind, with every field the chat service writes.
PAYLOADS: list[Payload] = [
    SessionCreated(
        "base",
        "scripted",
        {"cadence": "before_user_message", "speak_on_change": False, "post_response_reading_s": 5.0},
        "You are EMILI.",
        True,
    ),
    PreSurvey(("Sad",), ("Joyful",), "I feel sad."),
    PostSurvey(("Happy",), (), "Better."),
    FrameStored("s1/frames/0001790000000000.jpg", 1_790_000_000_000),
    FerReading(1_790_000_000_000, True, FACE, "client"),
    ReadoutInjected("Right now, user looks HAPPY (90)", "before_user_message", SCORES),
    Reminder("The user's message is very short."),
    UserMessage("hello", 1_790_000_000_001),
    AssistantMessage("hi!", "t1", False, "scripted+v1", "v1", "v1", {"temperature": 0.7, "max_new_tokens": 256}),
    PostResponseReading("t1", 5.0, SCORES),
    Rating(5, 4, 3, "nice"),
    SessionEnded(),
    FerUnavailable(1_790_000_000_000, "UNAVAILABLE Cancelling all calls"),
    FerRestored(1_790_000_004_000, 3),
    FramesDropped(2, 1_790_000_000_000, 1_790_000_000_500, "upload buffer full"),
]


def stored(payload: Payload, event_id: str = "1-0") -> dict[str, Any]:
    """An ``events.jsonl`` line, through JSON as it is stored."""
    event = Event(event_id, payload.KIND, 1_790_000_000_000, payload_fields(payload))
    loaded: dict[str, Any] = json.loads(json.dumps(event.to_json()))
    return loaded


def test_kinds_are_the_stored_strings() -> None:
    assert [k.value for k in EventKind] == [
        "session_created",
        "pre_survey",
        "post_survey",
        "frame_stored",
        "fer_reading",
        "readout_injected",
        "reminder",
        "user_message",
        "assistant_message",
        "post_response_reading",
        "rating",
        "session_ended",
        "fer_unavailable",
        "fer_restored",
        "frames_dropped",
    ]
    assert EventKind.USER_MESSAGE == "user_message" and {"kind": EventKind.RATING}["kind"] == "rating"
    assert json.dumps({EventKind.RATING: EventKind.RATING}) == '{"rating": "rating"}'
    assert {type(p).KIND for p in PAYLOADS} == set(EventKind)  # One payload per kind, each tested below.


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: str(p.KIND))
def test_every_kind_round_trips_through_the_stored_form(payload: Payload) -> None:
    line = stored(payload)
    assert line["kind"] == payload.KIND and line["event_id"] == "1-0"
    assert parse_event(line) == (payload.KIND, payload)
    # The same event with its payload nested (as some readers hold it) and as an Event parse the same.
    nested = {k: line[k] for k in ("event_id", "kind", "time_ms")} | {"payload": payload_fields(payload)}
    assert parse_event(nested) == (payload.KIND, payload)
    assert parse_event(Event("1-0", payload.KIND, 0, payload_fields(payload))) == (payload.KIND, payload)


def test_stored_fields_are_plain_json_in_field_order() -> None:
    survey = payload_fields(PreSurvey(("Sad",), (), "x"))
    assert survey == {"current_feelings": ["Sad"], "desired_feelings": [], "text": "x"}
    assert list(payload_fields(Rating(5, 4, 3))) == ["empathy", "relevance", "fluency", "comment"]
    assert Event("2-0", EventKind.REMINDER, 7, {"text": "t"}).to_json() == {
        "event_id": "2-0",
        "kind": "reminder",
        "time_ms": 7,
        "text": "t",
    }


def test_defaults_unknown_fields_and_number_types() -> None:
    _, created = parse_event({"kind": "session_created", "model_arm": "base", "model_id": "m", "extra": 1})
    assert created == SessionCreated("base", "m")  # Older records lack the later fields; extras are ignored.
    _, reading = parse_event({"kind": "post_response_reading", "turn_id": "t", "delay_s": 5, "scores": None})
    assert isinstance(reading, PostResponseReading) and reading.delay_s == 5.0 and reading.scores is None
    _, face = parse_event({"kind": "fer_reading", "capture_time_ms": 1, "face_found": False, "probabilities": {}})
    assert face == FerReading(1, False, {}, "")


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (["user_message"], "must be a mapping"),
        ({"event_id": "e1", "text": "hi"}, "'e1' has no kind"),
        ({"event_id": "e1", "kind": "shouted"}, "'e1' has unknown kind 'shouted'"),
        ({"event_id": "e1", "kind": 3}, "unknown kind 3"),
        ({"event_id": "e1", "kind": "user_message"}, "user_message event 'e1' has no text"),
        ({"event_id": "e1", "kind": "user_message", "text": 5}, "user_message event 'e1': text must be str, not int"),
        ({"kind": "assistant_message", "text": "a"}, "has no turn_id"),
        ({"kind": "assistant_message", "text": "a", "turn_id": ""}, "needs a non-empty turn_id"),
        ({"kind": "rating", "empathy": True, "relevance": 3, "fluency": 3}, "empathy must be int, not bool"),
        ({"kind": "rating", "empathy": "5", "relevance": 3, "fluency": 3}, "empathy must be int, not str"),
        ({"kind": "fer_reading", "capture_time_ms": 1, "face_found": True, "probabilities": []}, "probabilities"),
        (
            {"kind": "fer_reading", "capture_time_ms": 1, "face_found": True, "probabilities": {"happy": "a lot"}},
            r"probabilities\['happy'\] must be float",
        ),
        ({"kind": "pre_survey", "current_feelings": "Sad"}, "current_feelings must be tuple"),
    ],
)
def test_malformed_events_are_refused_clearly(event: Any, message: str) -> None:
    with pytest.raises(MalformedEvent, match=message):
        parse_event(event)


def test_malformed_is_a_value_error() -> None:
    assert issubclass(MalformedEvent, ValueError)


def test_event_kind_and_fields_accept_every_shape() -> None:
    assert event_kind({"kind": "rating"}) is EventKind.RATING
    assert event_kind(Event("1-0", EventKind.REMINDER, 0, {})) is EventKind.REMINDER
    assert event_fields({"kind": "reminder", "payload": {"text": "t"}}) == {"kind": "reminder", "text": "t"}


def test_payloads_of_parses_only_that_kind() -> None:
    events = [
        stored(PAYLOADS[0]),
        {"kind": "fer_reading", "capture_time_ms": "broken"},  # Not a rating: never parsed.
        stored(Rating(5, 4, 3), "2-0"),
        stored(Rating(1, 2, 3, "meh"), "3-0"),
    ]
    assert list(payloads_of(events, Rating)) == [Rating(5, 4, 3), Rating(1, 2, 3, "meh")]
    assert list(payloads_of(events, UserMessage)) == []
