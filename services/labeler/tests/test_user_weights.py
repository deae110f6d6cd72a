"""Per-user weights: synthetic users with known weights, shrinkage, baselines, JSON, reaction vectors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from emili_labeler.reactions import (
    POPULATION_MEAN_2025,
    POPULATION_STD_2025,
    VARIANT_2025,
    VARIANT_2025_ZSCORED,
    WeightVector,
    flag_turns,
)
from emili_labeler.user_weights import (
    REFERENCE_POPULATION_BASELINE,
    Baseline,
    BaselineWindow,
    PopulationWeights,
    Sample,
    UserWeights,
    baseline_readings,
    baseline_stats,
    fit_population_weights,
    fit_user_weights,
    fit_users,
    samples_from_session,
    to_weight_vector,
    user_baseline,
)
from emili_session.emotions import EMOTIONS

Array = npt.NDArray[np.float64]

W_POP = np.array([-0.5, -1.0, -0.4, 1.2, -0.8, 0.1, 0.3])
W_USER = W_POP + 0.8 * np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0])  # A user unlike the population.
T0 = 1_700_000_000_000


def synthetic_user(
    rng: np.random.Generator, user_id: str, w: Array, n: int, *, noise: float = 0.05, intercept: float = 0.2
) -> tuple[list[Sample], Baseline]:
    """Independent 0-1 scores around the user's own baseline; target = intercept + w . z + noise."""
    mean, std = rng.uniform(0.3, 0.6, 7), rng.uniform(0.03, 0.08, 7)
    z = np.clip(rng.standard_normal((n, 7)), -3.0, 3.0)
    x = mean + std * z
    y = intercept + z @ w + noise * rng.standard_normal(n)
    samples = [Sample(user_id, tuple(row), float(t)) for row, t in zip(x.tolist(), y.tolist(), strict=True)]
    return samples, Baseline(tuple(mean.tolist()), tuple(std.tolist()), 100, "user")


def population_of(rng: np.random.Generator, users: int = 5, n: int = 300) -> tuple[list[Sample], dict[str, Baseline]]:
    samples: list[Sample] = []
    baselines: dict[str, Baseline] = {}
    for i in range(users):
        s, b = synthetic_user(rng, f"pop{i}", W_POP, n)
        samples += s
        baselines[f"pop{i}"] = b
    return samples, baselines


def known_population(weights: Array = W_POP) -> PopulationWeights:
    return PopulationWeights(tuple(weights.tolist()), 0.2, 1000, 10, 0.9, 0.1, 1.0, REFERENCE_POPULATION_BASELINE)


def objective(uw: UserWeights, samples: list[Sample], prior: Array, lam: float, w: Array, b: float) -> float:
    z = uw.baseline.zscore(np.array([s.scores for s in samples]))
    y = np.array([s.target for s in samples])
    r = y - b - z @ w
    return float(r @ r + lam * (w - prior) @ (w - prior))


def test_population_weights_are_fitted_on_pooled_users() -> None:
    samples, baselines = population_of(np.random.default_rng(1))
    population = fit_population_weights(samples, baselines=baselines)
    assert np.allclose(population.weights, W_POP, atol=0.02)
    assert population.intercept == pytest.approx(0.2, abs=0.01)
    assert (population.n_samples, population.n_users) == (1500, 5)
    assert population.r2 is not None and population.r2 > 0.99
    assert population.residual_std == pytest.approx(0.05, abs=0.005)


def test_fit_recovers_a_users_known_weights_with_enough_samples() -> None:
    rng = np.random.default_rng(2)
    pooled, baselines = population_of(rng)
    population = fit_population_weights(pooled, baselines=baselines)
    samples, baseline = synthetic_user(rng, "alice", W_USER, 2000)
    fitted = fit_user_weights(samples, population, baseline=baseline)
    assert np.allclose(fitted.weights, W_USER, atol=0.02)  # The data override the prior.
    assert np.linalg.norm(np.subtract(fitted.weights, W_POP)) > 1.5
    assert fitted.intercept == pytest.approx(0.2, abs=0.01)
    assert (fitted.user_id, fitted.n_samples, fitted.fell_back, fitted.ridge_lambda) == ("alice", 2000, False, 10.0)
    assert fitted.r2 is not None and fitted.r2 > 0.99
    assert fitted.residual_std == pytest.approx(0.05, abs=0.005)
    assert fitted.baseline == baseline and fitted.prior_weights == population.weights
    predicted = fitted.predict(np.array([s.scores for s in samples[:3]]))
    assert predicted == pytest.approx([s.target for s in samples[:3]], abs=0.25)


def test_fit_users_fits_the_population_first_then_each_user() -> None:
    rng = np.random.default_rng(3)
    pooled, baselines = population_of(rng, users=4)
    alice, alice_baseline = synthetic_user(rng, "alice", W_USER, 1500)
    population, users = fit_users(pooled + alice, baselines={**baselines, "alice": alice_baseline})
    assert population.n_users == 5 and population.n_samples == 4 * 300 + 1500
    assert sorted(users) == ["alice", "pop0", "pop1", "pop2", "pop3"]
    assert np.allclose(users["pop0"].weights, W_POP, atol=0.05)
    assert np.allclose(users["alice"].weights, W_USER, atol=0.05)
    assert all(u.prior_weights == population.weights for u in users.values())


def test_few_samples_are_pulled_toward_the_population() -> None:
    samples, baseline = synthetic_user(np.random.default_rng(4), "bob", W_USER, 12, noise=0.3)
    population = known_population()

    def fit(lam: float) -> UserWeights:
        return fit_user_weights(samples, population, baseline=baseline, ridge_lambda=lam)

    ols, ridge, strong = fit(0.0), fit(10.0), fit(100.0)

    def distance(uw: UserWeights) -> float:
        return float(np.linalg.norm(np.subtract(uw.weights, W_POP)))

    assert distance(strong) < distance(ridge) < distance(ols)
    assert ols.residual_std is not None and ridge.residual_std is not None
    assert ols.residual_std <= ridge.residual_std  # OLS fits the sample best; the prior costs some fit.
    # The ridge answer minimises the penalised objective: nudging it in any direction only raises it.
    best = objective(ridge, samples, W_POP, 10.0, np.array(ridge.weights), ridge.intercept)
    rng = np.random.default_rng(5)
    for _ in range(20):
        dw, db = 1e-3 * rng.standard_normal(7), 1e-3 * rng.standard_normal()
        assert objective(ridge, samples, W_POP, 10.0, np.array(ridge.weights) + dw, ridge.intercept + db) > best


def test_too_few_samples_fall_back_to_the_population() -> None:
    samples, baseline = synthetic_user(np.random.default_rng(6), "carol", W_USER, 3)
    population = known_population()
    fitted = fit_user_weights(samples, population, baseline=baseline, min_samples=5)
    assert fitted.fell_back and fitted.n_samples == 3
    assert fitted.weights == population.weights
    z = baseline.zscore(np.array([s.scores for s in samples]))
    y = np.array([s.target for s in samples])
    assert fitted.intercept == pytest.approx(float(y.mean() - z.mean(axis=0) @ W_POP))

    nobody = fit_user_weights([], population, user_id="dave")
    assert (nobody.user_id, nobody.fell_back, nobody.n_samples, nobody.r2) == ("dave", True, 0, None)
    assert (nobody.weights, nobody.intercept, nobody.baseline) == (population.weights, 0.2, population.baseline)
    with pytest.raises(ValueError, match="one user"):
        fit_user_weights([], population)


def test_baseline_zscoring_is_applied_before_fitting() -> None:
    samples, baseline = synthetic_user(np.random.default_rng(7), "erin", W_USER, 500, noise=0.0)
    exact = fit_user_weights(samples, None, baseline=baseline, ridge_lambda=0.0)
    assert np.allclose(exact.weights, W_USER, atol=1e-8)
    assert exact.r2 == pytest.approx(1.0)

    # Doubling the baseline std halves every z-score, so the weights double.
    wide = Baseline(baseline.mean, tuple(2.0 * s for s in baseline.std), 100, "user")
    assert np.allclose(fit_user_weights(samples, None, baseline=wide, ridge_lambda=0.0).weights, 2.0 * W_USER)

    # Shifting a user's scores and their baseline together changes nothing.
    shifted = [Sample(s.user_id, tuple(v + 0.1 for v in s.scores), s.target) for s in samples]
    moved = Baseline(tuple(m + 0.1 for m in baseline.mean), baseline.std, 100, "user")
    assert np.allclose(
        fit_user_weights(shifted, None, baseline=moved).weights,
        fit_user_weights(samples, None, baseline=baseline).weights,
    )

    # Without the user's own baseline (the population fallback) the known weights are not recovered.
    fallback = fit_user_weights(samples, None, ridge_lambda=0.0)
    assert fallback.baseline == REFERENCE_POPULATION_BASELINE
    assert not np.allclose(fallback.weights, W_USER, atol=0.1)


def test_fit_users_applies_each_users_own_baseline() -> None:
    rng = np.random.default_rng(8)
    a, a_base = synthetic_user(rng, "a", W_POP, 800)
    b, b_base = synthetic_user(rng, "b", W_POP, 800)
    _, users = fit_users(a + b, baselines={"a": a_base, "b": b_base})
    assert users["a"].baseline == a_base and users["b"].baseline == b_base
    assert np.allclose(users["a"].weights, W_POP, atol=0.03)
    assert np.allclose(users["b"].weights, W_POP, atol=0.03)


def test_probabilities_summing_to_one_give_the_same_reactions() -> None:
    # Softmax scores sum to 1, so within a user sum_i std_i z_i is constant: the weights are fixed only up to
    # c * std. The prior settles that direction, and reaction deltas ignore it.
    rng = np.random.default_rng(9)
    alpha = np.array(POPULATION_MEAN_2025) * 40.0
    x = rng.dirichlet(alpha, size=600)
    baseline = user_baseline(x[:100])
    y = 0.1 + baseline.zscore(x) @ W_USER + 0.01 * rng.standard_normal(len(x))
    samples = [Sample("f", tuple(row), float(t)) for row, t in zip(x.tolist(), y.tolist(), strict=True)]
    direction = np.array(baseline.std) / np.linalg.norm(baseline.std)
    pre, post = rng.dirichlet(alpha, size=50), rng.dirichlet(alpha, size=50)
    dz = baseline.zscore(post) - baseline.zscore(pre)
    # Shrinkage (lambda 10) adds a small bias in the identifiable directions too.
    for lam, off_direction, delta_error in ((0.0, 0.002, 0.02), (10.0, 0.1, 0.5)):
        fitted = fit_user_weights(samples, known_population(), baseline=baseline, ridge_lambda=lam)
        error = np.array(fitted.weights) - W_USER
        assert np.linalg.norm(error - (error @ direction) * direction) < off_direction  # Error along std.
        assert np.array(fitted.weights) @ direction == pytest.approx(W_POP @ direction)  # As the prior says.
        assert dz @ np.array(fitted.weights) == pytest.approx(dz @ W_USER, abs=delta_error)
        assert fitted.r2 is not None and fitted.r2 > 0.99


def test_baseline_stats_hand_computed() -> None:
    readings = [
        [0.1, 0.0, 0.0, 0.1, 0.0, 0.0, 0.5],
        [0.1, 0.0, 0.0, 0.2, 0.0, 0.0, 0.5],
        [0.1, 0.0, 0.0, 0.3, 0.0, 0.0, 0.5],
    ]
    mean, std = baseline_stats(readings)
    assert mean == pytest.approx([0.1, 0.0, 0.0, 0.2, 0.0, 0.0, 0.5])
    assert std == pytest.approx([0.01, 0.01, 0.01, 0.1, 0.01, 0.01, 0.01])  # Sample std; constants floored.
    assert baseline_stats(readings, min_std=0.05)[1] == pytest.approx([0.05, 0.05, 0.05, 0.1, 0.05, 0.05, 0.05])
    assert baseline_stats(readings[:1])[1] == pytest.approx([0.01] * 7)
    with pytest.raises(ValueError, match="at least one"):
        baseline_stats([])
    with pytest.raises(ValueError, match="0-1"):
        baseline_stats([[10.0, 0, 0, 20.0, 0, 0, 70.0]])


def test_user_baseline_falls_back_to_the_population_with_few_readings() -> None:
    readings = np.random.default_rng(10).dirichlet(np.ones(7), size=5)
    assert user_baseline(readings[:4]) is REFERENCE_POPULATION_BASELINE
    own = user_baseline(readings)
    assert (own.source, own.n_readings) == ("user", 5)
    assert own.mean == pytest.approx(readings.mean(axis=0).tolist())
    assert REFERENCE_POPULATION_BASELINE.mean == POPULATION_MEAN_2025
    assert REFERENCE_POPULATION_BASELINE.std == POPULATION_STD_2025
    assert REFERENCE_POPULATION_BASELINE.source == "population"


def fer(capture_ms: int, **probs: float) -> dict[str, Any]:
    return reading(capture_ms, probs)


def reading(capture_ms: int, probs: dict[str, float], face_found: bool = True) -> dict[str, Any]:
    return {
        "kind": "fer_reading",
        "event_id": f"f{capture_ms}",
        "time_ms": capture_ms + 20,
        "capture_time_ms": capture_ms,
        "face_found": face_found,
        "probabilities": probs,
    }


def user_message(event_id: str, time_ms: int) -> dict[str, Any]:
    return {"kind": "user_message", "event_id": event_id, "time_ms": time_ms, "text": "...", "client_time_ms": time_ms}


def test_baseline_readings_modes() -> None:
    events = [
        reading(T0 - 5_000, {}, face_found=False),  # No face: the baseline starts at the first face.
        fer(T0, neutral=1.0),
        fer(T0 + 10_000, neutral=0.9, happy=0.1),
        user_message("m1", T0 + 20_000),
        fer(T0 + 20_000, neutral=0.7, sad=0.3),  # At the message: no longer "before" it.
        fer(T0 + 30_000, neutral=0.8, happy=0.2),
        fer(T0 + 30_001, angry=1.0),
    ]
    first = baseline_readings(events, BaselineWindow("first_seconds", 30.0))
    assert first.shape == (4, 7)
    assert first[:, EMOTIONS.index("neutral")] == pytest.approx([1.0, 0.9, 0.7, 0.8])
    before = baseline_readings(events, BaselineWindow("before_first_message"))
    assert before[:, EMOTIONS.index("neutral")] == pytest.approx([1.0, 0.9])
    assert baseline_readings(events[:1]).shape == (0, 7)
    with pytest.raises(ValueError, match="milliseconds"):
        baseline_readings([{**fer(T0, neutral=1.0), "capture_time_ms": T0 // 1000}])


def test_samples_from_session_pair_targets_with_the_face_around_each_message() -> None:
    events = [
        user_message("m1", T0),
        fer(T0 - 500, happy=0.4, neutral=0.6),
        fer(T0 + 500, happy=0.6, neutral=0.4),
        user_message("m2", T0 + 10_000),  # No face around it: no sample.
        user_message("m3", T0 + 20_000),  # No target: no sample.
        fer(T0 + 20_000, sad=1.0),
    ]
    samples = samples_from_session(events, "gina", {"m1": 0.7, "m2": -0.2})
    assert len(samples) == 1
    assert samples[0].user_id == "gina" and samples[0].target == 0.7
    assert samples[0].scores == pytest.approx([0, 0, 0, 0.5, 0, 0, 0.5])


def test_json_round_trip() -> None:
    rng = np.random.default_rng(11)
    pooled, baselines = population_of(rng, users=3, n=100)
    few, _ = synthetic_user(rng, "hal", W_USER, 2)
    population, users = fit_users(pooled + few, baselines=baselines)
    assert users["hal"].fell_back and users["hal"].baseline == REFERENCE_POPULATION_BASELINE
    for fitted in users.values():
        assert UserWeights.from_json(json.loads(json.dumps(fitted.to_json()))) == fitted
    assert PopulationWeights.from_json(json.loads(json.dumps(population.to_json()))) == population
    data = json.loads(json.dumps(users["pop0"].to_json()))
    assert set(data["weights"]) == set(EMOTIONS) and data["fell_back"] is False
    with pytest.raises(ValueError, match="exactly the emotions"):
        UserWeights.from_json({**data, "weights": {"happy": 1.0}})


def test_fitted_weights_become_a_reaction_weight_vector() -> None:
    samples, baseline = synthetic_user(np.random.default_rng(12), "ivy", W_USER, 400)
    fitted = fit_user_weights(samples, known_population(), baseline=baseline)
    vector = to_weight_vector(fitted, threshold=0.25)
    assert (vector.name, vector.scale, vector.threshold) == ("user:ivy", "unit", 0.25)
    assert vector.weights == fitted.weights
    assert (vector.zscore_mean, vector.zscore_std) == (baseline.mean, baseline.std)
    assert to_weight_vector(known_population()).name == "population"

    pre = {"happy": 0.2, "sad": 0.3, "neutral": 0.5}
    post = {"happy": 0.4, "sad": 0.1, "neutral": 0.5}
    events = [
        user_message("m1", T0),
        reading(T0, pre),
        {"kind": "assistant_message", "event_id": "a1", "time_ms": T0 + 3_000, "text": "!", "turn_id": "t1"},
        reading(T0 + 3_500, post),
    ]
    (reaction,) = flag_turns(events, vector)
    w = dict(zip(EMOTIONS, fitted.weights, strict=True))
    std = dict(zip(EMOTIONS, baseline.std, strict=True))
    expected = w["happy"] * 0.2 / std["happy"] - w["sad"] * 0.2 / std["sad"]
    assert reaction.delta == pytest.approx(expected)
    assert reaction.flagged is (expected >= 0.25)
    assert reaction.weight_name == "user:ivy"


def one_turn(pre: dict[str, float], post: dict[str, float]) -> list[dict[str, Any]]:
    return [
        user_message("m1", T0),
        reading(T0, pre),
        {"kind": "assistant_message", "event_id": "a1", "time_ms": T0 + 3_000, "text": "!", "turn_id": "t1"},
        reading(T0 + 3_500, post),
    ]


# Two constructed face changes on which the 2025 flag (plain 0-1 scores) and its z-scored extension disagree.
# Smile: happy +0.12 taken from neutral. Plain: 0.12 - 0.3 * 0.12 = 0.084 < 0.1. Z-scored: 0.12 / 0.08 -
# 0.3 * 0.12 / 0.174 = 1.293 >= 0.1 (happy's small population std magnifies the smile).
SMILE = ({"happy": 0.10, "neutral": 0.90}, {"happy": 0.22, "neutral": 0.78}, 0.084, 1.5 - 0.036 / 0.174)
# Calming with a trace of fear: neutral +0.6 and fear +0.06, taken from surprise (weight 0). Plain: 0.18 -
# 0.06 = 0.12 >= 0.1. Z-scored: 0.18 / 0.174 - 0.06 / 0.041 = -0.429 < 0.1 (fear's small std dominates).
CALMING = (
    {"surprise": 0.70, "neutral": 0.30},
    {"fear": 0.06, "surprise": 0.04, "neutral": 0.90},
    0.12,
    0.18 / 0.174 - 0.06 / 0.041,
)


@pytest.mark.parametrize(("pre", "post", "plain_delta", "zscored_delta"), [SMILE, CALMING], ids=["smile", "calming"])
def test_variant_2025_flags_plain_scores_and_the_zscored_variant_differs(
    pre: dict[str, float], post: dict[str, float], plain_delta: float, zscored_delta: float
) -> None:
    (plain,) = flag_turns(one_turn(pre, post), VARIANT_2025)
    (zscored,) = flag_turns(one_turn(pre, post), VARIANT_2025_ZSCORED)
    assert (plain.weight_name, zscored.weight_name) == ("variant_2025", "variant_2025_zscored")
    assert plain.delta == pytest.approx(plain_delta)
    assert zscored.delta == pytest.approx(zscored_delta)
    assert plain.flagged is (plain_delta >= 0.1)
    assert zscored.flagged is (zscored_delta >= 0.1)
    assert plain.flagged is not zscored.flagged


def test_learned_weights_on_the_reference_baseline_are_the_zscored_variant_not_the_2025_one() -> None:
    # Learned weights are z-scored (an EMILI extension); with the 2025 weights on the reference population
    # baseline they reproduce the z-scored variant's flags, which is why that one keeps its own name.
    population = PopulationWeights(VARIANT_2025.weights, 0.0, 0, 0, None, None, 1.0, REFERENCE_POPULATION_BASELINE)
    learned = to_weight_vector(population, threshold=0.1)
    for pre, post, plain_delta, zscored_delta in (SMILE, CALMING):
        (reaction,) = flag_turns(one_turn(pre, post), learned)
        assert reaction.delta == pytest.approx(zscored_delta)
        assert reaction.delta != pytest.approx(plain_delta)
    assert learned.zscored and not VARIANT_2025.zscored
    unscaled = WeightVector("plain", learned.weights, "unit", 0.1)
    (reaction,) = flag_turns(one_turn(SMILE[0], SMILE[1]), unscaled)
    assert reaction.delta == pytest.approx(SMILE[2])


def test_invalid_input_is_rejected() -> None:
    population = known_population()
    with pytest.raises(ValueError, match="0-1"):
        fit_user_weights([Sample("x", (10.0, 0, 0, 50.0, 0, 0, 40.0), 1.0)] * 6, population)
    with pytest.raises(ValueError, match="one user"):
        fit_user_weights([Sample("x", (0.1,) * 7, 1.0), Sample("y", (0.1,) * 7, 1.0)], population)
    with pytest.raises(ValueError, match="ridge_lambda"):
        fit_user_weights([Sample("x", (0.1,) * 7, 1.0)], population, ridge_lambda=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        fit_population_weights([])
    with pytest.raises(ValueError, match="positive"):
        Baseline((0.1,) * 7, (0.0,) * 7, 1, "user")
