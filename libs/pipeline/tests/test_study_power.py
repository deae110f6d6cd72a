"""The gate power analysis (emili study power): its simulated arms, gold Δv, pass rates and report, with a scorer
that reads valence from a few words (the real one is the labeler's, used by the CLI)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from emili_pipeline.gate import GateCheck, GatePolicy, load_policy
from emili_pipeline.simulator import load_personas
from emili_pipeline.simulator.surveys import SurveyAnswers
from emili_pipeline.study_power import (
    delta_v_policy,
    gold_delta_v,
    gold_text,
    pass_rate,
    power_analysis,
    render_markdown,
    report_qualities,
    simulate_arm,
)
from emili_pipeline.study_sim import SIMULATION_GATE

PERSONAS = load_personas("builtin", 2)
WORDS = {"better": 0.9, "worse": 0.1, "same": 0.5, "happy": 0.8, "sad": 0.2}


def word_valence(texts: Sequence[str]) -> list[float | None]:
    """The mean valence of the WORDS a text has; None when it has none."""
    out: list[float | None] = []
    for text in texts:
        found = [v for w, v in WORDS.items() if w in text.lower()]
        out.append(float(np.mean(found)) if found else None)
    return out


def test_gold_text_is_what_the_labeler_scores_by_default() -> None:
    answers = SurveyAnswers(["Sad", " Tired "], ["Hopeful"], " I feel worse. ")
    assert gold_text(answers) == "sad, tired. I feel worse."
    assert gold_text(SurveyAnswers([], [], "only text")) == "only text"


def test_report_qualities_pools_the_feedback_iterations_and_refuses_a_report_without_them() -> None:
    def record(base: list[float], candidate: list[float]) -> dict[str, object]:
        items = {
            arm: {"reply_quality": q, "delta_v": [0.0] * len(q)}
            for arm, q in (("base", base), ("candidate", candidate))
        }
        return {"evaluation": {"items": items}}

    report = {
        "conditions": {"feedback": [record([0.1], [0.2, 0.3]), record([0.4], [0.5])], "noise": [record([9], [9])]}
    }
    pooled = report_qualities(report)
    assert pooled["base"]["reply_quality"] == [0.1, 0.4] and pooled["candidate"]["reply_quality"] == [0.2, 0.3, 0.5]
    with pytest.raises(ValueError, match="finished at least one iteration"):
        report_qualities({"conditions": {"feedback": [{"evaluation": None}]}})


def test_better_replies_raise_the_simulated_users_hidden_valence_change() -> None:
    good = simulate_arm([0.6], 200, PERSONAS, turns=2, seed=1)
    poor = simulate_arm([-0.6], 200, PERSONAS, turns=2, seed=1)
    assert np.mean(good.hidden) > np.mean(poor.hidden) + 0.2
    assert len(good.pre_texts) == len(good.post_texts) == 200
    # Same seed, same users and answers.
    assert simulate_arm([0.6], 5, PERSONAS, 2, seed=1) == simulate_arm([0.6], 5, PERSONAS, 2, seed=1)
    with pytest.raises(ValueError):
        simulate_arm([], 5, PERSONAS, 2, seed=1)


def test_gold_delta_v_is_post_minus_pre_and_none_when_a_side_has_no_scorable_word() -> None:
    from emili_pipeline.study_power import SimulatedArm

    arm = SimulatedArm([0.0, 0.0, 0.0], ["same", "worse", "nothing"], ["better", "same", "better"])
    scored: list[Sequence[str]] = []

    def score(texts: Sequence[str]) -> list[float | None]:
        scored.append(texts)
        return word_valence(texts)

    assert gold_delta_v(arm, score) == [pytest.approx(0.4), pytest.approx(0.4), None]
    assert len(scored) == 1 and len(scored[0]) == len(set(scored[0])) == 4  # Each distinct text once.


def test_pass_rate_follows_the_gates_delta_v_checks() -> None:
    policy = delta_v_policy(load_policy(SIMULATION_GATE))
    assert [c.metric for c in policy.checks] == ["delta_v", "delta_v"]
    rng = np.random.default_rng(0)
    low, high = rng.normal(0.0, 0.05, 400), rng.normal(0.2, 0.05, 400)
    assert pass_rate(high, low, 12, policy, 20, rng) == 1.0
    assert pass_rate(low, high, 12, policy, 20, rng) == 0.0
    assert pass_rate(low, low, 12, policy, 100, rng) < 0.2
    with pytest.raises(ValueError, match="pools"):
        pass_rate(low[:5], high, 12, policy, 20, rng)
    no_delta_v = GatePolicy(
        name="x", checks=[GateCheck(name="len", metric="reply_words", kind="within", low=1, high=9)]
    )
    with pytest.raises(ValueError, match="no check on delta_v"):
        delta_v_policy(no_delta_v)


def test_power_analysis_sees_a_gain_the_surveys_carry_and_says_the_users_are_simulated() -> None:
    result = power_analysis(
        {"base": [-0.5, -0.3], "candidate": [0.4, 0.6]},
        word_valence,
        load_policy(SIMULATION_GATE),
        PERSONAS,
        sizes=[4, 24],
        users=150,
        turns=2,
        repeats=20,
        observed_delta_v={"base": [-0.1, -0.2], "candidate": [0.1, 0.2]},
    )
    assert result["synthetic"] is True
    assert result["hidden_delta_v"]["candidate"]["mean"] > result["hidden_delta_v"]["base"]["mean"]
    assert result["gold_on_hidden"]["correlation"] > 0.5
    by_n = {row["n_per_arm"]: row for row in result["rows"]}
    assert by_n[24]["pass_gold"] >= by_n[4]["pass_gold"] and by_n[24]["pass_gold"] > 0.8
    assert by_n[24]["pass_gold_no_gain"] < 0.3
    markdown = render_markdown(result)
    assert "SYNTHETIC" in markdown and "SIMULATED users" in markdown
    assert "hidden Δv, observed in the study" in markdown and "| 24 |" in markdown


def test_too_few_scored_users_for_the_sizes_asked_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="have both surveys scored"):
        power_analysis(
            {"base": [0.0], "candidate": [0.0]},
            lambda texts: [None] * len(texts),
            load_policy(SIMULATION_GATE),
            PERSONAS,
            sizes=[4],
            users=20,
            turns=1,
            repeats=10,
        )


def test_paired_draws_take_the_same_users_from_both_arms() -> None:
    policy = delta_v_policy(load_policy(SIMULATION_GATE))
    rng = np.random.default_rng(1)
    users = rng.normal(0.0, 1.0, 300)  # Large differences between users, a small gain within each.
    base, candidate = users + rng.normal(0, 0.01, 300), users + 0.05 + rng.normal(0, 0.01, 300)
    assert pass_rate(candidate, base, 10, policy, 20, rng, paired=True) == 1.0
    assert pass_rate(candidate, base, 10, policy, 20, rng) < 0.5  # Unpaired, the users' spread hides the gain.
    # A user missing an item on either arm is left out of the pairs.
    assert pass_rate([0.1, None, 0.3], [0.0, 0.2, None], 1, policy, 10, rng, paired=True) == 0.0
    with pytest.raises(ValueError, match="pools"):
        pass_rate([0.1, None, 0.3], [0.0, 0.2, None], 2, policy, 10, rng, paired=True)
    with pytest.raises(ValueError, match="one item per user"):
        pass_rate([0.1], [0.0, 0.2], 1, policy, 10, rng, paired=True)


def test_arms_with_one_seed_meet_the_same_users_whatever_replies_they_hear() -> None:
    first = simulate_arm([-0.5, 0.5], 40, PERSONAS, 2, seed=3, quality_seed=10)
    again = simulate_arm([-0.5, 0.5], 40, PERSONAS, 2, seed=3, quality_seed=11)
    other = simulate_arm([-0.5, 0.5], 40, PERSONAS, 2, seed=4, quality_seed=10)
    assert first.pre_texts == again.pre_texts  # The same users: the same start, hence the same pre-chat survey.
    assert first.hidden != again.hidden  # Other replies' quality.
    assert [round(h, 6) for h in first.hidden] != [round(h, 6) for h in other.hidden]


def test_paired_analysis_sees_a_gain_that_users_spread_hides_unpaired() -> None:
    kwargs = {"sizes": [12], "users": 150, "turns": 2, "repeats": 20}
    qualities = {"base": [-0.2], "candidate": [-0.05]}
    policy = load_policy(SIMULATION_GATE)
    paired = power_analysis(qualities, word_valence, policy, PERSONAS, paired=True, **kwargs)
    unpaired = power_analysis(qualities, word_valence, policy, PERSONAS, **kwargs)
    assert paired["paired"] is True and "Paired: the same users" in render_markdown(paired)
    assert unpaired["paired"] is False and "Unpaired" in render_markdown(unpaired)
    assert paired["rows"][0]["pass_gold"] > unpaired["rows"][0]["pass_gold"] + 0.25


def test_canary_power_grows_with_the_planned_size_and_never_promotes_a_clear_loss() -> None:
    from emili_pipeline.study_power import canary_power, render_canary_power, report_ratings

    rng = np.random.default_rng(0)
    ratings = list(np.clip(rng.normal(3.0, 0.6, size=200), 1.0, 5.0))
    report = {"conditions": {"feedback": [{"evaluation": {"items": {"base": {"rating": ratings}}}}]}}
    assert report_ratings(report) == ratings
    rows = canary_power(report_ratings(report), [10, 80], [0.0, -0.6], repeats=40, seed=1)
    rate = {(r["sessions_per_arm"], r["shift"]): r["promoted"] for r in rows}
    assert rate[(80, 0.0)] > rate[(10, 0.0)]  # An equal candidate: more sessions, more often shown not worse.
    assert rate[(80, 0.0)] >= 0.8 and rate[(10, -0.6)] == rate[(80, -0.6)] == 0.0
    assert "SYNTHETIC" in render_canary_power(rows, len(ratings), "r.json")
    with pytest.raises(ValueError, match="rated base sessions"):
        report_ratings({"conditions": {}})
