"""The fusion OOV method: affect-lexicon features, the stacked estimator, and its use by the scorer."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from emili_affect.vad import (
    FixedEmbedder,
    FusionEstimator,
    Lexicon,
    TemplateEmbedder,
    VADScorer,
    WordFeaturizer,
    affect_features,
    evaluate_oov,
    load_affect_tables,
    make_estimator,
    pearson_r,
)
from emili_affect.vad import oov as oov_module


def write_resources(folder: Path) -> None:
    (folder / "vader_lexicon.txt").write_text("good\t2.0\t0.5\t[2, 2]\nbad\t-2.0\t0.5\t[-2, -2]\n")
    (folder / "AFINN_v2015.csv").write_text("lexicon,score\ngood,3\nawful,-5\n")
    sentiment = {"@type": "Dictionary", "sentiment": {"good": "positive", "ice_cream": "positive", "x": "neutral"}}
    (folder / "OpinionLexicon_v2004.json").write_text(json.dumps({"data": sentiment}))
    (folder / "DAL_v2009.csv").write_text("word,pleasantness,activation,imagery\ngood,3,2,1\ngood,2,2,1\n")


def test_affect_tables_layout_and_missing_words(tmp_path: Path) -> None:
    write_resources(tmp_path)
    tables = load_affect_tables([tmp_path, tmp_path / "no-such-file.csv"])
    # AFFECT_FILES order, whatever the folder listing says; unknown labels ("neutral") are not values.
    assert [t.name for t in tables] == ["vader", "afinn", "opinion", "dal"]
    assert tables[2].table == {"good": (1.0,), "ice cream": (1.0,)}
    features = affect_features(["Good", "ice_cream", "unknown"], tables)
    # vader: ind, v | afinn: ind, v | opinion: ind, v | dal: ind, p, a, i (two "good" rows averaged).
    np.testing.assert_allclose(features[0], [1, 0.5, 1, 0.6, 1, 1.0, 1, 0.5, 0.0, -1.0])
    np.testing.assert_allclose(features[1], [0, 0, 0, 0, 1, 1.0, 0, 0, 0, 0])
    assert not features[2].any()
    assert affect_features(["good"], []).shape == (1, 0)


def test_the_target_lexicons_own_file_is_excluded(tmp_path: Path) -> None:
    write_resources(tmp_path)
    digest = hashlib.sha256((tmp_path / "AFINN_v2015.csv").read_bytes()).hexdigest()
    names = [t.name for t in load_affect_tables([tmp_path], exclude_sha256=[digest])]
    assert names == ["vader", "opinion", "dal"]


def test_template_embedder_has_its_own_model_id() -> None:
    base = FixedEmbedder(dim=8)
    template = TemplateEmbedder(base, "I feel {}.")
    assert template.model_id != base.model_id and template.template in template.model_id
    np.testing.assert_array_equal(template.embed(["sad"]), base.embed(["I feel sad."]))
    with pytest.raises(ValueError, match="template"):
        TemplateEmbedder(base, "no slot")


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Text features that carry VAD with noise, and one affect column that is exactly valence on a third."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(size=(n, 3))
    text = np.hstack([values - 0.5 + 0.25 * rng.standard_normal((n, 3)), 0.1 * rng.standard_normal((n, 5))])
    covered = rng.uniform(size=n) < 1 / 3
    affect = np.column_stack([covered, np.where(covered, 2 * values[:, 0] - 1, 0.0)])
    return text, affect, values


def test_fusion_learns_from_text_and_trusts_an_informative_resource() -> None:
    text, affect, values = synthetic(1_200, seed=0)
    train, test = slice(0, 900), slice(900, None)
    fusion = FusionEstimator(text[train], affect[train], values[train], word_dim=3, trees=50, learning_rate=0.1)
    predicted = fusion.predict(text[test], affect[test])
    assert predicted.shape == (300, 3) and (predicted >= 0).all() and (predicted <= 1).all()
    without = FusionEstimator(text[train], np.zeros((900, 0)), values[train], word_dim=3, trees=50, learning_rate=0.1)
    alone = without.predict(text[test], np.zeros((300, 0)))
    r_fused = pearson_r(predicted[:, 0], values[test, 0])
    r_alone = pearson_r(alone[:, 0], values[test, 0])
    assert r_alone is not None and r_fused is not None
    assert r_alone > 0.6  # The text features alone carry the signal...
    assert r_fused > r_alone + 0.05  # ...and the resource, where it lists the word, improves on them.
    covered = affect[test, 0] > 0
    assert np.abs(predicted[covered, 0] - values[test][covered, 0]).mean() < 0.06
    # Arousal has no resource: about as good either way.
    assert (
        abs((pearson_r(predicted[:, 1], values[test, 1]) or 0) - (pearson_r(alone[:, 1], values[test, 1]) or 0)) < 0.1
    )
    assert fusion.alpha in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def test_fusion_checks_its_inputs() -> None:
    text, affect, values = synthetic(50, seed=1)
    with pytest.raises(ValueError, match="training words"):
        FusionEstimator(text[:8], affect[:8], values[:8], word_dim=3)
    with pytest.raises(ValueError, match="need"):
        FusionEstimator(text, affect[:10], values, word_dim=3)
    fusion = FusionEstimator(text, affect, values, word_dim=3, trees=10)
    with pytest.raises(ValueError, match="affect"):
        fusion.predict(text[:2], affect[:2, :1])
    assert fusion.predict(text[:0], affect[:0]).shape == (0, 3)
    with pytest.raises(ValueError, match="featurizer"):
        fusion.estimate_words(["word"])
    with pytest.raises(ValueError, match="featurizer"):
        make_estimator("fusion", text, values)


def word_lexicon(n: int = 120) -> tuple[Lexicon, FixedEmbedder]:
    rng = np.random.default_rng(3)
    values = rng.uniform(size=(n, 3))
    terms = tuple(f"w{i:03d}" for i in range(n))
    vectors = {t: np.concatenate([values[i] - 0.5, 0.05 * rng.standard_normal(3)]) for i, t in enumerate(terms)}
    vectors["fresh"] = np.array([0.4, 0.4, 0.4, 0.0, 0.0, 0.0])
    return Lexicon("synthetic", "memory", "e" * 64, terms, values), FixedEmbedder(vectors)


def test_scorer_estimates_unknown_words_with_fusion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fewer trees: boosting's per-tree overhead dominates on a toy lexicon.
    monkeypatch.setattr(oov_module, "FusionEstimator", functools.partial(FusionEstimator, trees=30))
    write_resources(tmp_path)
    lexicon, embedder = word_lexicon()
    scorer = VADScorer(lexicon, embedder, oov="fusion", affect_tables=load_affect_tables([tmp_path]))
    assert scorer.featurizer is not None and [t.name for t in scorer.featurizer.tables] == [
        "vader",
        "afinn",
        "opinion",
        "dal",
    ]
    result = scorer.score("w000 fresh good")
    assert result.sources == ("lexicon", "fusion", "fusion")
    assert result.vad is not None and all(0.0 <= x <= 1.0 for x in result.vad)
    # "fresh" embeds like a high-VAD word: estimated above the middle on every dimension.
    assert (result.token_vad[1] > 0.5).all()


def test_evaluate_oov_reports_fusion_and_its_resources(tmp_path: Path) -> None:
    write_resources(tmp_path)
    lexicon, embedder = word_lexicon(200)
    result = evaluate_oov(
        lexicon, embedder, methods=["softmax", "fusion"], affect_tables=load_affect_tables([tmp_path])
    )
    fusion = result["methods"]["fusion"]
    assert set(result["methods"]) == {"softmax", "fusion"}
    assert fusion["resources"] == ["vader", "afinn", "opinion", "dal"]
    assert fusion["templates"] == ["I feel {}.", "That is {}."] and fusion["valence"] > 0.8
    assert json.loads(json.dumps(result)) == result


def test_featurizer_blocks(tmp_path: Path) -> None:
    write_resources(tmp_path)
    embedder = FixedEmbedder(dim=4)
    featurizer = WordFeaturizer(embedder, load_affect_tables([tmp_path]), templates=("{}!",))
    text = featurizer.text(["good"])
    np.testing.assert_array_equal(text, np.hstack([embedder.embed(["good"]), embedder.embed(["good!"])]))
    assert featurizer.affect(["good", "zzz"]).shape == (2, 10)
