"""The bootstrap interval of the mean (Table 2 in the labeler, the evaluation report in the trainer)."""

from __future__ import annotations

import math

import numpy as np

from emili_affect.stats import bootstrap_ci


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
