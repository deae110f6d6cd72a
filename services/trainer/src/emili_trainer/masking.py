"""Tokenising a weighted conversation into training examples whose loss falls only on weight-1 assistant replies.

The labeler's SFT records are whole sessions (or EmpatheticDialogues conversations): system prompt, readouts
(system messages), user messages and assistant messages, each assistant message with ``weight`` 1 (its turn was
followed by a positive reaction, or it is a listener turn) or 0. :func:`tokenise_turns` makes ONE example per
weight-1 reply: the system prompt, then as much of the recent conversation as fits ``max_length`` (the oldest
messages are dropped first), then that reply, which alone carries loss (earlier weight-1 replies in its context are
context there and are learned in their own examples). Cutting whole sessions from the start instead loses every
reply late in a session, and all of them when the system prompt alone is longer than the limit.

Loss tokens are located on the rendered chat template: each reply's characters are found by rendering the
conversation up to it (with the generation prompt) and up to its end, and the tokens whose characters fall in that
span carry loss. The span includes the template's end-of-turn marker, so the model also learns where a reply stops,
except after a reply marked ``"open_end": True`` (cut off at the token limit and trained as generated): its span ends
with its last character, so the model learns its words but not to stop there (a template that does not render the
reply's text as it is cannot show where that is: MaskingError, and the SFT job fails with the record's id). Everything
else gets the label -100.

When even the system prompt and the reply alone exceed ``max_length``, the example keeps the end of the prompt
and the whole reply (the start of the system prompt is cut), or, for a reply longer than the limit, a few prompt
tokens and the start of the reply; :class:`TurnExamples` counts both, and a reply with no token left to learn is
never turned into an example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
# A reply longer than max_length keeps this share of the window for the prompt right before it (at least the
# generation prompt, so the model learns the reply's start conditioned on "assistant").
CUT_REPLY_PROMPT_SHARE = 4


class MaskingError(ValueError):
    """The conversation cannot be tokenised with the model's chat template; the message says why."""


@dataclass(frozen=True)
class TokenisedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on every token that carries no loss.
    truncated: bool  # Something was left out: older context, part of the system prompt or of the reply.

    @property
    def loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class TurnExamples:
    """The examples of one conversation, one per weight-1 reply, and what had to be left out to fit."""

    examples: list[TokenisedExample] = field(default_factory=list)
    replies: int = 0  # Weight-1 assistant replies in the conversation.
    context_trimmed: int = 0  # Examples whose oldest messages were dropped to fit.
    prompt_cut: int = 0  # Examples whose system prompt was cut (prompt and reply alone exceed max_length).
    reply_cut: int = 0  # Examples whose reply itself exceeds max_length: only its start is learned.
    unfit: int = 0  # Replies with no token left to learn (max_length too small for any of it): no example.


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], generation: bool) -> str:
    conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)
    if not isinstance(text, str):
        raise MaskingError("the chat template did not render to text")
    return text


def _is_trained(message: Mapping[str, Any]) -> bool:
    return message["role"] == "assistant" and float(message.get("weight", 0)) == 1.0


def trained_spans(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[range]]:
    """The rendered conversation and the character spans of its weight-1 assistant messages."""
    full = _render(tokenizer, messages, generation=False)
    spans: list[range] = []
    for i, message in enumerate(messages):
        if not _is_trained(message):
            continue
        before = _render(tokenizer, messages[:i], generation=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], generation=False)
        # Templates that rewrite earlier turns once later ones exist (e.g. dropping reasoning) break this.
        if not through.startswith(before) or not full.startswith(through):
            raise MaskingError("the chat template does not render conversations as a growing prefix")
        spans.append(range(len(before), _reply_end(message, before, through)))
    return full, spans


def _reply_end(message: Mapping[str, Any], before: str, through: str) -> int:
    """Where a trained reply's loss span ends in ``through``: after the end-of-turn marker, or after the reply's
    last character when it is open-ended."""
    if not message.get("open_end"):
        return len(through)
    content = str(message["content"]).strip()
    # The first match after the generation prompt: a later one could sit inside the end-of-turn marker itself.
    at = through.find(content, len(before)) if content else -1
    if at < 0:
        raise MaskingError("the chat template does not render an open-ended reply's text as it is")
    return at + len(content)


def _check_fast(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise MaskingError("a fast tokenizer (with offset mapping) is needed to locate assistant tokens")


def _encode(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
    """Input ids and labels of the whole conversation (labels on its weight-1 assistant messages)."""
    text, spans = trained_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and any(start >= span.start and end <= span.stop for span in spans):
            labels[index] = input_ids[index]
    return input_ids, labels


def tokenise_weighted(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], max_length: int
) -> TokenisedExample:
    """Input ids and labels for one whole conversation, cut to ``max_length`` tokens (keeping the start)."""
    _check_fast(tokenizer)
    input_ids, labels = _encode(tokenizer, messages)
    truncated = len(input_ids) > max_length
    return TokenisedExample(input_ids[:max_length], labels[:max_length], truncated)


def _only_weighted(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages with weight 1 on the last one only (which keeps its ``open_end``)."""
    out = [{"role": m["role"], "content": m["content"], "weight": 0} for m in messages]
    out[-1]["weight"] = 1
    if messages[-1].get("open_end"):
        out[-1]["open_end"] = True
    return out


def _window(input_ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], str] | None:
    """At most ``max_length`` tokens around the one trained span: the whole reply with the end of the prompt
    ("prompt_cut"), or a few prompt tokens and the start of a reply longer than the limit ("reply_cut")."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained:
        return None
    first, stop = trained[0], trained[-1] + 1
    if stop - first <= max_length - 1:  # The whole reply and at least one token before it (the loss is shifted).
        start, what = max(0, stop - max_length), "prompt_cut"
    else:
        start, what = max(0, first - max(1, max_length // CUT_REPLY_PROMPT_SHARE)), "reply_cut"
    ids, kept = input_ids[start : start + max_length], labels[start : start + max_length]
    if not any(label != IGNORE_INDEX for label in kept[1:]):  # Position 0 predicts nothing.
        return None
    return ids, kept, what


def tokenise_turns(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], max_length: int
) -> TurnExamples:
    """One example per weight-1 assistant reply, each at most ``max_length`` tokens (see the module docstring)."""
    _check_fast(tokenizer)
    if max_length < 2:
        raise MaskingError(f"max_length {max_length} leaves no room for a prompt and a reply")
    result = TurnExamples()
    head = 1 if messages and messages[0]["role"] == "system" else 0  # The system prompt is always kept.
    for index, message in enumerate(messages):
        if not _is_trained(message):
            continue
        result.replies += 1

        def encoded(first: int, index: int = index) -> tuple[list[int], list[int]]:
            return _encode(tokenizer, _only_weighted([*messages[:head], *messages[first : index + 1]]))

        # The earliest context start that fits, by bisection: fewer messages never render longer.
        low, high = head, index  # Starting at `index` keeps no context; `head` keeps all of it.
        if len(encoded(high)[0]) > max_length:
            low = high + 1
        while low < high:
            middle = (low + high) // 2
            if len(encoded(middle)[0]) <= max_length:
                high = middle
            else:
                low = middle + 1
        if low <= index:
            input_ids, labels = encoded(low)
            trimmed = low > head
            result.context_trimmed += trimmed
            if any(label != IGNORE_INDEX for label in labels[1:]):
                result.examples.append(TokenisedExample(input_ids, labels, trimmed))
            else:
                result.unfit += 1  # An empty reply: nothing to learn.
            continue
        window = _window(*encoded(index), max_length)
        if window is None:
            result.unfit += 1
            continue
        input_ids, labels, what = window
        result.context_trimmed += index > head
        if what == "prompt_cut":
            result.prompt_cut += 1
        else:
            result.reply_cut += 1
        result.examples.append(TokenisedExample(input_ids, labels, True))
    return result
