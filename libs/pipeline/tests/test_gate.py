"""The evaluation gate on constructed evidence: passes what is clearly fine, fails a real loss, a missing gain,
too little evidence and out-of-bounds lengths, and reads its policy from YAML with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emili_pipeline.gate import Evidence, GateCheck, GatePolicy, judge, load_policy

CONTEXTS = 200
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def policy(*checks: GateCheck) -> GatePolicy:
    return GatePolicy(name="t", checks=list(checks), bootstrap_samples=1000)


def paired(shift: float, noise: float = 0.1, n: int = CONTEXTS, seed: int = 7) -> Evidence:
    rng = np.random.default_rng(seed)
    base = rng.normal(1.0, 0.3, n)
    return Evidence(candidate=list(base + shift + rng.normal(0, noise, n)), baseline=list(base), paired=True)


def test_non_inferior_passes_a_tie_and_fails_a_loss_beyond_the_margin() -> None:
    check = GateCheck(name="delta", metric="m", kind="non_inferior", direction="higher", margin=0.05)
    tie = judge(policy(check), {"m": paired(0.0)})
    assert tie.passed and tie.checks[0].ci is not None and tie.checks[0].ci[0] > -0.05
    loss = judge(policy(check), {"m": paired(-0.2)})
    assert not loss.passed and "at or beyond the margin" in loss.checks[0].reason
    assert loss.checks[0].estimate == pytest.approx(-0.2, abs=0.03)


def test_direction_lower_means_a_fall_is_a_gain() -> None:
    lower_better = GateCheck(name="dist", metric="d", kind="superior", direction="lower")
    assert judge(policy(lower_better), {"d": paired(-0.2)}).passed
    assert not judge(policy(lower_better), {"d": paired(+0.2)}).passed
    assert not judge(policy(lower_better), {"d": paired(0.0)}).passed  # No clear gain.


def test_pairing_matters() -> None:
    # A small, consistent gain: clear on the same contexts, lost in the spread of contexts when unpaired.
    evidence = paired(0.03, noise=0.01, n=60)
    check = GateCheck(name="g", metric="m", kind="superior", direction="higher")
    assert judge(policy(check), {"m": evidence}).passed
    unpaired = Evidence(evidence.candidate, evidence.baseline, paired=False)
    assert not judge(policy(check), {"m": unpaired}).passed


def test_too_little_or_no_evidence_fails() -> None:
    check = GateCheck(name="m", metric="m", kind="non_inferior", min_n=50)
    small = judge(policy(check), {"m": paired(0.5, n=20)})
    assert not small.passed and small.checks[0].reason.startswith("not enough evidence: 20 items")
    missing = judge(policy(check), {})
    assert not missing.passed and missing.checks[0].reason == "no evidence for m"
    unmeasured = judge(policy(check), {"m": Evidence((), missing="no EPITOME classifiers found")})
    assert not unmeasured.passed and unmeasured.checks[0].reason == "no evidence for m: no EPITOME classifiers found"


def test_within_bounds_and_the_verdict_needs_every_check() -> None:
    length = GateCheck(name="len", metric="words", kind="within", low=3, high=120, min_n=5)
    fine = GateCheck(name="ok", metric="m", kind="non_inferior", margin=0.1)
    words_ok = Evidence(candidate=[10, 20, 30, 25, 15])
    words_long = Evidence(candidate=[300, 280, 310, 290, 305])
    assert judge(policy(length, fine), {"words": words_ok, "m": paired(0.0)}).passed
    verdict = judge(policy(length, fine), {"words": words_long, "m": paired(0.0)})
    assert not verdict.passed and [c.passed for c in verdict.checks] == [False, True]
    assert verdict.to_json()["checks"][0]["reason"].startswith("mean 297 outside")


def test_within_with_max_outside_checks_each_item_not_only_the_mean() -> None:
    """Empty replies among rambling ones average to a sane length: the share outside the bounds catches them."""
    each = GateCheck(name="len", metric="words", kind="within", low=3, high=120, max_outside=0.1, min_n=5)
    mixed = Evidence(candidate=[0, 0, 0, 150, 160, 90, 40, 50, 60, 70])  # Mean 62, 5 of 10 outside.
    assert judge(policy(each.model_copy(update={"max_outside": None})), {"words": mixed}).passed
    verdict = judge(policy(each), {"words": mixed})
    assert not verdict.passed and "50.0% of items outside (at most 10.0% allowed)" in verdict.checks[0].reason
    one_short = Evidence(candidate=[2, 40, 50, 60, 70, 80, 90, 100, 30, 20])  # 1 of 10: within the share allowed.
    assert judge(policy(each), {"words": one_short}).passed
    with pytest.raises(ValueError, match="paired is for comparisons"):
        GateCheck(name="x", metric="m", kind="within", low=0, high=1, paired=True)
    with pytest.raises(ValueError, match="max_outside is for 'within' checks"):
        GateCheck(name="x", metric="m", kind="superior", max_outside=0.1)


def test_a_policy_can_require_the_paired_test() -> None:
    check = GateCheck(name="m", metric="m", kind="non_inferior", margin=0.1, min_n=2, paired=True)
    assert judge(policy(check), {"m": paired(0.0)}).passed
    unpaired = Evidence(candidate=list(paired(0.0).candidate), baseline=list(paired(0.0).baseline))
    verdict = judge(policy(check), {"m": unpaired})
    assert not verdict.passed
    assert verdict.checks[0].reason == "the policy asks for a paired test and the evidence is independent"
    independent = check.model_copy(update={"paired": False})
    assert judge(policy(independent), {"m": unpaired}).passed
    assert not judge(policy(independent), {"m": paired(0.0)}).passed


def test_paired_evidence_of_unequal_length_is_an_error() -> None:
    check = GateCheck(name="m", metric="m", kind="non_inferior", min_n=2)
    with pytest.raises(ValueError, match="paired evidence"):
        judge(policy(check), {"m": Evidence([1.0, 2.0], [1.0], paired=True)})


def test_policies_load_from_yaml(tmp_path: Path) -> None:
    shipped = load_policy()
    assert shipped.name == "default" and {c.metric for c in shipped.checks} >= {"diff_epitome_mean", "mmlu_correct"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("gate:\n  name: x\n  checks:\n    - {name: a, metric: m, kind: within}\n")
    with pytest.raises(ValueError, match="'within' needs low <= high"):
        load_policy(bad)
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text(
        "gate:\n  name: x\n  checks:\n"
        "    - {name: a, metric: m, kind: superior}\n    - {name: a, metric: n, kind: superior}\n"
    )
    with pytest.raises(ValueError, match="unique"):
        load_policy(duplicate)


def test_evidence_round_trips_through_json_and_malformed_entries_name_their_metric() -> None:
    from emili_pipeline.gate import evidence_from_json, evidence_to_json

    evidence = {"delta_v": Evidence([0.1, 0.2], [0.0], paired=False), "mmlu_correct": Evidence([1, 0], [1, 1], True)}
    signal = Evidence([1.0, 2.0, 3.0], [0.1, 0.0, 0.2], True, covariate=[0.5, 0.4, 0.1])
    assert evidence_from_json(evidence_to_json({"signal": signal})) == {"signal": signal}
    assert evidence_from_json(evidence_to_json(evidence)) == {
        "delta_v": Evidence([0.1, 0.2], [0.0], False),
        "mmlu_correct": Evidence([1.0, 0.0], [1.0, 1.0], True),
    }
    with pytest.raises(ValueError, match="reply_words"):
        evidence_from_json({"reply_words": {"baseline": [1.0]}})


def test_the_canary_demos_gate_lets_a_tie_through_and_the_simulation_gate_does_not() -> None:
    """The canary demo's gate exists so that a demo-sized candidate reaches the canary: a candidate no better and no
    worse passes it, while the simulation gate, which wants a gain, rejects the same evidence; a clear loss fails both.
    """
    demo, simulation = load_policy(CONFIGS / "gate-demo-canary.yaml"), load_policy(CONFIGS / "gate-simulation.yaml")
    assert "FOR A DEMO OF THE CANARY PATH ONLY" in (CONFIGS / "gate-demo-canary.yaml").read_text()
    rng = np.random.default_rng(3)
    sessions = list(rng.normal(0.0, 0.03, 12))
    replies = [float(w) for w in rng.integers(20, 60, 16)]
    tie = {
        "delta_v": Evidence(candidate=[v + 0.002 for v in sessions], baseline=sessions),
        "reply_words": Evidence(candidate=replies),
    }
    assert judge(demo, tie).passed
    verdict = judge(simulation, tie)
    assert not verdict.passed and "delta_v_gain" in {c.name for c in verdict.checks if not c.passed}
    loss = tie | {"delta_v": Evidence(candidate=[v - 0.3 for v in sessions], baseline=sessions)}
    assert not judge(demo, loss).passed


@pytest.mark.parametrize("is_paired", [True, False])
def test_a_gain_check_on_a_few_items_of_pure_noise_passes_about_as_often_as_its_level_allows(is_paired: bool) -> None:
    """On 4 items a plain percentile bootstrap passed noise 8-10% of the time; one side of a 95% interval allows
    2.5%. 400 null draws: a pass rate of 5% or more would be 3.5 standard errors above 2.5%."""
    check = GateCheck(name="gain", metric="m", kind="superior", min_n=4)
    gate = GatePolicy(name="t", checks=[check], bootstrap_samples=500)
    rng = np.random.default_rng(11)
    passes = sum(
        judge(gate, {"m": Evidence(list(rng.normal(0, 1, 4)), list(rng.normal(0, 1, 4)), paired=is_paired)}).passed
        for _ in range(400)
    )
    assert passes / 400 < 0.05


def test_a_clear_gain_on_a_few_items_still_passes() -> None:
    check = GateCheck(name="gain", metric="m", kind="superior", min_n=4)
    evidence = Evidence([1.0, 1.2, 0.9, 1.1, 1.05], [0.0, 0.1, -0.1, 0.05, 0.0], paired=True)
    assert judge(policy(check), {"m": evidence}).passed


def test_a_comparison_check_needs_at_least_two_items() -> None:
    with pytest.raises(ValueError, match="min_n >= 2"):
        GateCheck(name="g", metric="m", kind="superior", min_n=1)
    assert GateCheck(name="w", metric="m", kind="within", low=0, high=1, min_n=1).min_n == 1


def test_an_association_check_passes_a_signal_that_predicts_its_outcome_and_fails_one_that_does_not() -> None:
    check = GateCheck(name="signal", metric="s", kind="associated", min_n=20)
    rng = np.random.default_rng(3)
    signal = rng.normal(size=60)
    predicts = judge(policy(check), {"s": Evidence(list(signal), list(signal + rng.normal(size=60)), paired=True)})
    result = predicts.checks[0]
    assert predicts.passed and result.estimate is not None and result.estimate > 0.3
    assert result.p_value is not None and result.p_value <= 0.025 and "predicts" in result.reason
    # A clear negative association is not a positive one: one-sided.
    against = judge(policy(check), {"s": Evidence(list(signal), list(-signal), paired=True)}).checks[0]
    assert not against.passed and against.p_value is not None and against.p_value > 0.5
    few = judge(policy(check), {"s": Evidence(list(signal[:10]), list(signal[:10]), paired=True)}).checks[0]
    assert not few.passed and "not enough evidence" in few.reason
    with pytest.raises(ValueError, match="paired evidence"):
        judge(policy(check), {"s": Evidence(list(signal), list(signal), paired=False)})
    with pytest.raises(ValueError, match="min_n >= 3"):
        GateCheck(name="a", metric="s", kind="associated", min_n=2)
    with pytest.raises(ValueError, match="one way"):
        GateCheck(name="a", metric="s", kind="associated", direction="lower")
    with pytest.raises(ValueError, match="too few for an association"):
        GatePolicy(name="t", level=0.99, bootstrap_samples=150, checks=[check])
    # A NaN would rank as nothing and pass: an error, which the loop records as unreadable evidence.
    with pytest.raises(ValueError, match="finite"):
        judge(policy(check), {"s": Evidence([*signal[:-1], float("nan")], list(signal), paired=True)})


def test_an_association_check_on_an_unrelated_signal_passes_about_as_often_as_its_level_allows() -> None:
    """A signal independent of its outcome (a decoy face against real surveys) passes at most 2.5% of the time,
    whatever the two look like: here skewed, tied outcomes as coarse as the simulator's surveys."""
    check = GateCheck(name="signal", metric="s", kind="associated", min_n=24)
    strict = GatePolicy(name="t", bootstrap_samples=500, checks=[check])
    rng = np.random.default_rng(11)
    draws = 400
    passed = 0
    for seed in range(draws):
        signal = rng.lognormal(size=24)
        outcome = np.round(rng.normal(size=24), 1)
        passed += judge(strict.model_copy(update={"seed": seed}), {"s": Evidence(signal, outcome, True)}).passed
    assert passed / draws <= 0.05


def confounded(rng: np.random.Generator, n: int = 72, effect: float = 0.0) -> Evidence:
    """A signal and an outcome that share a cause (the pre-chat mood, the covariate), the outcome strongly (Δv is
    post minus pre), the signal less; ``effect``: how much the signal predicts the outcome beyond it."""
    mood = rng.choice(np.linspace(-0.8, 0.8, 12), n)
    signal = -0.4 * mood + rng.normal(size=n)
    return Evidence(signal, -1.0 * mood + 0.5 * rng.normal(size=n) + effect * signal, True, covariate=mood)


@pytest.mark.parametrize(("blocks_of", "at_most"), [(None, 1.0), (4, 0.05)])
def test_an_association_blocked_by_a_common_cause_holds_its_level_and_one_across_all_items_does_not(
    blocks_of: int | None, at_most: float
) -> None:
    check = GateCheck(name="signal", metric="s", kind="associated", min_n=24, blocks_of=blocks_of)
    rng = np.random.default_rng(17)
    draws = 300
    passed = sum(
        judge(GatePolicy(name="t", bootstrap_samples=500, seed=seed, checks=[check]), {"s": confounded(rng)}).passed
        for seed in range(draws)
    )
    assert passed / draws <= at_most
    if blocks_of is None:
        assert passed / draws > 0.1  # The shared cause alone makes an unrelated signal look predictive.


def test_a_blocked_association_still_finds_a_real_one_and_needs_its_covariate() -> None:
    check = GateCheck(name="signal", metric="s", kind="associated", min_n=24, blocks_of=4)
    real = judge(policy(check), {"s": confounded(np.random.default_rng(2), effect=0.5)}).checks[0]
    assert real.passed and "within blocks of 4" in real.reason
    bare = Evidence(list(range(30)), list(range(30)), paired=True)
    missing = judge(policy(check), {"s": bare}).checks[0]
    assert not missing.passed and "no covariate" in missing.reason
    with pytest.raises(ValueError, match="blocks_of is for 'associated'"):
        GateCheck(name="a", metric="s", kind="superior", blocks_of=4)
