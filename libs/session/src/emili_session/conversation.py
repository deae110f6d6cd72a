"""The conversation the model saw, rebuilt from a session's events.

The system prompt (when non-empty) comes first; then, in event order, readouts and reminders as ``system``
messages where they occurred, user messages as ``user``, assistant messages as ``assistant`` (carrying their
``turn_id``). Other kinds (``session_created``, readings, surveys, ...) never reached the model and are left
out. The chat service builds its LLM context with this, and labels, datasets and evaluation rebuild the same
context from the stored record, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

from emili_session.events import (
    AssistantMessage,
    Event,
    EventKind,
    ReadoutInjected,
    Reminder,
    SessionCreated,
    UserMessage,
    event_fields,
    parse_event,
    payloads_of,
)

__all__ = ["INJECTED_KINDS", "ROLES", "Role", "Turn", "conversation", "conversation_messages", "system_prompt_of"]

Role = Literal["system", "user", "assistant"]

# Event kinds the model saw, and as which role.
ROLES: Final[Mapping[EventKind, Role]] = MappingProxyType(
    {
        EventKind.USER_MESSAGE: "user",
        EventKind.ASSISTANT_MESSAGE: "assistant",
        EventKind.READOUT_INJECTED: "system",
        EventKind.REMINDER: "system",
    }
)
# System messages the service added mid-conversation (not the system prompt).
INJECTED_KINDS: Final = frozenset({EventKind.READOUT_INJECTED, EventKind.REMINDER})


@dataclass(frozen=True, slots=True)
class Turn:
    kind: EventKind | None  # None for the leading system prompt.
    role: Role
    content: str
    turn_id: str | None = None  # Assistant turns only.
    unprompted: bool = False
    at_limit: bool | None = None  # Assistant turns only: cut off at the token limit (AssistantMessage.at_limit).


def conversation(system_prompt: str, events: Iterable[Event | Mapping[str, Any]]) -> list[Turn]:
    """The messages of a session in order (see the module docstring); :class:`MalformedEvent` (a
    ``ValueError``) when a message event has no text or a reply no turn id."""
    turns = [Turn(None, "system", system_prompt)] if system_prompt.strip() else []
    for event in events:
        fields = event_fields(event)
        if fields.get("kind") not in ROLES:
            continue
        kind, payload = parse_event(fields)
        if isinstance(payload, AssistantMessage):
            turns.append(Turn(kind, "assistant", payload.text, payload.turn_id, payload.unprompted, payload.at_limit))
        elif isinstance(payload, UserMessage | ReadoutInjected | Reminder):
            turns.append(Turn(kind, ROLES[kind], payload.text))
    return turns


def conversation_messages(system_prompt: str, events: Sequence[Event | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as chat messages (``{"role", "content"}``, plus ``turn_id`` on assistant messages)."""
    messages: list[dict[str, Any]] = []
    for turn in conversation(system_prompt, events):
        message: dict[str, Any] = {"role": turn.role, "content": turn.content}
        if turn.turn_id is not None:
            message["turn_id"] = turn.turn_id
        messages.append(message)
    return messages


def system_prompt_of(events: Iterable[Event | Mapping[str, Any]]) -> str:
    """The system prompt recorded when the session was created ("" when none was)."""
    for created in payloads_of(events, SessionCreated):
        return created.system_prompt
    return ""
