"""Arm-vs-base differences over the same contexts: mean ± sd over seeds, and paired bootstrap tests.

Every arm answers the same contexts, once per seed. For each metric this module reports, per arm, the mean and
sample standard deviation of the metric over seeds (EmPO's "mean ± sd over seeds"), and for each arm other than
the base the difference arm minus base with a paired bootstrap over contexts: contexts are resampled with
replacement, the same resampled contexts are scored for both arms (every seed; the statistic is the mean over
seeds), and the differences give a percentile 95% CI and a two-sided p-value
``min(1, 2 * min(#(diff <= 0), #(diff >= 0)) + 1) / (B + 1))``. Resampling contexts, not replies, keeps the
pairing: a context that is hard for both arms moves both.

Corpus-level metrics (BLEU, Distinct-n) are recomputed on each resample from per-reply statistics computed
once (sacrebleu's sentence statistics; each reply's n-grams), so a test over the 2,547 EmpatheticDialogues test
contexts re-tokenises nothing per resample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sacrebleu.metrics.bleu import BLEU

from emili_affect.vad import raw_tokens

__all__ = ["PAIRED_METRICS", "ArmReplies", "paired_bootstrap", "paired_report", "seed_summary"]

# (key, label) of the metrics tested; semantic similarity only when an embedder is given.
PAIRED_METRICS: tuple[tuple[str, str], ...] = (
    ("bleu", "BLEU"),
    ("semantic_similarity", "Semantic similarity (MiniLM cosine)"),
    ("distinct_1", "Distinct-1"),
    ("distinct_2", "Distinct-2"),
    ("mean_length_words", "Mean length (words)"),
)
DEFAULT_SAMPLES = 1000

Indices = npt.NDArray[np.int64]
Statistic = Callable[[Indices], float]
# Per arm: one list of replies per seed, each aligned with the shared references.
ArmReplies = Mapping[str, Sequence[Sequence[str]]]


def paired_bootstrap(
    n: int, base: Statistic, arm: Statistic, samples: int = DEFAULT_SAMPLES, seed: int = 0
) -> dict[str, Any]:
    """The difference ``arm(all) - base(all)`` over ``n`` contexts, with a paired bootstrap CI and p-value.

    ``base`` and ``arm`` map an index array of contexts (with repeats) to the statistic over those contexts.
    """
    if n < 1:
        raise ValueError("a paired test needs at least one context")
    everything = np.arange(n, dtype=np.int64)
    observed = arm(everything) - base(everything)
    rng = np.random.default_rng(seed)
    diffs = np.empty(samples)
    for b in range(samples):
        idx = rng.integers(0, n, size=n)
        diffs[b] = arm(idx) - base(idx)
    diffs = diffs[~np.isnan(diffs)]
    if len(diffs) == 0:
        return {"diff": float(observed), "ci95": [None, None], "p_value": None, "n": n, "samples": 0}
    below, above = int((diffs <= 0).sum()), int((diffs >= 0).sum())
    p_value = min(1.0, 2.0 * (min(below, above) + 1) / (len(diffs) + 1))
    return {
        "diff": float(observed),
        "ci95": [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))],
        "p_value": p_value,
        "n": n,
        "samples": len(diffs),
    }


class _Scores:
    """Per-reply statistics of one arm's replies (one list per seed) to the shared contexts."""

    _bleu = BLEU()

    def __init__(self, runs: Sequence[Sequence[str]], references: Sequence[str], embed: Any = None) -> None:
        self.runs = [list(r) for r in runs]
        if any(len(r) != len(references) for r in self.runs):
            raise ValueError("every seed's replies must match the references one to one")
        # sacrebleu's per-sentence match counts; their sums give the corpus BLEU of any resample.
        self.bleu_stats = [
            np.asarray(self._bleu._extract_corpus_statistics(r, [list(references)]), dtype=np.float64)
            for r in self.runs
        ]
        tokens = [[raw_tokens(reply) for reply in r] for r in self.runs]
        self.words = [np.asarray([len(t) for t in run], dtype=np.float64) for run in tokens]
        # Per n and seed: every n-gram of every reply as an integer id, with the reply it came from, so the
        # unique n-grams of a resample are counted with numpy instead of set unions.
        self.grams = {n: [_gram_ids(run, n) for run in tokens] for n in (1, 2)}
        self.cosines: list[npt.NDArray[np.float64]] | None = None
        if embed is not None:
            refs = np.asarray(embed(list(references)), dtype=np.float64)
            self.cosines = [_cosines(np.asarray(embed(r), dtype=np.float64), refs) for r in self.runs]

    def _over_seeds(self, per_seed: Callable[[int, Indices], float], seeds: Sequence[int]) -> Statistic:
        return lambda idx: float(np.mean([per_seed(s, idx) for s in seeds]))

    def _bleu_of(self, s: int, idx: Indices) -> float:
        return float(self._bleu._compute_score_from_stats(list(self.bleu_stats[s][idx].sum(axis=0))).score)

    def _distinct_of(self, n: int, s: int, idx: Indices) -> float:
        ids, owner, counts = self.grams[n][s]
        total = int(counts[idx].sum())
        chosen = np.zeros(len(counts), dtype=bool)
        chosen[idx] = True
        unique = int(np.count_nonzero(np.bincount(ids[chosen[owner]], minlength=1)))
        return unique / total if total else float("nan")

    def statistic(self, key: str, seeds: Sequence[int] | None = None) -> Statistic | None:
        """The metric over a set of contexts, averaged over ``seeds`` (indices; default all); None: not scored."""
        chosen = list(range(len(self.runs))) if seeds is None else list(seeds)
        cosines = self.cosines
        per_seed: dict[str, Callable[[int, Indices], float] | None] = {
            "bleu": self._bleu_of,
            "semantic_similarity": (lambda s, i: float(cosines[s][i].mean())) if cosines is not None else None,
            "distinct_1": lambda s, i: self._distinct_of(1, s, i),
            "distinct_2": lambda s, i: self._distinct_of(2, s, i),
            "mean_length_words": lambda s, i: float(self.words[s][i].mean()),
        }
        one = per_seed[key]
        return self._over_seeds(one, chosen) if one is not None else None

    def per_seed(self, key: str) -> list[float]:
        """The metric over all contexts, once per seed."""
        everything = np.arange(len(self.words[0]), dtype=np.int64)
        values = []
        for s in range(len(self.runs)):
            statistic = self.statistic(key, [s])
            if statistic is not None:
                values.append(statistic(everything))
        return values


def _gram_ids(
    replies: Sequence[list[str]], n: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(id of each n-gram, index of its reply, n-grams per reply) over tokenised replies."""
    vocabulary: dict[tuple[str, ...], int] = {}
    ids: list[int] = []
    owner: list[int] = []
    counts = []
    for k, tokens in enumerate(replies):
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        ids += [vocabulary.setdefault(g, len(vocabulary)) for g in grams]
        owner += [k] * len(grams)
        counts.append(len(grams))
    return (
        np.asarray(ids, dtype=np.int64),
        np.asarray(owner, dtype=np.int64),
        np.asarray(counts, dtype=np.int64),
    )


def _cosines(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    cosines: npt.NDArray[np.float64] = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return cosines


def seed_summary(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None for one seed) of a metric's per-seed values."""
    finite = [v for v in values if not np.isnan(v)]
    if not finite:
        return {"mean": None, "sd": None, "per_seed": list(values)}
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return {"mean": float(np.mean(finite)), "sd": sd, "per_seed": list(values)}


def paired_report(
    replies: ArmReplies,
    references: Sequence[str],
    seeds: Sequence[int | None],
    *,
    base: str,
    embed: Any = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Per metric: every arm's mean ± sd over seeds, and each other arm's paired difference from ``base``.

    ``replies[arm][k]`` are the arm's replies under ``seeds[k]`` (None: greedy), aligned with ``references``.
    Returns ``{"seeds", "n_contexts", "samples", "method", "metrics": {key: {"label", "arms": {arm: summary},
    "vs_base": {arm: paired_bootstrap(...)}}}}``.
    """
    if base not in replies:
        raise ValueError(f"the base arm {base!r} has no replies")
    if any(len(runs) != len(seeds) for runs in replies.values()):
        raise ValueError("every arm needs one list of replies per seed")
    scores = {arm: _Scores(runs, references, embed) for arm, runs in replies.items()}
    metrics: dict[str, Any] = {}
    for key, label in PAIRED_METRICS:
        base_stat = scores[base].statistic(key)
        if base_stat is None:
            continue
        entry: dict[str, Any] = {
            "label": label,
            "arms": {arm: seed_summary(s.per_seed(key)) for arm, s in scores.items()},
            "vs_base": {},
        }
        for arm, arm_scores in scores.items():
            arm_stat = arm_scores.statistic(key)
            if arm != base and arm_stat is not None:
                entry["vs_base"][arm] = paired_bootstrap(len(references), base_stat, arm_stat, samples, seed)
        metrics[key] = entry
    return {
        "seeds": list(seeds),
        "n_contexts": len(references),
        "samples": samples,
        "method": "paired bootstrap over contexts (same resampled contexts for both arms; mean over seeds)",
        "metrics": metrics,
    }
