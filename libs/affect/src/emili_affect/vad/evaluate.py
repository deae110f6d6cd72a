"""How well each OOV method predicts a lexicon's own ratings for words it has not seen.

A seeded share of the lexicon is held out; each method is built from the remaining terms only (the
softmax and top-k lookup matrices and the ridge fit exclude every held-out term) and predicts the
held-out terms from their embeddings. The score is Pearson's r between predictions and the lexicon's
values, per dimension.

The ``fusion`` method also reads independent affect lexicons (``affect_tables``); they are features, not
targets, so they may list held-out words. A table whose file is the evaluated lexicon itself is dropped.

Held-out rows are sliced out of the whole lexicon's (cached) embedding matrix: a term's embedding depends
on that term alone, so this is the same as embedding the two parts separately, without leaking anything.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from emili_affect.vad.affect import AffectTable
from emili_affect.vad.embed import Embedder, EmbeddingCache, lexicon_embeddings
from emili_affect.vad.fusion import DEFAULT_TEMPLATES, FusionEstimator, WordFeaturizer, lexicon_text_features
from emili_affect.vad.lexicon import DIMENSIONS, Lexicon
from emili_affect.vad.oov import OOV_METHODS, OOVMethod, make_estimator

__all__ = ["evaluate_oov", "holdout_split", "pearson_r"]


def holdout_split(
    lexicon: Lexicon, holdout: float = 0.1, seed: int = 0
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """(train rows, held-out rows), each sorted; round(holdout * N) rows held out, at least one."""
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must lie in (0, 1), got {holdout}")
    n = len(lexicon)
    n_holdout = max(1, round(holdout * n))
    if n_holdout >= n:
        raise ValueError(f"a lexicon of {n} terms is too small to hold out {holdout:.0%} and keep some")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])


def pearson_r(x: npt.ArrayLike, y: npt.ArrayLike) -> float | None:
    """Pearson's correlation; None when either side is constant (undefined)."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    a = a - a.mean()
    b = b - b.mean()
    denominator = float(np.sqrt((a @ a) * (b @ b)))
    if denominator == 0.0 or not np.isfinite(denominator):
        return None
    return float(np.clip((a @ b) / denominator, -1.0, 1.0))


def evaluate_oov(
    lexicon: Lexicon,
    embedder: Embedder,
    holdout: float = 0.1,
    seed: int = 0,
    methods: Sequence[OOVMethod] = OOV_METHODS,
    *,
    cache: EmbeddingCache | None = None,
    beta: float = 10.0,
    k: int = 10,
    alpha: float = 1.0,
    affect_tables: Sequence[AffectTable] = (),
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> dict[str, Any]:
    """Pearson r per method and dimension on a held-out share of the lexicon (JSON-able result).

    ``{"lexicon", "lexicon_sha256", "model", "holdout", "seed", "n_train", "n_holdout",
    "methods": {"softmax": {"valence", "arousal", "dominance", "beta", "seconds"},
    "topk": {..., "k"}, "ridge": {..., "alpha"}, "fusion": {..., "templates", "resources", "alpha"}}}``;
    ``seconds`` is the time to build the method and predict (the lexicon's embeddings are computed, or read
    from the cache, once beforehand; fusion's template embeddings too).
    """
    unknown = [m for m in methods if m not in OOV_METHODS]
    if unknown:
        raise ValueError(f"unknown OOV methods {unknown}; choose from {OOV_METHODS}")
    train, held = holdout_split(lexicon, holdout, seed)
    matrix = lexicon_embeddings(lexicon, embedder, cache)
    train_x, train_y = matrix[train], lexicon.values[train]
    held_x, held_y = matrix[held], lexicon.values[held]
    parameters: dict[str, dict[str, Any]] = {"softmax": {"beta": beta}, "topk": {"k": k}, "ridge": {"alpha": alpha}}
    tables = [t for t in affect_tables if t.sha256 != lexicon.sha256]
    featurizer = WordFeaturizer(embedder, tables, templates)
    text = lexicon_text_features(lexicon, featurizer, cache) if "fusion" in methods else None
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        started = time.perf_counter()
        if method == "fusion":
            assert text is not None
            # Only training rows and terms reach the fit; held-out words are featurised like any new word.
            estimator = make_estimator(
                method, text[train], train_y, k=k, terms=[lexicon.terms[i] for i in train], featurizer=featurizer
            )
            assert isinstance(estimator, FusionEstimator)
            predicted = estimator.predict(text[held], featurizer.affect([lexicon.terms[i] for i in held]))
            parameters[method] = {
                "templates": list(templates),
                "resources": [t.name for t in tables],
                "alpha": estimator.alpha,
            }
        else:
            estimator = make_estimator(method, train_x, train_y, beta=beta, k=k, alpha=alpha)
            assert not isinstance(estimator, FusionEstimator)
            predicted = estimator.estimate(held_x)
        elapsed = time.perf_counter() - started
        scores: dict[str, Any] = {dim: pearson_r(predicted[:, j], held_y[:, j]) for j, dim in enumerate(DIMENSIONS)}
        scores.update(parameters[method])
        scores["seconds"] = round(elapsed, 3)
        results[method] = scores
    return {
        "lexicon": lexicon.name,
        "lexicon_sha256": lexicon.sha256,
        "model": embedder.model_id,
        "holdout": holdout,
        "seed": seed,
        "n_train": int(train.size),
        "n_holdout": int(held.size),
        "methods": results,
    }
