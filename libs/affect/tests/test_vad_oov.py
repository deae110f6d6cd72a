"""The three out-of-lexicon formulas against hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emili_affect.vad import RidgeEstimator, SoftmaxEstimator, TopKEstimator, make_estimator


def test_softmax_hand_computed() -> None:
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0]])
    values = np.array([[1.0, 0.0, 0.2], [0.0, 1.0, 0.6]])
    # cos = (1, 0); with beta = ln 3 the weights are exp(ln 3) : exp(0) = 3 : 1 -> 0.75, 0.25.
    estimator = SoftmaxEstimator(embeddings, values, beta=math.log(3))
    np.testing.assert_allclose(estimator.weights([[1.0, 0.0]]), [[0.75, 0.25]])
    np.testing.assert_allclose(estimator.estimate([[1.0, 0.0]]), [[0.75, 0.25, 0.3]], rtol=1e-6)
    # A query orthogonal to both: equal weights, the plain mean.
    three = SoftmaxEstimator(np.eye(3), np.array([[0.0] * 3, [0.3] * 3, [0.9] * 3]), beta=10)
    np.testing.assert_allclose(three.estimate([[0.0, 0.0, 0.0]]), [[0.4, 0.4, 0.4]], rtol=1e-6)


def test_softmax_uses_the_whole_lexicon_and_is_stable() -> None:
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((5_000, 8))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    values = rng.uniform(size=(5_000, 3))
    estimator = SoftmaxEstimator(embeddings, values, beta=10, chunk=7)
    query = embeddings[:20]
    weights = estimator.weights(query)
    assert (weights > 0).all()  # Every term contributes; no sampling.
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    np.testing.assert_allclose(estimator.estimate(query), weights @ values, rtol=1e-5)
    # A huge beta neither overflows nor underflows: it tends to the nearest term's value.
    sharp = SoftmaxEstimator(embeddings, values, beta=1e4)
    np.testing.assert_allclose(sharp.estimate(query), values[:20], atol=1e-6)


def test_topk_hand_computed() -> None:
    embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    values = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.2], [0.5, 0.5, 0.5], [0.9, 0.9, 0.9]])
    estimator = TopKEstimator(embeddings, values, k=2)
    rows, sims = estimator.neighbours([[1.0, 0.0]])
    assert rows.tolist() == [[0, 1]]
    np.testing.assert_allclose(sims, [[1.0, 0.6]])
    # Weights 1 and 0.6, normalised: 0.625, 0.375.
    np.testing.assert_allclose(estimator.estimate([[1.0, 0.0]]), [[0.625, 0.625, 0.7]])
    # k = 4: the orthogonal term weighs 0 and the opposite one (cos -1) is clipped to 0: same result.
    np.testing.assert_allclose(TopKEstimator(embeddings, values, k=10).estimate([[1.0, 0.0]]), [[0.625, 0.625, 0.7]])
    # No neighbour with a positive similarity: the plain mean of the k nearest.
    np.testing.assert_allclose(TopKEstimator(embeddings[2:], values[2:], k=2).estimate([[1.0, 0.0]]), [[0.7, 0.7, 0.7]])


def test_ridge_recovers_a_known_linear_map() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 6))
    coef = rng.standard_normal((6, 3))
    intercept = np.array([0.5, -0.25, 2.0])
    y = x @ coef + intercept
    estimator = RidgeEstimator(x, y, alpha=1e-9, clip=False)
    np.testing.assert_allclose(estimator.coef, coef, atol=1e-6)
    np.testing.assert_allclose(estimator.intercept, intercept, atol=1e-6)
    query = rng.standard_normal((4, 6)).astype(np.float32)
    np.testing.assert_allclose(estimator.estimate(query), query.astype(np.float64) @ coef + intercept, atol=1e-5)
    # A large penalty shrinks towards the mean; clipping keeps predictions in [0, 1].
    shrunk = RidgeEstimator(x, y, alpha=1e9, clip=False)
    np.testing.assert_allclose(shrunk.estimate(query), np.tile(y.mean(axis=0), (4, 1)), atol=1e-3)
    clipped = RidgeEstimator(x, y, alpha=1e-9).estimate(query)
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0


def test_ridge_alpha_matches_the_closed_form() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 4))
    y = rng.uniform(size=(50, 3))
    alpha = 3.0
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    expected = np.linalg.solve(xc.T @ xc + alpha * np.eye(4), xc.T @ yc)
    # Embeddings are held as float32, as real ones are: agreement to float32 precision.
    np.testing.assert_allclose(RidgeEstimator(x, y, alpha=alpha).coef, expected, atol=1e-6)


def test_make_estimator_and_validation() -> None:
    embeddings = np.eye(3)
    values = np.full((3, 3), 0.5)
    assert make_estimator("softmax", embeddings, values, beta=2).beta == 2  # type: ignore[union-attr]
    assert make_estimator("topk", embeddings, values, k=2).k == 2  # type: ignore[union-attr]
    assert make_estimator("ridge", embeddings, values, alpha=0.5).alpha == 0.5  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown OOV method"):
        make_estimator("nearest", embeddings, values)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        SoftmaxEstimator(embeddings, values).estimate(np.ones((1, 2)))
    with pytest.raises(ValueError, match="N > 0"):
        TopKEstimator(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="k must"):
        TopKEstimator(embeddings, values, k=0)
