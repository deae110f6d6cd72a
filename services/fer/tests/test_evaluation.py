"""Tests for emili_fer.evaluation with a fake classifier (no model or dataset needed)."""

from __future__ import annotations

import numpy as np
import pytest

from emili_fer.evaluation import evaluate_crops
from emili_session.emotions import EMOTIONS


def _fake_classify(batch: np.ndarray) -> np.ndarray:
    """Predicts the class encoded in pixel [0, 0]; records batch sizes it saw."""
    _fake_classify.batch_sizes.append(len(batch))  # type: ignore[attr-defined]
    assert batch.dtype == np.uint8 and batch.ndim == 3
    scores = np.zeros((len(batch), 7), np.float32)
    scores[np.arange(len(batch)), batch[:, 0, 0]] = 1.0
    return scores


def test_accuracy_recall_and_batching() -> None:
    labels = np.array([0, 0, 1, 3, 3, 3, 4, 5, 6, 6])
    predicted = np.array([0, 2, 1, 3, 3, 0, 4, 5, 6, 5])  # 7 of 10 correct
    images = np.zeros((10, 48, 48), np.uint8)
    images[:, 0, 0] = predicted
    _fake_classify.batch_sizes = []  # type: ignore[attr-defined]

    result = evaluate_crops(_fake_classify, images, labels, batch_size=4)

    assert _fake_classify.batch_sizes == [4, 4, 2]  # type: ignore[attr-defined]
    assert result["n"] == 10
    assert result["accuracy"] == pytest.approx(0.7)
    recall = result["per_class_recall"]
    assert list(recall) == list(EMOTIONS)
    assert recall["angry"] == pytest.approx(0.5)
    assert recall["disgust"] == 1.0
    assert recall["fear"] is None  # no fear examples
    assert recall["happy"] == pytest.approx(2 / 3)
    assert recall["neutral"] == pytest.approx(0.5)


def test_rejects_bad_inputs() -> None:
    images = np.zeros((2, 48, 48), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        evaluate_crops(_fake_classify, images.astype(np.float32), np.zeros(2, int))
    with pytest.raises(ValueError, match="labels"):
        evaluate_crops(_fake_classify, images, np.array([0, 7]))
    with pytest.raises(ValueError, match="classify returned shape"):
        evaluate_crops(lambda b: np.zeros((len(b), 3)), images, np.zeros(2, int))
