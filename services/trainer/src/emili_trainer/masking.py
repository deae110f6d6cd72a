"""Tokenising a weighted conversation so that the loss falls only on assistant messages of weight 1.

The labeler's SFT records are whole sessions: system prompt, readouts (system messages), user messages and
assistant messages, each assistant message with ``weight`` 1 (its turn was followed by a positive reaction)
or 0. The model must see all of it as context but learn only the weight-1 replies. The chat template is
rendered once for the whole conversation; each assistant message's characters are located by rendering the
conversation up to it (with the generation prompt) and up to its end, and the tokens whose characters fall
in that span are the ones that carry loss. The span includes the template's end-of-turn marker, so the
model also learns where a reply stops. Everything else gets the label -100.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class MaskingError(ValueError):
    """The conversation cannot be tokenised with the model's chat template; the message says why."""


@dataclass(frozen=True)
class TokenisedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on every token that carries no loss.
    truncated: bool

    @property
    def loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], generation: bool) -> str:
    conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)
    if not isinstance(text, str):
        raise MaskingError("the chat template did not render to text")
    return text


def trained_spans(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[range]]:
    """The rendered conversation and the character spans of its weight-1 assistant messages."""
    full = _render(tokenizer, messages, generation=False)
    spans: list[range] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or float(message.get("weight", 0)) != 1.0:
            continue
        before = _render(tokenizer, messages[:i], generation=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], generation=False)
        # Templates that rewrite earlier turns once later ones exist (e.g. dropping reasoning) break this.
        if not through.startswith(before) or not full.startswith(through):
            raise MaskingError("the chat template does not render conversations as a growing prefix")
        spans.append(range(len(before), len(through)))
    return full, spans


def tokenise_weighted(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], max_length: int
) -> TokenisedExample:
    """Input ids and labels for one conversation, cut to ``max_length`` tokens (keeping the start)."""
    if not getattr(tokenizer, "is_fast", False):
        raise MaskingError("a fast tokenizer (with offset mapping) is needed to locate assistant tokens")
    text, spans = trained_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and any(start >= span.start and end <= span.stop for span in spans):
            labels[index] = input_ids[index]
    truncated = len(input_ids) > max_length
    return TokenisedExample(input_ids[:max_length], labels[:max_length], truncated)
