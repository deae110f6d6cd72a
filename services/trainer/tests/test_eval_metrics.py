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
from emili_core.settings import REPO_ROOT
from emili_testing.plugin import tiny_llama
from emili_trainer.evaluation.intensity import load_emotion_intensity
from emili_trainer.evaluation.metrics import (
    ReplyRow,
    bleu,
    context_text,
    distinct_n,
    diversity,
    ed_tokens,
    last_user_utterance,
    load_corpus_counts,
    mean_lengths,
    memoised,
    nidf,
    nidf_scores,
    reference_perplexity,
    reply_metrics,
    response_tries,
    semantic_similarity,
    vad_distance,
    word_counts,
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
    counts = Counter({"Rare": 1, "mid": 10, "common": 100})
    table = nidf_scores(counts)
    # (log 100 - log c) / (log 100 - log 1): 1 for the rarest word, 0 for the most frequent.
    assert table == pytest.approx({"Rare": 1.0, "mid": 0.5, "common": 0.0})
    # As in EmPO: distinct tokens per reply, an unseen token scores 1, case is kept.
    # Reply 1: {Rare 1, mid 0.5, unseen 1} -> 2.5 / 3; reply 2: {common 0, "." 1} -> 0.5; reply 3: {unseen 1}.
    score, scored = nidf(["Rare mid unseen mid", "common.", "unseen"], counts)
    assert scored == 3
    assert score == pytest.approx((2.5 / 3 + 0.5 + 1.0) / 3)
    assert nidf(["rare"], counts) == (pytest.approx(1.0), 1)  # "rare" is not "Rare": unseen.
    assert nidf(["   "], counts) == (None, 0)
    assert nidf(["a"], Counter({"a": 3, "b": 3})) == (None, 0)  # Equal counts: NIDF is undefined.


def test_ed_tokens_follow_nltk_word_tokenize() -> None:
    # Treebank rules per sentence: contractions split, punctuation kept, sentence-final periods split off.
    assert ed_tokens("I'm sad. You aren't, ok?") == ["I", "'m", "sad", ".", "You", "are", "n't", ",", "ok", "?"]
    # Document frequency: a token counts once per text.
    assert word_counts(["so so sad", "so"]) == Counter({"so": 2, "sad": 1})


def test_load_corpus_counts(tmp_path: Path) -> None:
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"word_counts": {"the": 9, "Zebra": 1}, "num_sents": {"the": 9, "Zebra": 1}}))
    assert load_corpus_counts(path) == {"the": 9, "Zebra": 1}
    path.write_text(json.dumps({"num_sents": {}}))
    with pytest.raises(ValueError, match="word_counts"):
        load_corpus_counts(path)


ED_COUNTS = REPO_ROOT.parent / "shared" / "data" / "empatheticdialogues" / "ed_train_val_counts.json"


def test_nidf_on_the_ed_counts() -> None:
    if not ED_COUNTS.is_file():
        pytest.skip(f"development data absent: {ED_COUNTS}")
    counts = load_corpus_counts(ED_COUNTS)
    table = nidf_scores(counts)
    # The most frequent ED token scores 0; a generic reply is less specific than one with rare words.
    assert min(table.values()) == 0.0 and max(table.values()) == 1.0
    generic, _ = nidf(["I am sorry to hear that."], counts)
    specific, _ = nidf(["Did the veterinarian prescribe antibiotics for the parakeet?"], counts)
    assert generic is not None and specific is not None and generic < specific


def test_response_tries_compression_by_hand() -> None:
    # Trie: root, i, am, sad, happy, oh, no = 7 nodes; unfolded: root + 3 + 3 + 2 words = 9 nodes.
    result = response_tries(["I am sad", "i am happy!", "Oh no"])
    assert result == {"trie_nodes": 7, "unfolded_nodes": 9, "compression": pytest.approx(7 / 9)}
    assert response_tries(["a b", "c d"])["compression"] == pytest.approx(1.0)  # Nothing shared.
    assert response_tries(["!!!"])["compression"] is None


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


def test_vad_distance_is_the_max_over_words_and_skips_unknown_pairs() -> None:
    contexts = ["I am happy zzyzx", "qwerty only", "so furious", "calm", "happy but sad"]
    replies = ["happy", "happy", "blorp", "sad and calm", "furious"]
    result = vad_distance(contexts, replies, _lexicon())
    # Pair 1: happy vs happy (the unknown word is ignored): 0. Pairs 2 and 3: one side has no known word: skipped.
    # Pair 4: calm (0.7, 0.1, 0.6) vs max(sad, calm) = (0.7, 0.3, 0.6). The mean would give (0.4, 0.2, 0.4).
    # Pair 5: max(happy, sad) = (0.9, 0.6, 0.7) vs furious (0.05, 0.95, 0.5).
    assert (result["pairs_scored"], result["pairs_skipped"]) == (3, 2)
    assert result["aggregate"] == "max"
    assert result["valence"] == pytest.approx((0.0 + 0.0 + 0.85) / 3)
    assert result["arousal"] == pytest.approx((0.0 + 0.2 + 0.35) / 3)
    assert result["dominance"] == pytest.approx((0.0 + 0.0 + 0.2) / 3)
    # EmPO's signed difference, context - reply.
    assert result["signed"]["arousal"] == pytest.approx((0.0 - 0.2 - 0.35) / 3)
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
    # Context max(0.9, 0.6) = 0.9 vs reply 0.5; the second pair has no rated context word.
    assert result["intensity"] == pytest.approx(0.4)
    assert result["signed"]["intensity"] == pytest.approx(0.4)
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


def test_last_user_utterance_is_the_distance_context() -> None:
    context = [
        {"role": "user", "content": "I lost my job"},
        {"role": "assistant", "content": "Oh no"},
        {"role": "user", "content": "I am furious"},
        {"role": "assistant", "content": "I see"},
    ]
    assert last_user_utterance(context) == "I am furious"
    assert last_user_utterance("plain") == "plain"
    assert last_user_utterance([{"role": "system", "content": "be kind"}]) == ""


def test_memoised_embeds_each_text_once() -> None:
    calls: list[list[str]] = []

    def embed(texts: Sequence[str]) -> np.ndarray[Any, Any]:
        calls.append(list(texts))
        return np.array([[float(len(t))] for t in texts])

    cached = memoised(embed)
    assert cached(["a", "bb", "a"]).tolist() == [[1.0], [2.0], [1.0]]
    assert cached(["bb", "ccc"]).tolist() == [[2.0], [3.0]]
    assert calls == [["a", "bb"], ["ccc"]]


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
        "intensity_distance",
        "response_tries",
        "bertscore_f1",
        "diff_epitome",
    ):
        assert key in result
    assert result["n"] == 3
    assert result["semantic_similarity"] is None  # No embedder given.
    assert result["bertscore_f1"] is None and result["intensity_distance"] is None
    assert result["diff_epitome"]["status"] == "unavailable"
    assert "train-epitome" in result["diff_epitome"]["train_command"]
    assert result["nidf_corpus"] == "given"
    assert set(result["vad_distance"]) >= {"valence", "arousal", "intensity", "pairs_scored", "pairs_skipped"}
    # Row 1's reply and row 2's (empty) context have no lexicon word; row 3 is calm (its user turn) vs calm.
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


def test_without_ed_counts_the_specificity_is_not_called_nidf() -> None:
    rows = [{"context": "I failed my test.", "reply": "That sounds hard.", "reference": "Oh no, that is hard."}]
    rows += [{"context": "We won!", "reply": "So happy for you!", "reference": "Congratulations!"}]
    result = reply_metrics(rows)
    assert result["nidf"] is None and result["nidf_corpus"] == "rows"
    assert result["nidf_rows"] is not None and 0.0 <= result["nidf_rows"] <= 1.0
    given = reply_metrics(rows, corpus_counts=Counter({"hard": 1, "happy": 5, "that": 9}))
    assert given["nidf"] is not None and given["nidf_rows"] is None
