"""A scripted chat model: a test double for the code around the LLM (engine, servicer, simulator, pipeline)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

from emili_chat.llm import ChatBackend, GenerationParams, Message, ReplyEnd

DEFAULT_REPLY = "That sounds lovely. What made you smile?"


class ScriptedBackend(ChatBackend):
    """Answers with canned text, a word per delta, and records what it was asked.

    ``replies`` is one reply, or several used in turn (cycling); ``by_adapter`` gives a model arm (adapter) its own
    reply instead, so arms differ as real models would; ``delta_delay_s`` is the pause before each delta (0 still
    yields to the event loop, so streams interleave as with a real model). Adapters added through the registry are
    remembered, so a model arm loads once, as with a real backend.
    """

    name = "scripted"
    context_window = 4096

    def __init__(
        self,
        replies: str | Sequence[str] = DEFAULT_REPLY,
        *,
        delta_delay_s: float = 0.0,
        by_adapter: Mapping[str, str] | None = None,
    ) -> None:
        self.replies = (replies,) if isinstance(replies, str) else tuple(replies)
        if not self.replies:
            raise ValueError("ScriptedBackend needs at least one reply")
        self._next_reply = itertools.cycle(self.replies)
        self.by_adapter = dict(by_adapter or {})
        self.delta_delay_s = delta_delay_s
        self.calls: list[tuple[list[Message], GenerationParams, str | None]] = []
        self._adapters: list[str] = []

    async def load(self) -> None:
        return None

    def model_id(self, adapter: str | None = None) -> str:
        return "scripted" + (f"+{adapter}" if adapter else "")

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(len(m.content.split()) for m in messages)

    async def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        adapter: str | None = None,
        end: ReplyEnd | None = None,
    ) -> AsyncIterator[str]:
        self.calls.append((list(messages), params, adapter))
        reply = self.by_adapter[adapter] if adapter in self.by_adapter else next(self._next_reply)
        for word in reply.split(" "):
            await asyncio.sleep(self.delta_delay_s)
            yield word + " "
        if end is not None:
            end.at_limit = False  # A scripted reply is always said whole.

    async def add_adapter(self, adapter_id: str, path: Path) -> None:
        self._adapters.append(adapter_id)

    def adapters(self) -> list[str]:
        return list(self._adapters)
