"""Reply metrics on hand-computed examples, and reference perplexity on a tiny random Llama."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sacrebleu
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from emili_affect.vad import Lexicon
from emili_testing.plugin import tiny_llama
from emili_trainer.evaluation.intensity import load_emotion_intensity
from emili_trainer.evaluation.metrics import (
    ReplyRow,
    bleu,
    context_text,
    distinct_n,
    diversity,
    mean_lengths,
    nidf,
    nidf_scores,
    reference_perplexity,
    reply_metrics,
    semantic_similarity,
    vad_distance,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = [
    "user",
    "assistant",
    "system",
    "you",
    "are",
    "kind",
    "i",
    "am",
    "sad",
    "happy",
    "tired",
    "that",
    "sounds",
    "hard",
    "what",
    "happened",
    "?",
    "!",
    ".",
    ",",
]


def test_distinct_n_pools_ngrams_over_replies() -> None:
    replies = ["I am sad.", "I am happy!"]
    # Unigrams: i am sad i am happy -> 4 unique of 6; bigrams: (i am) twice, (am sad), (am happy) -> 3 of 4.
    assert distinct_n(replies, 1) == pytest.approx(4 / 6)
    assert distinct_n(replies, 2) == pytest.approx(3 / 4)
    # Bigrams never span two replies: "sad i" is not counted.
    assert distinct_n(["a b a", "b c"], 2) == pytest.approx(3 / 3)
    assert distinct_n(["a b a", "b c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["!!!", "word"], 2) is None


def test_mean_lengths_in_characters_and_words() -> None:
    assert mean_lengths(["  Oh no! ", "That sounds hard."]) == (pytest.approx((6 + 17) / 2), pytest.approx(2.5))
    assert mean_lengths([]) == (None, None)


def test_nidf_by_hand() -> None:
    counts = Counter({"rare": 1, "mid": 10, "common": 100})
    table = nidf_scores(counts)
    # (log 100 - log c) / (log 100 - log 1): 1 for the rarest word, 0 for the most frequent.
    assert table == pytest.approx({"rare": 1.0, "mid": 0.5, "common": 0.0})
    # Reply 1: unique seen words {rare, mid} -> 0.75 (the repeat and the unseen word do not count);
    # reply 2 -> 0; reply 3 has no seen word and is left out.
    score, scored = nidf(["Rare mid unseen mid", "common", "unseen"], counts)
    assert scored == 2
    assert score == pytest.approx((0.75 + 0.0) / 2)
    assert nidf(["a"], Counter({"a": 3, "b": 3})) == (None, 0)  # Equal counts: NIDF is undefined.


def test_diversity_counts() -> None:
    replies = ["Hi there", "hi  THERE", "Oh no, that is sad", "Oh no, that is hard", "Oh well", "!!!"]
    counts = diversity(replies)
    assert counts["unique_replies"] == 5  # "Hi there" and "hi  THERE" fold to one.
    assert counts["unique_start_words"] == 2  # hi, oh ("!!!" has no word).
    # Templates are the first three words: (hi there), (oh no that) twice, (oh well).
    assert counts["unique_templates"] == 3


def test_bleu_matches_sacrebleu() -> None:
    assert bleu(["That sounds really hard."], ["That sounds really hard."]) == pytest.approx(100.0)
    replies = ["the cat sat on the mat today", "what happened then"]
    references = ["the cat sat on a mat", "what happened next"]
    assert bleu(replies, references) == pytest.approx(sacrebleu.corpus_bleu(replies, [references]).score)
    assert bleu([], []) is None


def test_semantic_similarity_is_mean_cosine() -> None:
    vectors = {"a": [1.0, 0.0], "b": [2.0, 0.0], "c": [0.0, 3.0]}

    def embed(texts: Sequence[str]) -> np.ndarray[Any, Any]:
        return np.array([vectors[t] for t in texts])

    # cos(a, b) = 1 (norms are divided out), cos(a, c) = 0.
    assert semantic_similarity(["a", "a"], ["b", "c"], embed) == pytest.approx(0.5)


def _lexicon() -> Lexicon:
    terms = ("happy", "sad", "calm", "furious")
    values = np.array([[0.9, 0.6, 0.7], [0.1, 0.3, 0.2], [0.7, 0.1, 0.6], [0.05, 0.95, 0.5]])
    return Lexicon(name="test-vad", source="test", sha256="0" * 64, terms=terms, values=values)


def test_vad_distance_skips_unknown_words_and_pairs() -> None:
    contexts = ["I am happy zzyzx", "qwerty only", "so furious", "calm"]
    replies = ["happy", "happy", "blorp", "sad and calm"]
    result = vad_distance(contexts, replies, _lexicon())
    # Pair 1: the unknown word is ignored, so both sides are exactly "happy": distance 0, not |0.9/2 - 0.9|.
    # Pair 2: the context has no known word; pair 3: the reply has none. Both are skipped.
    # Pair 4: calm (0.7, 0.1) vs mean(sad, calm) = (0.4, 0.2).
    assert result["pairs_scored"] == 2
    assert result["pairs_skipped"] == 2
    assert result["valence"] == pytest.approx((0.0 + 0.3) / 2)
    assert result["arousal"] == pytest.approx((0.0 + 0.1) / 2)
    assert result["intensity"] is None
    assert result["lexicon"] == "test-vad"


def test_vad_distance_without_lexicon_is_none() -> None:
    result = vad_distance(["happy"], ["sad"])
    assert (result["valence"], result["arousal"], result["pairs_scored"]) == (None, None, 0)


def test_emotion_intensity_loader_and_distance(tmp_path: Path) -> None:
    path = tmp_path / "intensity.txt"
    path.write_text(
        "word\temotion\temotion-intensity-score\n"
        "furious\tanger\t0.9\nfurious\tfear\t0.3\nsad\tsadness\t0.6\nhope\tjoy\t0.4\nhope\ttrust\t0.5\n",
        encoding="utf-8",
    )
    lexicon = load_emotion_intensity(path)
    assert len(lexicon) == 3
    assert lexicon.intensity("Furious") == pytest.approx(0.9)  # The strongest emotion, case-insensitive.
    assert lexicon.intensity("table") is None
    result = vad_distance(["I am furious and sad", "nothing"], ["some hope", "hope"], intensity=lexicon)
    # Context mean(0.9, 0.6) = 0.75 vs reply 0.5; the second pair has no rated context word.
    assert result["intensity"] == pytest.approx(0.25)
    assert (result["intensity_pairs_scored"], result["intensity_pairs_skipped"]) == (1, 1)

    bad = tmp_path / "bad.txt"
    bad.write_text("word\temotion\temotion-intensity-score\nfurious\tanger\tvery\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt:2:"):
        load_emotion_intensity(bad)


def test_context_text_leaves_out_system_messages() -> None:
    context = [
        {"role": "system", "content": "Right now, user looks HAPPY (46)"},
        {"role": "user", "content": "I got the job"},
        {"role": "assistant", "content": "Congratulations"},
    ]
    assert context_text(context) == "I got the job\nCongratulations"
    assert context_text("plain") == "plain"


def test_reply_metrics_is_json_serialisable_and_complete() -> None:
    rows = [
        ReplyRow("I am sad today.", "That sounds hard.", "Oh no, that sounds hard."),
        ("", "I am happy for you!", "Happy for you."),
        {"context": [{"role": "user", "content": "calm"}], "reply": "Calm is good.", "reference": "Nice."},
    ]
    result = reply_metrics(rows, vad_lexicon=_lexicon(), corpus_counts=Counter({"hard": 1, "happy": 5, "calm": 9}))
    json.dumps(result, allow_nan=False)
    for key in (
        "n",
        "bleu",
        "distinct_1",
        "distinct_2",
        "mean_length_chars",
        "mean_length_words",
        "unique_start_words",
        "unique_replies",
        "unique_templates",
        "nidf",
        "semantic_similarity",
        "vad_distance",
    ):
        assert key in result
    assert result["n"] == 3
    assert result["semantic_similarity"] is None  # No embedder given.
    assert result["nidf_corpus"] == "given"
    assert set(result["vad_distance"]) >= {"valence", "arousal", "intensity", "pairs_scored", "pairs_skipped"}
    # Row 1's reply and row 2's (empty) context have no lexicon word; row 3 is calm vs calm.
    assert (result["vad_distance"]["pairs_scored"], result["vad_distance"]["pairs_skipped"]) == (1, 2)
    assert result["vad_distance"]["valence"] == pytest.approx(0.0)


def test_reply_metrics_of_no_rows() -> None:
    result = reply_metrics([])
    assert result["n"] == 0
    assert result["bleu"] is None and result["distinct_1"] is None and result["nidf"] is None


@pytest.fixture(scope="module")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small vocabulary with a ChatML-style template; no Hub access."""
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return tiny_llama(tiny_tokenizer).eval()


def _manual_reference_nll(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, context: str, reference: str
) -> tuple[float, int]:
    """NLL of the reference tokens (and the end-of-turn after them), from the logits of the full sequence."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": context}], add_generation_prompt=True, tokenize=False
    )
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": context}, {"role": "assistant", "content": reference}], tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([full_ids])).logits[0], dim=-1)
    nll = -sum(float(log_probs[i - 1, full_ids[i]]) for i in range(len(prompt_ids), len(full_ids)))
    return nll, len(full_ids) - len(prompt_ids)


def test_reference_perplexity_counts_only_reference_tokens(
    tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    rows = [("i am sad", "ignored", "that sounds hard"), ("i am tired !", "ignored", "what happened ?")]
    ppl = reference_perplexity(tiny_model, tiny_tokenizer, rows)
    assert math.isfinite(ppl) and ppl > 1.0
    parts = [_manual_reference_nll(tiny_model, tiny_tokenizer, c, ref) for c, _, ref in rows]
    expected = math.exp(sum(n for n, _ in parts) / sum(k for _, k in parts))
    assert ppl == pytest.approx(expected, rel=1e-5)

    # The loss over the whole sequence (context included) is a different number.
    ids = tiny_tokenizer(
        tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": "i am sad"}, {"role": "assistant", "content": "that sounds hard"}],
            tokenize=False,
        ),
        add_special_tokens=False,
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        whole = math.exp(float(tiny_model(input_ids=ids, labels=ids).loss))
    single = reference_perplexity(tiny_model, tiny_tokenizer, rows[:1])
    assert single == pytest.approx(math.exp(parts[0][0] / parts[0][1]), rel=1e-5)
    assert single != pytest.approx(whole, rel=1e-3)


def test_reference_perplexity_accepts_message_contexts(
    tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    as_string = reference_perplexity(tiny_model, tiny_tokenizer, [("i am sad", "", "that sounds hard")])
    as_messages = reference_perplexity(
        tiny_model,
        tiny_tokenizer,
        [{"context": [{"role": "user", "content": "i am sad"}], "reply": "", "reference": "that sounds hard"}],
    )
    assert as_messages == pytest.approx(as_string)
    # Another context changes the conditional probability of the same reference.
    other = reference_perplexity(tiny_model, tiny_tokenizer, [("you are kind . i am happy", "", "that sounds hard")])
    assert other != pytest.approx(as_string)
    # Truncation keeps the end of the sequence, so the reference is still scored.
    assert math.isfinite(
        reference_perplexity(tiny_model, tiny_tokenizer, [("i am sad " * 30, "", "what ?")], max_length=8)
    )
    with pytest.raises(ValueError, match="no reference token"):
        reference_perplexity(tiny_model, tiny_tokenizer, [])
