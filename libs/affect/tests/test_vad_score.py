"""Text scoring: means, coverage, per-token sources, limits, the OOV LRU and batching, with a fake embedder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emili_affect.vad import (
    VAD,
    FixedEmbedder,
    Lexicon,
    MemoryEmbeddingCache,
    SoftmaxEstimator,
    VADScorer,
)

TERMS = ("happy", "sad", "table", "altar boy")
VALUES = np.array([[0.9, 0.8, 0.7], [0.1, 0.3, 0.2], [0.5, 0.2, 0.5], [0.6, 0.4, 0.4]])
VECTORS = {
    "happy": [1.0, 0.0, 0.0, 0.0],
    "sad": [0.0, 1.0, 0.0, 0.0],
    "table": [0.0, 0.0, 1.0, 0.0],
    "altar boy": [0.0, 0.0, 0.0, 1.0],
    "joyful": [0.9, 0.1, 0.0, 0.0],
    "gloomy": [0.1, 0.9, 0.0, 0.0],
}


@pytest.fixture
def lexicon() -> Lexicon:
    return Lexicon("tiny", "memory", "c" * 64, TERMS, VALUES)


@pytest.fixture
def embedder() -> FixedEmbedder:
    return FixedEmbedder(VECTORS)


def test_mean_of_lexicon_words_and_case(lexicon: Lexicon, embedder: FixedEmbedder) -> None:
    result = VADScorer(lexicon, embedder).score("HAPPY and Sad!")
    assert result.vad == pytest.approx(VAD(0.5, 0.55, 0.45))
    assert result.tokens == ("happy", "sad")
    assert result.sources == ("lexicon", "lexicon")
    assert result.coverage == 1.0
    assert result.skipped == 1  # "and"
    assert result.lexicon == "tiny"
    assert embedder.calls == []  # Nothing unknown: the lexicon is not even embedded.


def test_unknown_words_count_with_the_softmax_estimate(lexicon: Lexicon, embedder: FixedEmbedder) -> None:
    scorer = VADScorer(lexicon, embedder, beta=10.0)
    result = scorer.score("happy, joyful")
    assert result.tokens == ("happy", "joyful")
    assert result.sources == ("lexicon", "softmax")
    assert result.coverage == 0.5
    matrix = embedder.embed(list(TERMS))
    expected = SoftmaxEstimator(matrix, VALUES, beta=10.0).estimate(embedder.embed(["joyful"]))[0]
    np.testing.assert_allclose(result.token_vad[1], expected, rtol=1e-6)
    np.testing.assert_allclose(result.vad, (VALUES[0] + expected) / 2, rtol=1e-6)  # type: ignore[arg-type]
    # Closer to happy than to sad.
    assert abs(expected[0] - 0.9) < abs(expected[0] - 0.1)


@pytest.mark.parametrize("method", ["topk", "ridge"])
def test_other_methods_name_themselves(lexicon: Lexicon, embedder: FixedEmbedder, method: str) -> None:
    result = VADScorer(lexicon, embedder, oov=method, k=2, alpha=0.1).score("gloomy table")  # type: ignore[arg-type]
    assert result.sources == (method, "lexicon")
    assert result.vad is not None and all(0.0 <= x <= 1.0 for x in result.vad)


def test_without_oov_method_unknown_words_are_left_out(lexicon: Lexicon) -> None:
    result = VADScorer(lexicon, oov=None).score("happy joyful gloomy")
    assert result.vad == pytest.approx(VAD(0.9, 0.8, 0.7))  # Not dragged towards 0 by the unknown words.
    assert result.tokens == ("happy",)
    assert result.unknown == ("joyful", "gloomy")
    assert result.coverage == pytest.approx(1 / 3)
    assert VADScorer(lexicon, oov="none").score("happy joyful gloomy").unknown == ("joyful", "gloomy")
    only_unknown = VADScorer(lexicon, oov=None).score("joyful")
    assert only_unknown.vad is None and only_unknown.coverage == 0.0


@pytest.mark.parametrize("text", ["", "   ", "?!", "😀🎉😢", "the and of", "123 456"])
def test_texts_without_words_give_no_vad(lexicon: Lexicon, embedder: FixedEmbedder, text: str) -> None:
    result = VADScorer(lexicon, embedder).score(text)
    assert result.vad is None and result.coverage is None
    assert result.tokens == () and result.token_vad.shape == (0, 3)


def test_emoji_and_non_english_do_not_crash(lexicon: Lexicon, embedder: FixedEmbedder) -> None:
    result = VADScorer(lexicon, embedder).score("happy 😀 Glücklich 日本語 🎉")
    assert result.tokens == ("happy", "glücklich", "日本語")
    assert result.vad is not None


def test_length_limit(lexicon: Lexicon, embedder: FixedEmbedder) -> None:
    scorer = VADScorer(lexicon, embedder)
    at_limit = ("happy sad " * 10_000)[:100_000]
    assert len(at_limit) == 100_000
    assert scorer.score(at_limit).coverage == 1.0
    with pytest.raises(ValueError, match=r"100,001 characters, over the limit of 100,000 \(max_chars\)"):
        scorer.score(at_limit + "x")
    with pytest.raises(ValueError, match="text 1 has 6 characters"):
        VADScorer(lexicon, embedder, max_chars=5).score_batch(["happy", "happy!"])
    with pytest.raises(TypeError):
        scorer.score_batch([None])  # type: ignore[list-item]


def test_batch_embeds_unknown_words_once_and_caches_them(lexicon: Lexicon, embedder: FixedEmbedder) -> None:
    cache = MemoryEmbeddingCache()
    scorer = VADScorer(lexicon, embedder, cache=cache)
    texts = ["joyful day", "gloomy joyful", "happy"]
    first = scorer.score_batch(texts)
    # One call for the lexicon, one for the batch's distinct unknown words.
    assert embedder.calls == [list(TERMS), ["joyful", "day", "gloomy"]]
    assert (scorer.oov_hits, scorer.oov_misses) == (0, 3)
    again = scorer.score_batch(texts)
    assert len(embedder.calls) == 2
    assert (scorer.oov_hits, scorer.oov_misses) == (3, 3)
    for a, b in zip(first, again, strict=True):
        assert a.vad == pytest.approx(b.vad)
        assert a.tokens == b.tokens
    # A new scorer finds the lexicon's embeddings in the cache.
    VADScorer(lexicon, embedder, cache=cache).score("joyful")
    assert cache.hits == 1
    assert embedder.calls[-1] == ["joyful"]


def test_lru_evicts_least_recently_used(lexicon: Lexicon, embedder: FixedEmbedder) -> None:
    scorer = VADScorer(lexicon, embedder, oov_cache_size=2)
    scorer.score("joyful")
    scorer.score("gloomy")
    scorer.score("joyful")  # Refreshes joyful.
    scorer.score("day")  # Evicts gloomy.
    calls = len(embedder.calls)
    scorer.score("joyful")
    assert len(embedder.calls) == calls
    scorer.score("gloomy")
    assert embedder.calls[-1] == ["gloomy"]


def test_batch_equals_one_by_one(lexicon: Lexicon, embedder: FixedEmbedder) -> None:
    texts = ["", "happy joyful", "Altar boy, sad table", "😀", "gloomy gloomy happy"]
    batch = VADScorer(lexicon, FixedEmbedder(VECTORS)).score_batch(texts)
    single = [VADScorer(lexicon, FixedEmbedder(VECTORS)).score(t) for t in texts]
    for a, b in zip(batch, single, strict=True):
        assert a.tokens == b.tokens and a.sources == b.sources and a.coverage == b.coverage
        if a.vad is None:
            assert b.vad is None
        else:
            assert a.vad == pytest.approx(b.vad)
        np.testing.assert_allclose(a.token_vad, b.token_vad)
    assert batch[2].tokens == ("altar boy", "sad", "table")
    # Repeated words count once per occurrence.
    np.testing.assert_allclose(
        batch[4].vad,  # type: ignore[arg-type]
        (2 * batch[4].token_vad[0] + VALUES[0]) / 3,
    )


def test_result_is_json_able_and_read_only(lexicon: Lexicon, embedder: FixedEmbedder) -> None:
    result = VADScorer(lexicon, embedder).score("happy joyful")
    data = json.loads(json.dumps(result.to_dict()))
    assert data["lexicon"] == "tiny"
    assert set(data["vad"]) == {"valence", "arousal", "dominance"}
    assert [t["source"] for t in data["tokens"]] == ["lexicon", "softmax"]
    with pytest.raises(ValueError, match="read-only"):
        result.token_vad[0, 0] = 0.0


def test_configuration_errors(lexicon: Lexicon) -> None:
    with pytest.raises(ValueError, match="needs an embedder"):
        VADScorer(lexicon)
    with pytest.raises(ValueError, match="unknown OOV method"):
        VADScorer(lexicon, FixedEmbedder(), oov="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k >= 1"):
        VADScorer(lexicon, FixedEmbedder(), oov="topk", k=0)
    VADScorer(lexicon, oov=None).warm()  # Nothing to build.


def test_lemmas_score_inflected_words_as_their_lemma_before_any_estimate(lexicon: Lexicon) -> None:
    lemmas = {"happier": ("happy",), "saddest": ("sad",)}
    scorer = VADScorer(lexicon, None, oov=None, lemmas=lambda word: lemmas.get(word, ()))
    better, worse = scorer.score_batch(["happier table", "saddest table"])
    assert better.vad == pytest.approx(VAD(0.7, 0.5, 0.6))
    assert worse.vad == pytest.approx(VAD(0.3, 0.25, 0.35))
    assert better.coverage == worse.coverage == 1.0
    # Without lemmas both inflected words are unknown and only "table" is scored.
    plain = VADScorer(lexicon, None, oov=None).score_batch(["happier table", "saddest table"])
    assert plain[0].vad == plain[1].vad == pytest.approx(VAD(0.5, 0.2, 0.5))
