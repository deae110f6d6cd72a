"""Choosing a backend by name, as the settings name it."""

from __future__ import annotations

from typing import Any, Literal

from emili_chat.llm.base import ChatBackend

BackendKind = Literal["local", "openai", "anthropic"]


def build_backend(kind: BackendKind, **kwargs: Any) -> ChatBackend:
    """A backend of ``kind``, constructed with ``kwargs`` (the arguments of its class).

    ``local``: :class:`~emili_chat.llm.local_hf.LocalHFBackend` (imported only here, as it loads torch);
    ``openai``: :class:`~emili_chat.llm.openai_compat.OpenAICompatBackend`;
    ``anthropic``: :class:`~emili_chat.llm.anthropic.AnthropicBackend`.
    """
    if kind == "local":
        from emili_chat.llm.local_hf import LocalHFBackend

        return LocalHFBackend(**kwargs)
    if kind == "openai":
        from emili_chat.llm.openai_compat import OpenAICompatBackend

        return OpenAICompatBackend(**kwargs)
    if kind == "anthropic":
        from emili_chat.llm.anthropic import AnthropicBackend

        return AnthropicBackend(**kwargs)
    raise ValueError(f"unknown backend kind {kind!r}; expected local, openai or anthropic")
