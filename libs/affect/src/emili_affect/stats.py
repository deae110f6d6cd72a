"""Statistics shared by the labeler's gold-label tables and the trainer's evaluation report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PooledEstimate",
    "SequentialComparison",
    "association_test",
    "bootstrap_ci",
    "bootstrap_difference_ci",
    "covariate_blocks",
    "msprt_compare",
    "random_effects_mean",
    "variance_from_t_interval",
]


def bootstrap_ci(
    values: Sequence[float], samples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(samples, len(data)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


@dataclass(frozen=True)
class PooledEstimate:
    """The mean effect over several independent runs, its interval, and how much the runs' true effects differ."""

    mean: float
    ci95: tuple[float, float]
    runs: int
    between_runs_sd: float  # DerSimonian-Laird's tau: 0 when the runs differ no more than their own noise explains.


def variance_from_t_interval(low: float, high: float, n: int, level: float = 0.95) -> float:
    """The variance of a mean whose two-sided interval at ``level`` is mean +- t(n - 1) * standard error (as
    bootstrap_difference_ci's intervals are, widened to t): a recorded interval read back as a weight."""
    from scipy import stats

    if n < 2:
        raise ValueError(f"an interval from {n} value(s) has no standard error")
    return float(((high - low) / 2 / stats.t.ppf(0.5 + level / 2, n - 1)) ** 2)


def random_effects_mean(estimates: Sequence[float], variances: Sequence[float], level: float = 0.95) -> PooledEstimate:
    """Random-effects pooling of independent runs' estimates (each with the variance of its own mean).

    The interval is for the mean of the runs' true effects (the loop's average effect over runs), not a prediction
    of the next run's. Between-run variance by DerSimonian and Laird; the interval by Hartung and Knapp on Student's t
    with k - 1 degrees of freedom: with a handful of runs the usual normal interval is far too narrow (IntHout et
    al., BMC Med Res Methodol 2014); its variance factor is kept at 1 or above, else runs that agree by chance
    narrow it below the normal one (Röver et al., BMC Med Res Methodol 2015). With 2 runs t is 12.7: such an
    interval says little. One run: its own normal interval, with tau unknown (nan).
    """
    from scipy import stats

    y, v = np.asarray(estimates, dtype=np.float64), np.asarray(variances, dtype=np.float64)
    if len(y) == 0 or len(y) != len(v):
        raise ValueError(f"need one variance per estimate and at least one run, got {len(y)} and {len(v)}")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(v)) and np.all(v > 0)):
        raise ValueError("estimates must be finite and variances finite and above 0")
    if len(y) == 1:
        half = float(stats.norm.ppf(0.5 + level / 2) * math.sqrt(v[0]))
        return PooledEstimate(float(y[0]), (float(y[0] - half), float(y[0] + half)), 1, float("nan"))
    k, w = len(y), 1.0 / v
    fixed = float(np.sum(w * y) / np.sum(w))
    q = float(np.sum(w * (y - fixed) ** 2))
    # sum(w) - sum(w^2) / sum(w), as sum(w_i * (the other weights)) / sum(w): the difference loses every digit when
    # one run's weight dwarfs the others'.
    others = np.array([float(np.sum(np.delete(w, i))) for i in range(k)])
    spread_of_weights = float(np.sum(w * others)) / float(np.sum(w))
    tau2 = max(0.0, (q - (k - 1)) / spread_of_weights) if spread_of_weights > 0 else 0.0
    w_star = 1.0 / (v + tau2)
    mean = float(np.sum(w_star * y) / np.sum(w_star))
    spread = max(1.0, float(np.sum(w_star * (y - mean) ** 2)) / (k - 1))
    half = float(stats.t.ppf(0.5 + level / 2, k - 1) * math.sqrt(spread / float(np.sum(w_star))))
    return PooledEstimate(mean, (mean - half, mean + half), k, math.sqrt(tau2))


def _welch(c: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Each arm's variance of its mean (unbiased) and Welch-Satterthwaite's degrees of freedom of their sum (each arm
    needs 2 values; with no spread at all, the pooled n - 2)."""
    vc, vb = float(c.var(ddof=1)) / len(c), float(b.var(ddof=1)) / len(b)
    df_denominator = vc * vc / (len(c) - 1) + vb * vb / (len(b) - 1)
    degrees_of_freedom = (vc + vb) ** 2 / df_denominator if df_denominator > 0 else float(len(c) + len(b) - 2)
    return vc, vb, degrees_of_freedom


def bootstrap_difference_ci(
    candidate: Sequence[float],
    baseline: Sequence[float],
    *,
    paired: bool,
    rng: np.random.Generator,
    samples: int = 2000,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """mean(candidate) - mean(baseline) and its two-sided interval at ``level``: paired (the mean of the per-item
    differences, items resampled) or of independent arms (each arm resampled).

    The percentile bootstrap alone is too narrow on few items: it spreads the mean by the sample's plug-in variance
    and reads normal quantiles, so a 95% interval on 4 pairs of pure noise excludes 0 on one side about 10% of the
    time instead of 2.5%. Here the bootstrap draws keep their shape but are widened about the estimate by
    sqrt(unbiased variance / bootstrap variance) * t / z (Student's t on n - 1 or Welch's degrees of freedom), so
    that on normal data the interval is the t interval and on skewed data it stays skewed. Needs at least 2 items
    per arm (2 pairs); a ValueError otherwise."""
    from scipy.stats import norm, t

    c = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if paired:
        if len(c) != len(b):
            raise ValueError("paired evidence needs as many baseline items as candidate items")
        diff = c - b
        if len(diff) < 2:
            raise ValueError("an interval needs at least 2 pairs")
        estimate = float(diff.mean())
        means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
        widen = math.sqrt(len(diff) / (len(diff) - 1))
        degrees_of_freedom = float(len(diff) - 1)
    else:
        if len(c) < 2 or len(b) < 2:
            raise ValueError("an interval needs at least 2 items on each arm")
        estimate = float(c.mean() - b.mean())
        means = c[rng.integers(0, len(c), size=(samples, len(c)))].mean(axis=1) - b[
            rng.integers(0, len(b), size=(samples, len(b)))
        ].mean(axis=1)
        vc, vb, degrees_of_freedom = _welch(c, b)
        plug_in = float(c.var(ddof=0)) / len(c) + float(b.var(ddof=0)) / len(b)
        widen = math.sqrt((vc + vb) / plug_in) if plug_in > 0 else 1.0
    upper = 1.0 - (1.0 - level) / 2.0
    widen *= float(t.ppf(upper, degrees_of_freedom)) / float(norm.ppf(upper))
    widened = estimate + (means - estimate) * widen
    tail = (1.0 - level) / 2.0
    return estimate, float(np.quantile(widened, tail)), float(np.quantile(widened, 1.0 - tail))


@dataclass(frozen=True)
class SequentialComparison:
    """An always-valid comparison of two arms' means (mixture SPRT), safe to look at after every new session.

    ``difference`` is mean(candidate) - mean(baseline); ``p_harm`` the always-valid p-value of "the candidate is
    worse" (small: evidence of harm), ``p_two_sided`` of "the means differ"; ``ci`` the always-valid interval of
    the difference at the level it was asked for."""

    n_candidate: int
    n_baseline: int
    difference: float
    p_harm: float
    p_two_sided: float
    ci: tuple[float, float]
    standard_error: float  # Of the difference, for a fixed-size analysis at a planned end.
    # Welch-Satterthwaite degrees of freedom of that standard error: a fixed-size bound on a few sessions per arm
    # needs Student's t, not the normal quantile (with 5 sessions per arm about 2.0 instead of 1.645 at 95%).
    degrees_of_freedom: float = float("inf")

    def fixed_size_lower_bound(self, alpha: float) -> float:
        """One-sided 1 - alpha lower bound of the difference for an analysis done once, at a planned size: Student's
        t on Welch's degrees of freedom (NaN when either arm has fewer than 2 values)."""
        from scipy.stats import t

        return self.difference - float(t.ppf(1 - alpha, self.degrees_of_freedom)) * self.standard_error


def covariate_blocks(covariate: Sequence[float], size: int, rng: np.random.Generator) -> np.ndarray:
    """A block number per item: the items sorted by ``covariate`` (ties in random order) and cut into consecutive
    blocks (``len // size`` of them, never fewer than one, so each holds ``size`` to ``2 * size - 1`` items, or all of
    them when there are fewer), so each block holds items of similar covariate. A ValueError on a non-finite value."""
    values = np.asarray(covariate, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("a covariate to block by must be finite (no NaN or infinity)")
    order = np.lexsort((rng.random(len(values)), values))
    blocks = np.empty(len(values), dtype=np.int64)
    for number, members in enumerate(np.array_split(order, max(1, len(values) // size))):
        blocks[members] = number
    return blocks


def association_test(
    signal: Sequence[float],
    outcome: Sequence[float],
    *,
    rng: np.random.Generator,
    resamples: int = 2000,
    blocks: Sequence[int] | np.ndarray | None = None,
) -> tuple[float, float]:
    """Spearman's rank correlation of paired (signal, outcome) items and the one-sided permutation p-value of a
    positive association: the share of random re-pairings (the outcomes shuffled against the signals) whose
    correlation is at least the observed one, counting the observed pairing. When signal and outcome are
    independent, p <= alpha happens at most an alpha share of the time whatever their distributions, so a check on
    it holds its level without assuming anything about the signal's scale.

    With ``blocks`` (a block number per item, e.g. :func:`covariate_blocks`), outcomes are shuffled only within a
    block and the correlation is of the ranks centred within each block: the association beyond what the blocks
    share. That is the test to use when a third variable drives both sides (a user's pre-chat mood moves both their
    face's changes and their surveys' Δv): independence given the block then holds the level, plain independence
    would not. scipy's ``permutation_test`` has no blocks, hence the loop here.

    Needs 3 finite items; a ValueError otherwise. A side with no spread left has no ranks to correlate: (0.0, 1.0)."""
    from scipy.stats import rankdata

    x = np.asarray(signal, dtype=np.float64)
    y = np.asarray(outcome, dtype=np.float64)
    if len(x) != len(y) or (blocks is not None and len(blocks) != len(x)):
        raise ValueError("an association needs one outcome (and one block) per signal item")
    if len(x) < 3:
        raise ValueError(f"an association needs at least 3 items, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("an association needs finite values (a NaN would rank as nothing and pass)")
    groups = (
        [np.flatnonzero(np.asarray(blocks) == b) for b in np.unique(blocks)]
        if blocks is not None
        else [np.arange(len(x))]
    )

    def centred(ranks: np.ndarray) -> np.ndarray:
        out = ranks.copy()
        for members in groups:
            out[members] -= out[members].mean()
        return out

    xc, yc = centred(rankdata(x)), centred(rankdata(y))
    scale = math.sqrt(float((xc * xc).sum() * (yc * yc).sum()))
    if scale == 0:
        return 0.0, 1.0
    observed = float((xc * yc).sum()) / scale
    # Each row a re-pairing; the scale is the same for every one (a shuffle within blocks keeps yc's values).
    shuffled = np.tile(yc, (resamples, 1))
    for members in groups:
        picks = np.argsort(rng.random((resamples, len(members))), axis=1)
        shuffled[:, members] = yc[members][picks]
    correlations = shuffled @ xc / scale
    # A shuffle that ties the observed pairing counts as at least as strong (rounding must not make it "weaker").
    at_least = int(np.count_nonzero(correlations >= observed - 1e-12))
    return observed, (at_least + 1) / (resamples + 1)


def msprt_compare(
    candidate: Sequence[float], baseline: Sequence[float], *, tau: float, alpha: float = 0.05
) -> SequentialComparison:
    """Mixture sequential probability ratio test of the difference of two means (Johari, Pekelis and Walsh,
    "Always valid inference", 2017), with a normal mixture of scale ``tau`` (in the outcome's units: the size of
    difference the test is tuned to find) and the variances estimated from the data.

    The statistic for an estimate d with variance V is sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2)));
    its inverse is a p-value that stays valid however often it is looked at. For harm only estimates on the
    harmful side count: the two-sided p-value there, which is conservative for the one-sided question. The
    caller keeps the running minimum of the p-values across looks."""
    c = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if len(c) < 2 or len(b) < 2:
        inf = float("inf")
        return SequentialComparison(len(c), len(b), float("nan"), 1.0, 1.0, (-inf, inf), inf, float("nan"))
    difference = float(c.mean() - b.mean())
    vc, vb, degrees_of_freedom = _welch(c, b)
    # A variance floor: two arms of identical ratings would otherwise give V = 0 and an infinite statistic.
    variance = max(vc + vb, 1e-12)
    t2 = tau * tau
    log_lambda = 0.5 * math.log(variance / (variance + t2)) + t2 * difference**2 / (2 * variance * (variance + t2))
    p_two_sided = min(1.0, math.exp(-log_lambda))
    p_harm = p_two_sided if difference < 0 else 1.0
    half_width = math.sqrt(
        2 * variance * (variance + t2) / t2 * (math.log(1 / alpha) + 0.5 * math.log((variance + t2) / variance))
    )
    return SequentialComparison(
        len(c),
        len(b),
        difference,
        p_harm,
        p_two_sided,
        (difference - half_width, difference + half_width),
        math.sqrt(variance),
        degrees_of_freedom,
    )
