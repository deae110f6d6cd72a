"""Masking: only the tokens of weight-1 assistant messages (and their end-of-turn marker) carry loss."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from emili_trainer.masking import IGNORE_INDEX, MaskingError, tokenise_weighted

Conversation = list[dict[str, Any]]


def _trained_text(tokenizer: PreTrainedTokenizerBase, messages: Conversation, max_length: int = 4096) -> str:
    example = tokenise_weighted(tokenizer, messages, max_length)
    return str(
        tokenizer.decode(
            [i for i, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
        )
    )


def test_only_weight_one_replies_carry_loss(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> None:
    trained = _trained_text(tokenizer, conversation)
    assert trained == (
        "I'm sorry, that sounds exhausting.<|im_end|>\nAnytime. Do you want to talk about it?<|im_end|>\n"
    )
    for message in conversation:
        if message.get("weight") != 1:
            assert str(message["content"]) not in trained  # Not the user, the system prompt, readouts, weight-0.


def test_labels_equal_inputs_where_they_count(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> None:
    example = tokenise_weighted(tokenizer, conversation, 4096)
    assert len(example.input_ids) == len(example.labels)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels, strict=True))
    full = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in conversation], tokenize=False
    )
    assert tokenizer.decode(example.input_ids) == full  # The model sees the whole conversation as context.


def test_no_weight_means_no_loss(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> None:
    unweighted = [{k: v for k, v in m.items() if k != "weight"} for m in conversation]
    assert tokenise_weighted(tokenizer, unweighted, 4096).loss_tokens == 0


def test_truncation_keeps_the_start(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> None:
    full = tokenise_weighted(tokenizer, conversation, 4096)
    cut = tokenise_weighted(tokenizer, conversation, 40)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:40]
    assert cut.loss_tokens < full.loss_tokens


def test_a_template_that_rewrites_history_is_refused(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation
) -> None:
    odd = tokenizer
    original = odd.chat_template
    # Writes the number of messages first: each prefix renders differently, so spans cannot be found.
    odd.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        with pytest.raises(MaskingError, match="growing prefix"):
            tokenise_weighted(odd, conversation, 4096)
    finally:
        odd.chat_template = original
