"""The chat service's LLM backends: one streaming interface over a local model, OpenAI-compatible servers and Anthropic.

``LocalHFBackend`` is imported on first use, so that importing this package does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emili_chat.llm.anthropic import AnthropicBackend
from emili_chat.llm.base import (
    BackendError,
    ChatBackend,
    GenerationParams,
    Message,
    ReplyEnd,
    TransientBackendError,
    fold_system_messages,
    stream_with_retries,
)
from emili_chat.llm.factory import build_backend
from emili_chat.llm.openai_compat import OpenAICompatBackend

if TYPE_CHECKING:
    from emili_chat.llm.local_hf import LocalHFBackend

__all__ = [
    "AnthropicBackend",
    "BackendError",
    "ChatBackend",
    "GenerationParams",
    "LocalHFBackend",
    "Message",
    "OpenAICompatBackend",
    "ReplyEnd",
    "TransientBackendError",
    "build_backend",
    "fold_system_messages",
    "stream_with_retries",
]


def __getattr__(name: str) -> Any:
    if name == "LocalHFBackend":
        from emili_chat.llm.local_hf import LocalHFBackend

        return LocalHFBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
