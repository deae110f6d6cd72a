"""The LLM's view of a session: rebuilt from recorded events, condensed near the context window."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from emili_chat.llm import Message
from emili_session.conversation import conversation
from emili_session.events import Event


def messages_from_events(system_prompt: str, events: Sequence[Event]) -> list[Message]:
    """The conversation the model saw (:func:`emili_session.conversation.conversation`) as backend messages."""
    return [Message(turn.role, turn.content) for turn in conversation(system_prompt, events)]


def condense(
    messages: Sequence[Message], count_tokens: Callable[[Sequence[Message]], int], budget: int, keep_last: int
) -> list[Message]:
    """Fit ``messages`` into ``budget`` tokens the way EMILI did.

    Keep the system prompt, the user's messages and the assistant replies that answer them, and the
    last ``keep_last`` messages verbatim; drop older readouts and unprompted remarks first, then the
    oldest exchanges, until it fits.
    """
    messages = list(messages)
    if count_tokens(messages) <= budget:
        return messages
    head, body = messages[:1], messages[1:]
    old, recent = body[: max(0, len(body) - keep_last)], body[max(0, len(body) - keep_last) :]
    kept: list[Message] = []
    # A system note between a message and its reply (the short-message reminder, which follows the message,
    # or a fixed-interval readout) must not make the reply look unprompted and be dropped.
    last_spoken: str | None = None
    for message in old:
        answers_user = message.role == "assistant" and last_spoken == "user"
        if message.role == "user" or answers_user:
            kept.append(message)
        if message.role != "system":
            last_spoken = message.role
    while kept and count_tokens(head + kept + recent) > budget:
        kept = kept[2:] if len(kept) >= 2 and kept[1].role == "assistant" else kept[1:]
    return head + kept + recent
