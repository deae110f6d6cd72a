"""evaluate_oov: seeded held-out split, no leakage into the lookup matrix or the ridge fit, the result's form."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from emili_affect.vad import (
    FixedEmbedder,
    Lexicon,
    LocalEmbeddingCache,
    SentenceTransformerEmbedder,
    evaluate_oov,
    holdout_split,
    load_lexicon,
    pearson_r,
)
from emili_affect.vad import evaluate as evaluate_module
from emili_core.settings import REPO_ROOT

NRC_V1 = REPO_ROOT.parent / "shared" / "data" / "nrc-vad-v1" / "NRC-VAD-Lexicon.txt"
MINILM = REPO_ROOT / "var" / "artifacts" / "labeler" / "all-MiniLM-L6-v2"


def random_lexicon(n: int = 200, seed: int = 0) -> Lexicon:
    values = np.random.default_rng(seed).uniform(size=(n, 3))
    return Lexicon("random", "memory", "d" * 64, tuple(f"w{i:04d}" for i in range(n)), values)


def test_holdout_split_is_seeded_and_disjoint() -> None:
    lexicon = random_lexicon(200)
    train, held = holdout_split(lexicon, 0.1, seed=0)
    assert len(held) == 20 and len(train) == 180
    assert not set(train.tolist()) & set(held.tolist())
    assert sorted([*train.tolist(), *held.tolist()]) == list(range(200))
    _, again_held = holdout_split(lexicon, 0.1, seed=0)
    np.testing.assert_array_equal(held, again_held)
    assert holdout_split(lexicon, 0.1, seed=1)[1].tolist() != held.tolist()
    with pytest.raises(ValueError):
        holdout_split(lexicon, 0.0)
    with pytest.raises(ValueError, match="too small"):
        holdout_split(random_lexicon(1), 0.5)


def test_pearson_r_hand_values() -> None:
    assert pearson_r([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson_r([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = (1, 2, 3, 4), y = (1, 3, 2, 4): cov sum 4, sqrt(5 * 5) = 5 -> 0.8.
    assert pearson_r([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson_r([1, 1, 1], [1, 2, 3]) is None


def test_held_out_words_are_absent_from_every_method(monkeypatch: pytest.MonkeyPatch) -> None:
    lexicon = random_lexicon(200)
    embedder = FixedEmbedder(dim=32)
    _, held = holdout_split(lexicon, 0.1, seed=3)
    held_vectors = embedder.embed([lexicon.terms[i] for i in held])
    seen: list[tuple[str, np.ndarray[Any, Any], np.ndarray[Any, Any]]] = []
    real = evaluate_module.make_estimator  # type: ignore[attr-defined]

    held_terms = {lexicon.terms[i] for i in held}
    fit_terms: list[str] = []

    def spy(method: Any, embeddings: Any, values: Any, **kwargs: Any) -> Any:
        seen.append((method, np.asarray(embeddings), np.asarray(values)))
        fit_terms.extend(kwargs.get("terms") or ())
        return real(method, embeddings, values, **kwargs)

    monkeypatch.setattr(evaluate_module, "make_estimator", spy)
    result = evaluate_oov(lexicon, embedder, holdout=0.1, seed=3)
    assert [m for m, _, _ in seen] == ["softmax", "topk", "ridge", "fusion"]
    # Fusion is fitted on the training terms only (its affect features are looked up from these).
    assert len(fit_terms) == 180 and not held_terms & set(fit_terms)
    for method, matrix, values in seen:
        # Fusion's text features: e(w), then one block per template sentence.
        assert matrix.shape == (180, 96 if method == "fusion" else 32) and values.shape == (180, 3)
        # No held-out word's embedding (nor its VAD row) is among the rows the method was built from.
        distances = np.abs(matrix[None, :, :32] - held_vectors[:, None, :]).max(axis=2)
        assert distances.min() > 1e-3
        for i in held:
            assert not (values == lexicon.values[i]).all(axis=1).any()
    assert result["n_train"] == 180 and result["n_holdout"] == 20


def test_unrelated_embeddings_predict_nothing_and_informative_ones_do() -> None:
    # Random embeddings carry no information: with leakage the sharp softmax would find each held-out word
    # itself and reach r = 1.
    lexicon = random_lexicon(2_000, seed=1)
    noise = evaluate_oov(lexicon, FixedEmbedder(dim=64), methods=["softmax"], beta=200.0)
    assert all(abs(noise["methods"]["softmax"][d]) < 0.3 for d in ("valence", "arousal", "dominance"))
    # Embeddings that encode the values (plus noise) are predicted well by every method.
    rng = np.random.default_rng(2)
    vectors = {
        term: np.concatenate([lexicon.values[i] - 0.5, 0.05 * rng.standard_normal(5)])
        for i, term in enumerate(lexicon.terms)
    }
    informative = evaluate_oov(lexicon, FixedEmbedder(vectors), k=5, beta=50.0)
    for scores in informative["methods"].values():
        assert min(scores["valence"], scores["arousal"], scores["dominance"]) > 0.8


def test_result_form_is_json_able() -> None:
    result = evaluate_oov(random_lexicon(100), FixedEmbedder(dim=8), holdout=0.2, seed=0, methods=["topk", "ridge"])
    assert json.loads(json.dumps(result)) == result
    assert result["lexicon"] == "random" and result["model"] == "fixed"
    assert set(result["methods"]) == {"topk", "ridge"}
    assert result["methods"]["topk"]["k"] == 10 and result["methods"]["ridge"]["alpha"] == 1.0
    assert set(result["methods"]["topk"]) == {"valence", "arousal", "dominance", "k", "seconds"}
    with pytest.raises(ValueError, match="unknown OOV methods"):
        evaluate_oov(random_lexicon(100), FixedEmbedder(dim=8), methods=["nearest"])  # type: ignore[list-item]


@pytest.mark.slow
@pytest.mark.skipif(not NRC_V1.is_file(), reason=f"{NRC_V1} is not available (never part of the repository)")
@pytest.mark.skipif(not (MINILM / "model.safetensors").is_file(), reason=f"{MINILM} is missing")
def test_nrc_v1_with_minilm(tmp_path: Any) -> None:
    # Fusion is left out: embedding its template sentences from an empty cache takes minutes (the CLI measures it).
    result = evaluate_oov(
        load_lexicon(NRC_V1),
        SentenceTransformerEmbedder(MINILM),
        methods=("softmax", "topk", "ridge"),
        cache=LocalEmbeddingCache(tmp_path),
    )
    assert result["n_train"] == 18_006 and result["n_holdout"] == 2_001
    # Measured: softmax valence 0.72 at beta 10 (the paper reports about 0.74).
    for method in ("softmax", "topk", "ridge"):
        assert result["methods"][method]["valence"] > 0.65
        assert result["methods"][method]["arousal"] > 0.5
