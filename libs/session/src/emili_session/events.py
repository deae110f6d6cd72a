"""The session event log: every kind of event the chat service records, and what each one holds.

An event is stored as ``{"event_id", "kind", "time_ms", **payload}`` (a line of ``events.jsonl``; in Redis the
payload is a JSON field beside ``kind`` and ``time_ms``). :class:`EventKind` values are those stored strings,
so a kind compares equal to the plain string. Each kind has one payload dataclass with the fields chat writes;
:func:`parse_event` turns a stored event into ``(kind, payload)`` and raises :class:`MalformedEvent` naming the
event and the field when it does not fit. Fields that readers depend on (a message's text, a reply's turn id,
a rating's scores) are required; metadata that older records or hand-made fixtures may lack has a default.
Unknown extra fields are ignored, so a newer writer does not break an older reader.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

__all__ = [
    "AssistantMessage",
    "Event",
    "EventKind",
    "FerReading",
    "FerRestored",
    "FerUnavailable",
    "FrameStored",
    "FramesDropped",
    "MalformedEvent",
    "Payload",
    "PostResponseReading",
    "PostSurvey",
    "PreSurvey",
    "Rating",
    "ReadoutInjected",
    "Reminder",
    "SessionCreated",
    "SessionEnded",
    "UserMessage",
    "event_fields",
    "event_kind",
    "parse_event",
    "payload_fields",
    "payloads_of",
]


class EventKind(enum.StrEnum):
    SESSION_CREATED = "session_created"
    PRE_SURVEY = "pre_survey"
    POST_SURVEY = "post_survey"
    FRAME_STORED = "frame_stored"
    FER_READING = "fer_reading"
    READOUT_INJECTED = "readout_injected"
    REMINDER = "reminder"
    USER_MESSAGE = "user_message"
    ASSISTANT_MESSAGE = "assistant_message"
    POST_RESPONSE_READING = "post_response_reading"
    RATING = "rating"
    SESSION_ENDED = "session_ended"
    FER_UNAVAILABLE = "fer_unavailable"
    FER_RESTORED = "fer_restored"
    FRAMES_DROPPED = "frames_dropped"


class MalformedEvent(ValueError):
    """A stored event that is not a valid session event (unknown kind, missing or mistyped field)."""


# --- payloads, one per kind ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionCreated:
    KIND: ClassVar[EventKind] = EventKind.SESSION_CREATED
    model_arm: str = ""
    model_id: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # Resolved readout options (cadence, ...).
    system_prompt: str = ""  # Recorded so labels and datasets use exactly what the model saw.
    synthetic: bool = False  # Made by the user simulator, not a person.


@dataclass(frozen=True)
class _Survey:
    """A pre- or post-chat survey (feelings in the words of chat's configured vocabularies). One of each kind per
    session: a resubmission is a new event that replaces it, so readers take the last."""

    current_feelings: tuple[str, ...] = ()
    desired_feelings: tuple[str, ...] = ()
    text: str = ""


@dataclass(frozen=True)
class PreSurvey(_Survey):
    KIND: ClassVar[EventKind] = EventKind.PRE_SURVEY


@dataclass(frozen=True)
class PostSurvey(_Survey):
    KIND: ClassVar[EventKind] = EventKind.POST_SURVEY


@dataclass(frozen=True)
class FrameStored:
    KIND: ClassVar[EventKind] = EventKind.FRAME_STORED
    key: str  # In the frames bucket.
    capture_time_ms: int


@dataclass(frozen=True)
class FerReading:
    KIND: ClassVar[EventKind] = EventKind.FER_READING
    capture_time_ms: int
    face_found: bool
    probabilities: dict[str, float] = field(default_factory=dict)  # 0-1 per emotion; empty without a face.
    source: str = ""  # "fer_service" or "client".


@dataclass(frozen=True)
class FerUnavailable:
    """The FER service stopped answering a conversation's frames: from ``since_ms`` (the capture time of the first
    frame it did not answer, else when the failure was seen) until the next ``fer_restored`` (or the end of the
    session) nothing is known about the face. Readers must not count that gap as "no face"."""

    KIND: ClassVar[EventKind] = EventKind.FER_UNAVAILABLE
    since_ms: int
    error: str = ""  # The gRPC status and details, for operators.


@dataclass(frozen=True)
class FerRestored:
    """FER answers again (its first reading after a ``fer_unavailable``); the gap ended at ``restored_ms``
    (that reading's capture time)."""

    KIND: ClassVar[EventKind] = EventKind.FER_RESTORED
    restored_ms: int
    reconnects: int = 0  # Streams opened to reconnect during the gap.


@dataclass(frozen=True)
class FramesDropped:
    """Frames the user consented to store that were not stored: the chat service's upload buffer was full
    (object storage down for long). ``count`` frames, captured from ``first_capture_ms`` to ``last_capture_ms``."""

    KIND: ClassVar[EventKind] = EventKind.FRAMES_DROPPED
    count: int
    first_capture_ms: int
    last_capture_ms: int
    reason: str = ""


@dataclass(frozen=True)
class ReadoutInjected:
    KIND: ClassVar[EventKind] = EventKind.READOUT_INJECTED
    text: str
    cadence: str = ""
    scores: dict[str, int] | None = None  # The 0-100 aggregate it describes; None when no face was seen.


@dataclass(frozen=True)
class Reminder:
    KIND: ClassVar[EventKind] = EventKind.REMINDER
    text: str


@dataclass(frozen=True)
class UserMessage:
    KIND: ClassVar[EventKind] = EventKind.USER_MESSAGE
    text: str
    client_time_ms: int = 0


@dataclass(frozen=True)
class AssistantMessage:
    KIND: ClassVar[EventKind] = EventKind.ASSISTANT_MESSAGE
    text: str
    turn_id: str  # Labels and post-response readings refer to the reply by it.
    unprompted: bool = False  # Spoken on a change of face, not in answer to a user message.
    model_id: str = ""
    adapter: str | None = None
    model_arm: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # Generation parameters (temperature, max_new_tokens).
    # Cut off at max_new_tokens (True), ended by the model (False), or not known (None: the backend cannot tell, or
    # the reply was recorded before this was). SFT never trains on a cut reply, nor DPO prefers one
    # (emili_labeler.datasets).
    at_limit: bool | None = None

    def __post_init__(self) -> None:
        if not self.turn_id:
            raise MalformedEvent("an assistant message needs a non-empty turn_id")


@dataclass(frozen=True)
class PostResponseReading:
    KIND: ClassVar[EventKind] = EventKind.POST_RESPONSE_READING
    turn_id: str
    delay_s: float
    scores: dict[str, int] | None = None
    fer_unavailable: bool = False  # The FER service was down: scores None means "unknown", not "no face".


@dataclass(frozen=True)
class Rating:
    """A session's rating. A session has one: a resubmission is a new event that replaces it, so readers take the
    last (``list(payloads_of(events, Rating))[-1]``); chat accepts none after ``session_ended``."""

    KIND: ClassVar[EventKind] = EventKind.RATING
    empathy: int  # Likert 1-5, like the other two.
    relevance: int
    fluency: int
    comment: str = ""


@dataclass(frozen=True)
class SessionEnded:
    KIND: ClassVar[EventKind] = EventKind.SESSION_ENDED


Payload = (
    SessionCreated
    | PreSurvey
    | PostSurvey
    | FrameStored
    | FerReading
    | ReadoutInjected
    | Reminder
    | UserMessage
    | AssistantMessage
    | PostResponseReading
    | Rating
    | SessionEnded
    | FerUnavailable
    | FerRestored
    | FramesDropped
)
_PAYLOAD_TYPES: dict[EventKind, type[Payload]] = {
    cls.KIND: cls
    for cls in (
        SessionCreated,
        PreSurvey,
        PostSurvey,
        FrameStored,
        FerReading,
        ReadoutInjected,
        Reminder,
        UserMessage,
        AssistantMessage,
        PostResponseReading,
        Rating,
        SessionEnded,
        FerUnavailable,
        FerRestored,
        FramesDropped,
    )
}
assert set(_PAYLOAD_TYPES) == set(EventKind), "every event kind needs a payload type"
_KIND_VALUES = frozenset(k.value for k in EventKind)


# --- the stored event ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One event as recorded: its stream id, kind, wall-clock time and the payload's stored fields."""

    event_id: str
    kind: EventKind
    time_ms: int
    payload: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The ``events.jsonl`` line."""
        return {"event_id": self.event_id, "kind": str(self.kind), "time_ms": self.time_ms, **self.payload}


def payload_fields(payload: Payload) -> dict[str, Any]:
    """The payload as stored: plain JSON types (tuples become lists), in field order."""
    return {f.name: _plain(getattr(payload, f.name)) for f in dataclasses.fields(payload)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --- reading -------------------------------------------------------------------------------------------------


def event_fields(event: Event | Mapping[str, Any]) -> dict[str, Any]:
    """An event's fields flat (``{"event_id", "kind", "time_ms", **payload}``), whichever shape it comes in:
    an :class:`Event`, a stored ``events.jsonl`` line, or a line with its payload under ``"payload"``."""
    if isinstance(event, Event):
        return event.to_json()
    if not isinstance(event, Mapping):
        raise MalformedEvent(f"an event must be a mapping, not {type(event).__name__}")
    payload = event.get("payload")
    if isinstance(payload, Mapping):
        return {**{k: v for k, v in event.items() if k != "payload"}, **payload}
    return dict(event)


def event_kind(event: Event | Mapping[str, Any]) -> EventKind:
    """The event's kind; :class:`MalformedEvent` when it has none or an unknown one."""
    kind = event.kind if isinstance(event, Event) else event_fields(event).get("kind")
    if kind is None:
        raise MalformedEvent(f"event {_event_id(event)!r} has no kind")
    if isinstance(kind, str) and kind in _KIND_VALUES:
        return EventKind(kind)
    raise MalformedEvent(f"event {_event_id(event)!r} has unknown kind {kind!r}")


def parse_event(event: Event | Mapping[str, Any]) -> tuple[EventKind, Payload]:
    """``(kind, payload)`` of a stored event; :class:`MalformedEvent` names what does not fit."""
    fields = event_fields(event)
    kind = event_kind(fields)
    cls = _PAYLOAD_TYPES[kind]
    where = f"{kind} event {fields.get('event_id')!r}"
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in fields:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MalformedEvent(f"{where} has no {f.name}")
            continue
        values[f.name] = _conform(fields[f.name], hints[f.name], f"{where}: {f.name}")
    try:
        return kind, cls(**values)
    except MalformedEvent as exc:
        raise MalformedEvent(f"{where}: {exc}") from None


P = TypeVar("P", bound=Payload)


def payloads_of(events: Iterable[Event | Mapping[str, Any]], cls: type[P]) -> Iterator[P]:
    """The payloads of the events of ``cls``'s kind, in order (only those events are parsed)."""
    for event in events:
        fields = event_fields(event)
        if fields.get("kind") == cls.KIND:
            _, payload = parse_event(fields)
            assert isinstance(payload, cls)
            yield payload


def _event_id(event: Event | Mapping[str, Any]) -> Any:
    return event.event_id if isinstance(event, Event) else event.get("event_id")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _conform(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against a field's type (and made the declared kind: int to float, list to tuple)."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Union or origin is types.UnionType:
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(get_args(hint)):
            return None
        assert len(options) == 1, "payload fields are T or T | None"
        return _conform(value, options[0], where)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if origin is dict and isinstance(value, Mapping):
        _, value_type = get_args(hint)
        if not all(isinstance(k, str) for k in value):
            raise MalformedEvent(f"{where} must have string keys")
        return {k: _conform(v, value_type, f"{where}[{k!r}]") for k, v in value.items()}
    if origin is tuple and isinstance(value, list | tuple):
        item_type = get_args(hint)[0]
        return tuple(_conform(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    expected = getattr(hint, "__name__", None) or str(hint)
    raise MalformedEvent(f"{where} must be {expected}, not {type(value).__name__} ({value!r:.60})")
