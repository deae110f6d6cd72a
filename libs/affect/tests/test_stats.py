"""The bootstrap interval of the mean (Table 2 in the labeler, the evaluation report in the trainer)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emili_affect.stats import bootstrap_ci, bootstrap_difference_ci


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n() -> None:
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.1, 0.2, 20), rng.normal(0.1, 0.2, 2000)
    low_s, high_s = bootstrap_ci(small.tolist())
    low_l, high_l = bootstrap_ci(large.tolist())
    assert low_s < small.mean() < high_s and low_l < large.mean() < high_l
    assert (high_l - low_l) < (high_s - low_s) / 5
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)


def test_bootstrap_interval_is_seeded_and_undefined_without_values() -> None:
    values = [0.1, 0.4, -0.2, 0.3, 0.0]
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert all(math.isnan(bound) for bound in bootstrap_ci([]))


def test_msprt_finds_harm_and_stays_quiet_without_it() -> None:
    from emili_affect.stats import msprt_compare

    rng = np.random.default_rng(3)
    worse = msprt_compare(rng.normal(3.0, 1.0, 150), rng.normal(4.0, 1.0, 150), tau=0.5)
    assert worse.difference < -0.7 and worse.p_harm < 0.001 and worse.ci[1] < 0
    better = msprt_compare(rng.normal(4.0, 1.0, 150), rng.normal(3.0, 1.0, 150), tau=0.5)
    assert better.p_harm == 1.0 and better.p_two_sided < 0.001 and better.ci[0] > 0
    few = msprt_compare([3.0], [4.0, 5.0], tau=0.5)
    assert few.p_harm == 1.0 and few.ci == (float("-inf"), float("inf"))


def test_msprt_false_alarms_stay_under_alpha_when_peeking_after_every_session() -> None:
    """Arms that do not differ, looked at after every pair of sessions up to 200: the running minimum of the
    always-valid p-value falls under 0.05 in at most ~5% of studies (a fixed-n test peeked at this often would
    alarm in far more)."""
    from emili_affect.stats import msprt_compare

    rng = np.random.default_rng(11)
    alarms = 0
    studies = 200
    for _ in range(studies):
        a, b = rng.normal(0, 1, 200), rng.normal(0, 1, 200)
        if any(msprt_compare(a[:n], b[:n], tau=0.5).p_two_sided < 0.05 for n in range(10, 201, 2)):
            alarms += 1
    assert alarms / studies <= 0.07


def test_msprt_reports_welchs_degrees_of_freedom_for_a_fixed_size_bound() -> None:
    from emili_affect.stats import msprt_compare

    same_spread = msprt_compare([1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0], tau=1.0)
    assert same_spread.degrees_of_freedom == pytest.approx(6.0)  # Equal variances and sizes: n1 + n2 - 2.
    # Student's t at 6 degrees of freedom, 95% one-sided: 1.943 (the normal quantile would be 1.645).
    expected = same_spread.difference - 1.943 * same_spread.standard_error
    assert same_spread.fixed_size_lower_bound(0.05) == pytest.approx(expected, abs=1e-3)
    # One arm's spread dominates: the degrees of freedom fall towards that arm's n - 1.
    lopsided = msprt_compare([0.0, 10.0, 0.0, 10.0, 0.0, 10.0], [5.0, 5.1, 4.9, 5.0, 5.1, 4.9], tau=1.0)
    assert 5.0 <= lopsided.degrees_of_freedom < 5.1
    assert math.isnan(msprt_compare([1.0], [2.0, 3.0], tau=1.0).degrees_of_freedom)


def test_difference_interval_on_normal_data_is_the_t_interval() -> None:
    """Widened to Student's t, the bootstrap interval of 5 normal pairs has about the t interval's half-width."""
    from scipy.stats import t

    rng = np.random.default_rng(5)
    diff = rng.normal(0.3, 1.0, 5)
    estimate, low, high = bootstrap_difference_ci(diff, np.zeros(5), paired=True, rng=rng, samples=20000)
    half_t = float(t.ppf(0.975, 4)) * float(diff.std(ddof=1)) / math.sqrt(5)
    assert estimate == pytest.approx(diff.mean())
    assert (high - low) / 2 == pytest.approx(half_t, rel=0.1)


def test_difference_interval_needs_two_items_per_arm() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        bootstrap_difference_ci([1.0], [0.0], paired=True, rng=rng)
    with pytest.raises(ValueError, match="each arm"):
        bootstrap_difference_ci([1.0, 2.0], [0.0], paired=False, rng=rng)
    estimate, low, high = bootstrap_difference_ci([1.0, 2.0, 3.0], [0.0, 0.5], paired=False, rng=rng)
    assert estimate == pytest.approx(1.75) and low < estimate < high


def test_association_is_spearmans_rho_with_a_one_sided_permutation_p_value() -> None:
    from scipy.stats import spearmanr

    from emili_affect.stats import association_test

    rng = np.random.default_rng(5)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    rho, p = association_test(x, y, rng=rng, resamples=999)
    assert rho == pytest.approx(spearmanr(x, y).statistic)
    assert p == pytest.approx(1 / 1000)  # No shuffle of 999 beats a strong association; the observed one counts.
    rho_against, p_against = association_test(x, -y, rng=rng, resamples=999)
    assert rho_against == pytest.approx(-rho) and p_against > 0.99
    assert association_test([1.0, 1.0, 1.0], [0.1, 0.2, 0.3], rng=rng) == (0.0, 1.0)  # Nothing to rank.
    with pytest.raises(ValueError, match="at least 3"):
        association_test([1.0, 2.0], [1.0, 2.0], rng=rng)
    with pytest.raises(ValueError, match="one outcome"):
        association_test([1.0, 2.0, 3.0], [1.0, 2.0], rng=rng)


def test_a_blocked_association_compares_items_only_within_their_blocks() -> None:
    from emili_affect.stats import association_test, covariate_blocks

    rng = np.random.default_rng(8)
    blocks = covariate_blocks([0.3, 0.1, 0.2, 0.9, 0.8, 0.7, 0.5, 0.4], 4, rng)
    assert list(blocks) == [0, 0, 0, 1, 1, 1, 1, 0]  # Sorted by the covariate, cut into 8 // 4 blocks.
    # Across the blocks the signal follows the outcome; within each it runs against it.
    signal = [1.0, 2.0, 3.0, 4.0, 11.0, 12.0, 13.0, 14.0]
    outcome = [4.0, 3.0, 2.0, 1.0, 14.0, 13.0, 12.0, 11.0]
    rho, p = association_test(signal, outcome, rng=rng, resamples=999)
    within, p_within = association_test(signal, outcome, rng=rng, resamples=999, blocks=[0, 0, 0, 0, 1, 1, 1, 1])
    assert rho > 0.5 and within == pytest.approx(-1.0) and p < 0.2 < 0.9 < p_within
    # One item per block leaves nothing to re-pair: no association can be shown.
    assert association_test(signal, outcome, rng=rng, blocks=list(range(8))) == (0.0, 1.0)


# --- pooling independent runs (random effects) ------------------------------------------------------------------------


def test_runs_of_equal_precision_pool_to_the_t_interval_of_their_means() -> None:
    from scipy import stats

    from emili_affect.stats import random_effects_mean

    runs = [0.1, 0.3, 0.5]
    pooled = random_effects_mean(runs, [0.01, 0.01, 0.01])
    half = stats.t.ppf(0.975, 2) * np.std(runs, ddof=1) / np.sqrt(3)
    assert pooled.mean == pytest.approx(0.3) and pooled.runs == 3
    assert pooled.ci95 == pytest.approx((0.3 - half, 0.3 + half))
    assert pooled.between_runs_sd == pytest.approx(np.sqrt(0.03))  # DerSimonian-Laird: (Q - 2) / (300 - 100).


def test_runs_that_agree_within_their_noise_have_no_spread_and_weigh_by_precision() -> None:
    from scipy import stats

    from emili_affect.stats import random_effects_mean

    pooled = random_effects_mean([0.10, 0.12, 0.30], [0.001, 0.001, 0.04])
    # Weights 1000, 1000, 25: mean 227.5 / 2025; Q = 1.09 < k - 1, so tau = 0 and Hartung-Knapp's factor Q / 2 = 0.55
    # is raised to 1: the interval is the normal one's width with t on 2 degrees of freedom, not narrower.
    assert pooled.between_runs_sd == 0.0 and pooled.mean == pytest.approx(227.5 / 2025)
    half = stats.t.ppf(0.975, 2) * math.sqrt(1 / 2025)
    assert pooled.ci95 == pytest.approx((227.5 / 2025 - half, 227.5 / 2025 + half))
    one = random_effects_mean([0.2], [0.01])
    assert one.runs == 1 and one.ci95 == pytest.approx((0.2 - 0.196, 0.2 + 0.196), abs=1e-3)
    assert np.isnan(one.between_runs_sd)


def test_runs_that_differ_weigh_by_their_own_and_the_between_run_variance() -> None:
    from emili_affect.stats import random_effects_mean

    pooled = random_effects_mean([0.0, 0.2, 0.5, 0.1], [0.001, 0.004, 0.01, 0.002])
    # Weights 1000, 250, 100, 500 (sum 1850, squares 1322500): fixed mean 150 / 1850, Q = 27.84, so
    # tau^2 = (27.84 - 3) / (1850 - 1322500 / 1850) = 0.02188; weights 1 / (v + tau^2) give 0.1774, where 1 / v
    # alone would give the fixed mean, 0.0811.
    assert pooled.between_runs_sd == pytest.approx(math.sqrt(0.02188), rel=1e-3)
    assert pooled.mean == pytest.approx(0.1774, abs=1e-4)


def test_a_run_that_dwarfs_the_others_leaves_the_between_run_variance_its_digits() -> None:
    from emili_affect.stats import random_effects_mean

    # tau^2 = (Q - 1) / (sum(w) - sum(w^2) / sum(w)) = (100 - 1) / 2 with weights 1e20 and 1: the subtraction, done
    # naively, is 0 in floating point.
    pooled = random_effects_mean([0.0, 10.0], [1e-20, 1.0])
    assert pooled.between_runs_sd == pytest.approx(math.sqrt(49.5), rel=1e-6)


def test_pooled_interval_covers_the_true_mean_of_few_heterogeneous_runs() -> None:
    from emili_affect.stats import random_effects_mean

    rng, covered, repeats = np.random.default_rng(3), 0, 2000
    for _ in range(repeats):
        truth = rng.normal(0.0, 0.1, size=3)  # Each run's own true effect: what another run of the loop trains.
        variances = rng.uniform(0.002, 0.02, size=3)
        low, high = random_effects_mean(rng.normal(truth, np.sqrt(variances)), variances).ci95
        covered += low <= 0.0 <= high
    # The normal interval with DerSimonian-Laird's tau covers about 90% here; Hartung-Knapp's at least its level.
    assert covered / repeats >= 0.94


def test_pooling_refuses_what_it_cannot_weigh() -> None:
    from emili_affect.stats import random_effects_mean

    for estimates, variances in [([], []), ([0.1, 0.2], [0.01]), ([0.1, float("nan")], [0.01, 0.01]), ([0.1], [0.0])]:
        with pytest.raises(ValueError):
            random_effects_mean(estimates, variances)


def test_a_recorded_t_interval_reads_back_as_the_variance_of_its_mean() -> None:
    from scipy import stats

    from emili_affect.stats import variance_from_t_interval

    values = np.random.default_rng(5).normal(0.3, 1.0, size=12)
    se = values.std(ddof=1) / math.sqrt(12)
    half = stats.t.ppf(0.975, 11) * se
    assert variance_from_t_interval(values.mean() - half, values.mean() + half, 12) == pytest.approx(se**2)
    with pytest.raises(ValueError, match="no standard error"):
        variance_from_t_interval(0.0, 1.0, 1)
