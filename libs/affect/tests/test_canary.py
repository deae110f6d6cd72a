"""The canary rule (emili_affect.canary) on constructed outcomes."""

from __future__ import annotations

import numpy as np
import pytest

from emili_affect.canary import OUTCOMES, CanaryRule, judge


def _arm(n: int, rating: float, delta_v: float = 0.0, seed: int = 0) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    return {
        "rating": list(rating + rng.normal(0, 0.4, n)),
        "completed": [1.0] * n,
        "delta_v": list(delta_v + rng.normal(0, 0.05, n)),
        "positive_reaction": list(0.5 + rng.normal(0, 0.1, n)),
    }


def test_runs_until_the_planned_size_then_promotes_a_rating_shown_not_worse() -> None:
    rule = CanaryRule(max_sessions=30)
    early = judge(rule, _arm(20, 3.5, seed=1), _arm(20, 3.5, seed=2))
    assert early.state == "running" and [look.outcome for look in early.looks] == list(OUTCOMES)
    done = judge(rule, _arm(30, 3.6, seed=1), _arm(30, 3.5, seed=2))
    assert done.state == "promoted" and "within the margin 0.25" in done.reason
    assert done.looks[0].lower_bound is not None and done.looks[0].lower_bound > -0.25
    # A read label still missing holds the promotion back.
    assert judge(rule, _arm(30, 3.6, seed=1), _arm(30, 3.5, seed=2), labels_pending=1).state == "running"


def test_a_rating_not_shown_within_the_margin_is_rolled_back_at_the_planned_size() -> None:
    verdict = judge(CanaryRule(max_sessions=30, min_sessions=30), _arm(30, 3.2, seed=1), _arm(30, 3.5, seed=2))
    assert verdict.state == "rolled_back" and "not shown to be as good" in verdict.reason


def test_harm_rolls_back_after_the_burn_in_only_and_the_p_value_never_rises() -> None:
    rule = CanaryRule(max_sessions=100, min_sessions=10)
    worse, production = _arm(9, 3.5, delta_v=-0.3, seed=1), _arm(9, 3.5, seed=2)
    assert judge(rule, worse, production).state == "running"  # Too few sessions to call harm.
    harmed = judge(rule, _arm(12, 3.5, delta_v=-0.3, seed=1), _arm(12, 3.5, seed=2))
    assert harmed.state == "rolled_back" and "delta_v" in harmed.reason
    # An earlier look's small p-value stays: the running minimum is what the always-valid test promises.
    kept = judge(rule, _arm(12, 3.5, seed=1), _arm(12, 3.5, seed=2), previous_p_harm={"delta_v": 1e-6})
    assert kept.state == "rolled_back" and kept.looks[2].p_harm == 1e-6


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tau": {"mood": 1.0}}, "unknown canary outcomes"),
        ({"tau": {"rating": 0.0}}, "tau must be positive"),
        ({"alpha": 0.7}, "alpha must be in"),
        ({"max_sessions": 1}, "at least 2 sessions"),
    ],
)
def test_a_rule_that_cannot_decide_is_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CanaryRule(**changes)  # type: ignore[arg-type]
    assert CanaryRule(tau={"rating": 1.0}).tau["delta_v"] == 0.05  # Outcomes left out keep their defaults.
