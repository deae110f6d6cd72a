"""The one interface every chat LLM backend implements, and what all of them share.

A backend streams text deltas for a conversation. Errors are :class:`BackendError` (permanent: a bad
request, an unknown adapter) or :class:`TransientBackendError` (worth retrying: rate limits, overload,
timeouts, dropped connections). :func:`stream_with_retries` adds timeouts and retries on top of any backend.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class GenerationParams:
    temperature: float = 1.0  # 0 = greedy.
    max_new_tokens: int = 160
    top_p: float = 1.0
    seed: int | None = None  # Honoured where the backend can (local, OpenAI-compatible); ignored otherwise.


@dataclass
class ReplyEnd:
    """How a streamed reply ended, filled in by the backend once its stream is exhausted. A reply cut off at
    ``max_new_tokens`` stops mid-thought: fine-tuning on it as it is would teach the model to stop there too."""

    at_limit: bool | None = None  # True: cut off at max_new_tokens; False: the model ended it; None: unknown.


class BackendError(Exception):
    """A failure that retrying the same request will not fix."""


class TransientBackendError(BackendError):
    """A failure that may go away on retry: rate limit, overload, server error, timeout, lost connection."""


class ChatBackend(abc.ABC):
    """A chat model that streams replies. Implementations: local Hugging Face model, OpenAI-compatible, Anthropic."""

    name: str
    context_window: int  # Tokens the model accepts, prompt and reply together.

    @abc.abstractmethod
    async def load(self) -> None:
        """Load and warm up; may take a while. Called once before the first :meth:`stream`."""

    @abc.abstractmethod
    def model_id(self, adapter: str | None = None) -> str:
        """What produced a reply, for transcripts: the model name, plus ``+<adapter>`` when one is used."""

    @abc.abstractmethod
    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Prompt size of ``messages`` in tokens (exact or approximate, see the backend)."""

    @abc.abstractmethod
    def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        adapter: str | None = None,
        end: ReplyEnd | None = None,
    ) -> AsyncIterator[str]:
        """Yield the reply as text deltas. Stopping iteration early (closing the generator) stops generation. When
        the stream is exhausted, ``end`` (if given) says whether the reply was cut off at ``max_new_tokens``."""

    async def add_adapter(self, adapter_id: str, path: Path) -> None:
        """Make a LoRA adapter (a PEFT folder) available as ``adapter_id`` without restarting."""
        raise BackendError(f"adapters not supported by {self.name}")

    def adapters(self) -> list[str]:
        """Ids of the adapters that are loaded."""
        return []

    async def has_adapter(self, adapter_id: str) -> bool:
        """Whether ``adapter_id`` can be asked for now; a remote server may have it without :meth:`add_adapter`."""
        return adapter_id in self.adapters()

    async def aclose(self) -> None:  # noqa: B027 - optional hook, deliberately not abstract.
        """Release connections or threads the backend owns."""


# --- system messages in the middle of a conversation ------------------------------------------------------

READOUT_LABEL = "Facial expression readout"
NOTE_LABEL = "System note"
# How EMILI's readouts begin (emili_chat.readout.readout_message); anything else is a generic note.
_READOUT_PREFIXES = ("Right now, user", "Previously, user", "User is not visible")


def note_label(text: str) -> str:
    """The bracketed label that introduces a mid-conversation system message folded into a user turn."""
    return READOUT_LABEL if text.startswith(_READOUT_PREFIXES) else NOTE_LABEL


CONVERSATION_START = f"[{NOTE_LABEL}] The conversation begins."


def fold_system_messages(
    messages: Sequence[Message], label: Callable[[str], str] = note_label
) -> tuple[str, list[Message]]:
    """Rewrite a conversation for APIs that take one system prompt and strictly alternating turns.

    Returns ``(system, turns)``. ``system`` is the first message when that is a system message (the system
    prompt). Every other system message becomes ``[<label>] <text>`` in a user turn, so a readout ends up
    prepended to the user message that follows it (even the readout before the first user message, which
    keeps the system prompt the same all conversation long). Consecutive turns of the same role are merged
    with blank lines; turns always start with a user turn (a short placeholder when the assistant speaks
    first); blank messages are dropped, since such APIs reject empty text.
    """
    system = ""
    turns: list[tuple[Role, list[str]]] = []
    for index, message in enumerate(messages):
        if not message.content.strip():
            continue
        if message.role == "system" and index == 0:
            system = message.content
            continue
        if message.role == "system":
            role: Role = "user"
            text = f"[{label(message.content)}] {message.content}"
        else:
            role, text = message.role, message.content
        if not turns and role == "assistant":
            turns.append(("user", [CONVERSATION_START]))
        if turns and turns[-1][0] == role:
            turns[-1][1].append(text)
        else:
            turns.append((role, [text]))
    return system, [Message(role, "\n\n".join(parts)) for role, parts in turns]


def approximate_tokens(messages: Sequence[Message]) -> int:
    """About 4 characters per token (English, BPE), plus a few tokens of per-message framing.

    For remote backends, whose tokenizers are not available locally; good enough to keep a prompt inside
    the context window with some margin, not for billing.
    """
    return sum(len(m.content) // 4 + 4 for m in messages) + 3


# --- retries and timeouts -----------------------------------------------------------------------------------


async def _close(stream: AsyncIterator[str]) -> None:
    if isinstance(stream, AsyncGenerator):
        await stream.aclose()


async def stream_with_retries(
    backend: ChatBackend,
    messages: Sequence[Message],
    params: GenerationParams,
    adapter: str | None = None,
    *,
    attempts: int = 3,
    first_token_timeout_s: float = 60.0,
    idle_timeout_s: float = 30.0,
    backoff_s: float = 0.5,
    max_backoff_s: float = 8.0,
    end: ReplyEnd | None = None,
) -> AsyncIterator[str]:
    """``backend.stream`` with timeouts, and retries of transient failures that happen before any text.

    * No text within ``first_token_timeout_s`` of starting an attempt, or a gap of more than
      ``idle_timeout_s`` between deltas, raises :class:`TransientBackendError`.
    * A transient failure (including those timeouts) is retried, up to ``attempts`` attempts in all with
      exponential backoff, only while nothing has been yielded: a retry after partial output would repeat text
      the caller has already shown. Afterwards it propagates.
    * Permanent :class:`BackendError` propagates at once.
    * ``end`` is passed to the backend: once the stream is exhausted it says how the reply ended.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    loop = asyncio.get_running_loop()
    for attempt in range(1, attempts + 1):
        yielded = False
        stream = backend.stream(messages, params, adapter, end)
        try:
            # One deadline for the first text, so empty keep-alive deltas cannot extend it.
            first_deadline = loop.time() + first_token_timeout_s
            while True:
                deadline = loop.time() + idle_timeout_s if yielded else first_deadline
                try:
                    async with asyncio.timeout_at(deadline):
                        delta = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError as exc:
                    what = (
                        f"no text for {idle_timeout_s:g} s"
                        if yielded
                        else f"no first token in {first_token_timeout_s:g} s"
                    )
                    raise TransientBackendError(f"{backend.name}: {what}") from exc
                if delta:
                    yielded = True
                    yield delta
        except TransientBackendError as exc:
            if yielded or attempt == attempts:
                raise
            delay = min(max_backoff_s, backoff_s * 2 ** (attempt - 1))
            log.warning("%s attempt %d/%d failed (%s); retrying in %.2f s", backend.name, attempt, attempts, exc, delay)
        finally:
            await _close(stream)
        await asyncio.sleep(delay)  # Only reached after a failure that is retried.
