"""Paired arm-vs-base comparison: resampled statistics equal the metrics recomputed on the resample, and the
bootstrap's difference, CI and p-value behave on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu

from emili_affect.vad import raw_tokens
from emili_trainer.evaluation.metrics import distinct_n
from emili_trainer.evaluation.paired import _Scores, paired_bootstrap, paired_report, seed_summary

REFERENCES = [
    "i am so sorry to hear that",
    "that sounds like a lot of fun",
    "oh no , what happened next ?",
    "congratulations on the new job !",
    "i hope your dog gets better soon",
    "that must have been scary",
]
CLOSE = [
    "i am so sorry to hear it",
    "that sounds like fun",
    "oh no , what happened ?",
    "congratulations on the job !",
    "i hope your dog is better soon",
    "that must be scary",
]
FAR = ["ok", "ok", "hm", "ok then", "fine", "ok"]


def test_resampled_bleu_and_distinct_equal_the_metrics_on_the_resample() -> None:
    scores = _Scores([CLOSE], REFERENCES)
    idx = np.array([0, 0, 3, 5, 5, 2], dtype=np.int64)
    replies = [CLOSE[i] for i in idx]
    references = [REFERENCES[i] for i in idx]
    bleu = scores.statistic("bleu")
    assert bleu is not None
    assert bleu(idx) == pytest.approx(sacrebleu.corpus_bleu(replies, [references]).score)
    for n in (1, 2):
        distinct = scores.statistic(f"distinct_{n}")
        assert distinct is not None
        assert distinct(idx) == pytest.approx(distinct_n(replies, n))
    assert scores.statistic("semantic_similarity") is None  # No embedder, no similarity.


def test_statistics_average_over_seeds() -> None:
    scores = _Scores([CLOSE, FAR], REFERENCES)
    everything = np.arange(len(REFERENCES), dtype=np.int64)
    words = scores.statistic("mean_length_words")
    assert words is not None
    close_words = np.mean([len(raw_tokens(r)) for r in CLOSE])
    far_words = np.mean([len(raw_tokens(r)) for r in FAR])
    assert words(everything) == pytest.approx((close_words + far_words) / 2)
    assert scores.per_seed("mean_length_words") == pytest.approx([close_words, far_words])


def test_identical_arms_differ_by_nothing() -> None:
    scores = _Scores([CLOSE], REFERENCES)
    bleu = scores.statistic("bleu")
    assert bleu is not None
    result = paired_bootstrap(len(REFERENCES), bleu, bleu, samples=200)
    assert result["diff"] == 0.0 and result["ci95"] == [0.0, 0.0]
    assert result["p_value"] == 1.0


def test_a_better_arm_has_a_positive_interval_and_a_small_p() -> None:
    base, arm = _Scores([FAR], REFERENCES), _Scores([CLOSE], REFERENCES)
    base_words, arm_words = base.statistic("mean_length_words"), arm.statistic("mean_length_words")
    assert base_words is not None and arm_words is not None
    result = paired_bootstrap(len(REFERENCES), base_words, arm_words, samples=500, seed=3)
    expected = np.mean([len(raw_tokens(r)) for r in CLOSE]) - np.mean([len(raw_tokens(r)) for r in FAR])
    assert result["diff"] == pytest.approx(expected)
    low, high = result["ci95"]
    assert 0 < low <= expected <= high
    # Every resample favours the arm: the p-value is the smallest the resamples can give.
    assert result["p_value"] == pytest.approx(2 / 501)
    assert paired_bootstrap(len(REFERENCES), base_words, arm_words, samples=500, seed=3) == result
    with pytest.raises(ValueError, match="at least one context"):
        paired_bootstrap(0, base_words, arm_words)


def test_seed_summary_by_hand() -> None:
    assert seed_summary([1.0, 3.0]) == {"mean": 2.0, "sd": pytest.approx(np.sqrt(2.0)), "per_seed": [1.0, 3.0]}
    assert seed_summary([5.0])["sd"] is None  # One seed has no spread to report.
    assert seed_summary([float("nan")])["mean"] is None


def test_paired_report_over_arms_and_seeds() -> None:
    def embed(texts: list[str]) -> np.ndarray:
        # A fake embedder: a text's vector counts a few words, so close replies point like their references.
        vocabulary = ["sorry", "fun", "happened", "job", "dog", "scary", "ok"]
        return np.array([[t.split().count(w) + 0.01 for w in vocabulary] for t in texts])

    report = paired_report(
        {"base": [FAR, FAR], "sft": [CLOSE, CLOSE[::-1]]}, REFERENCES, [0, 1], base="base", embed=embed, samples=200
    )
    assert report["seeds"] == [0, 1] and report["n_contexts"] == len(REFERENCES)
    assert list(report["metrics"]) == ["bleu", "semantic_similarity", "distinct_1", "distinct_2", "mean_length_words"]
    similarity = report["metrics"]["semantic_similarity"]
    assert set(similarity["vs_base"]) == {"sft"}  # The base is not compared with itself.
    assert similarity["arms"]["base"]["sd"] == 0.0  # The same replies under both seeds.
    assert similarity["arms"]["sft"]["sd"] > 0  # The reversed replies no longer match their references.
    assert similarity["vs_base"]["sft"]["diff"] > 0
    with pytest.raises(ValueError, match="one list of replies per seed"):
        paired_report({"base": [FAR], "sft": [CLOSE, CLOSE]}, REFERENCES, [0], base="base")
    with pytest.raises(ValueError, match="base arm"):
        paired_report({"sft": [CLOSE]}, REFERENCES, [None], base="base")
    with pytest.raises(ValueError, match="one to one"):
        paired_report({"base": [FAR[:2]]}, REFERENCES, [None], base="base")
