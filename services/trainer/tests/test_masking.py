"""Masking: only the tokens of weight-1 assistant messages (and their end-of-turn marker) carry loss."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from emili_trainer.masking import IGNORE_INDEX, MaskingError, TokenisedExample, tokenise_turns, tokenise_weighted
from emili_trainer.recipes import Recipe
from emili_trainer.training import sft_dataset, train_sft

from .conftest import ARTIFACTS, GGUF

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


# --- one example per weight-1 reply (tokenise_turns) ----------------------------------------------------------

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _word_tokenizer() -> PreTrainedTokenizerBase:
    """A small fast tokenizer (one token per word or punctuation mark) with a ChatML template: the tests below run
    with it when SmolLM2's tokenizer is not on this machine."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = {w for w in " ".join([LONG_PROMPT, *_long_session_texts()]).replace(".", " ").split()}
    backend.add_tokens(sorted(words | {".", "|", "<", ">", "system", "user", "assistant"}))
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(params=["smollm2", "word"])
def any_tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    if request.param == "word":
        return _word_tokenizer()
    if not (ARTIFACTS / GGUF).is_file():
        pytest.skip(f"{GGUF} is not in {ARTIFACTS} (make setup)")
    return request.getfixturevalue("tokenizer")


# About 330 SmolLM2 tokens, like EMILI's own system prompt: longer than EmPO's 256-token recipe on its own.
LONG_PROMPT = " ".join(
    f"Rule {i}. You are EMILI, a warm listener who notices how the user feels and answers kindly." for i in range(17)
)
SHORT_PROMPT = "You are EMILI, a warm listener."


def _long_session_texts(turns: int = 14) -> list[str]:
    return [
        text
        for t in range(turns)
        for text in (
            f"Turn {t}. Today the train was late again and my manager noticed it, which made me feel small.",
            f"Reply {t}. That sounds stressful; being judged for a late train is unfair. How did you answer?",
        )
    ]


def _long_session(system_prompt: str, flag_every: int = 2) -> Conversation:
    messages: Conversation = [{"role": "system", "content": system_prompt}]
    for i, text in enumerate(_long_session_texts()):
        if i % 2 == 0:
            messages.append({"role": "user", "content": text})
            if i % 6 == 4:
                messages.append({"role": "system", "content": f"The user looks SAD ({i})."})
        else:
            messages.append({"role": "assistant", "content": text, "weight": int((i // 2) % flag_every == 0)})
    return messages


def _trained(tokenizer: PreTrainedTokenizerBase, example: TokenisedExample) -> str:
    return str(tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX]))


def _squashed(text: str) -> str:
    """Without whitespace: the word tokenizer decodes with a space between tokens."""
    return "".join(text.split())


@pytest.mark.parametrize("system_prompt", [SHORT_PROMPT, LONG_PROMPT])
def test_every_flagged_reply_is_learned_within_256_tokens(
    any_tokenizer: PreTrainedTokenizerBase, system_prompt: str
) -> None:
    session = _long_session(system_prompt)
    flagged = [m["content"] for m in session if m.get("weight") == 1]
    whole = tokenise_weighted(any_tokenizer, session, 100_000)
    assert len(whole.input_ids) > 2 * 256  # Cut from the start, this session would lose most flagged replies.

    turns = tokenise_turns(any_tokenizer, session, 256)

    assert turns.replies == len(flagged) == len(turns.examples) and turns.unfit == 0
    for example, reply in zip(turns.examples, flagged, strict=True):
        assert len(example.input_ids) == len(example.labels) <= 256
        trained = _squashed(_trained(any_tokenizer, example))
        assert _squashed(reply) in trained and trained.count("Reply") == 1  # That reply, whole, and no other.
        assert _squashed(any_tokenizer.decode(example.input_ids)).endswith(_squashed(reply + "<|im_end|>"))
    assert turns.context_trimmed > 0  # Late replies kept only their recent context.
    if system_prompt == SHORT_PROMPT:
        assert turns.prompt_cut == 0
        assert all(
            _squashed(any_tokenizer.decode(e.input_ids)).startswith(_squashed("<|im_start|>system " + SHORT_PROMPT))
            for e in turns.examples
        )
        last = _squashed(any_tokenizer.decode(turns.examples[-1].input_ids))
        assert "Turn12." in last and "Turn0." not in last  # The oldest messages went first.
    else:
        assert turns.prompt_cut == len(flagged)  # Said so, never silently: the system prompt alone exceeds 256.


def test_context_is_kept_whole_when_it_fits(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> None:
    turns = tokenise_turns(tokenizer, conversation, 4096)
    assert [_trained(tokenizer, e) for e in turns.examples] == [
        "I'm sorry, that sounds exhausting.<|im_end|>\n",
        "Anytime. Do you want to talk about it?<|im_end|>\n",
    ]
    last = turns.examples[-1]
    upto_last = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in conversation], tokenize=False
    )
    assert tokenizer.decode(last.input_ids) == upto_last  # All earlier messages, the weight-0 reply as context.
    assert not last.truncated and turns.context_trimmed == 0


def test_an_open_ended_reply_teaches_its_words_but_not_the_stop(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation
) -> None:
    cut = "I hear you, and I keep wondering whether the"
    session = [*conversation[:2], {"role": "assistant", "content": cut, "weight": 1, "open_end": True}]
    (example,) = tokenise_turns(tokenizer, session, 4096).examples
    assert _trained(tokenizer, example) == cut  # No <|im_end|>: the model said no more because it was cut off.
    assert tokenizer.decode(example.input_ids).endswith(cut + "<|im_end|>\n")  # Still rendered as the model saw it.
    closed = tokenise_turns(tokenizer, [*session[:-1], {**session[-1], "open_end": False}], 4096).examples[0]
    assert _trained(tokenizer, closed) == cut + "<|im_end|>\n"
    short = [*conversation[:2], {"role": "assistant", "content": "im", "weight": 1, "open_end": True}]
    assert _trained(tokenizer, tokenise_turns(tokenizer, short, 4096).examples[0]) == "im"  # Not the "im" of im_end.


def test_an_open_ended_reply_the_template_rewrites_is_refused(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation
) -> None:
    original = tokenizer.chat_template
    tokenizer.chat_template = "{% for m in messages %}{{ m['content']|upper }}|{% endfor %}"
    try:
        with pytest.raises(MaskingError, match="open-ended"):
            tokenise_weighted(
                tokenizer,
                [*conversation[:2], {"role": "assistant", "content": "so the", "weight": 1, "open_end": True}],
                4096,
            )
    finally:
        tokenizer.chat_template = original


def test_a_reply_longer_than_the_limit_keeps_its_start(any_tokenizer: PreTrainedTokenizerBase) -> None:
    reply = " ".join(_long_session_texts()[1::2])
    session = [
        {"role": "system", "content": SHORT_PROMPT},
        {"role": "user", "content": "Tell me everything."},
        {"role": "assistant", "content": reply, "weight": 1},
    ]
    turns = tokenise_turns(any_tokenizer, session, 64)
    (example,) = turns.examples
    assert turns.reply_cut == 1 and len(example.input_ids) == 64
    assert example.labels[0] == IGNORE_INDEX and example.loss_tokens > 32  # Prompt tokens first, then the reply.
    assert _squashed(_trained(any_tokenizer, example)) in _squashed(reply)


def test_no_example_without_trained_tokens(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> None:
    unweighted = [{k: v for k, v in m.items() if k != "weight"} for m in conversation]
    assert tokenise_turns(tokenizer, unweighted, 4096).examples == []
    empty = [*conversation[:2], {"role": "assistant", "content": "", "weight": 1}]
    turns = tokenise_turns(tokenizer, empty, 4096)
    assert all(e.loss_tokens > 0 for e in turns.examples)
    with pytest.raises(MaskingError, match="max_length"):
        tokenise_turns(tokenizer, conversation, 1)


def test_sft_trains_on_every_flagged_reply_with_256_tokens(
    tokenizer: PreTrainedTokenizerBase,
    make_model: Callable[..., Any],
    make_recipe: Callable[..., Recipe],
    tmp_path: Path,
) -> None:
    session = _long_session(LONG_PROMPT)
    records = [{"id": "long", "messages": session}]
    dataset, stats = sft_dataset(tokenizer, records, 256)
    flagged = [m["content"] for m in session if m.get("weight") == 1]
    assert stats["examples"] == stats["replies"] == len(flagged) and stats["prompt_cut"] == len(flagged)
    trained = [
        tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label >= 0])
        for row in dataset
    ]
    assert all(any(reply in text for text in trained) for reply in flagged)
    result = train_sft(
        make_recipe("smollm2-cpu-sft", max_steps=2, max_length=256), tokenizer, make_model(), records, tmp_path
    )
    assert result.steps == 2 and result.details["examples"] == len(flagged)
