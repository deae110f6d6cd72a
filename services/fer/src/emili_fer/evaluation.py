"""Accuracy evaluation of a 7-class FER2013 emotion classifier on grayscale face crops.

`evaluate_crops` is model-agnostic: it takes any ``classify`` callable. ``emili fer eval``
passes one that runs the service's own preprocessing and ONNX model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from emili_session.emotions import EMOTIONS

Classify = Callable[[np.ndarray], np.ndarray]


def evaluate_crops(
    classify: Classify,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Top-1 accuracy and per-class recall of ``classify`` on labelled crops.

    Args:
        classify: maps a uint8 batch (B, H, W) to (B, 7) class scores/probabilities.
        images: (N, H, W) uint8 grayscale crops.
        labels: (N,) integer FER2013 class ids in [0, 7).
        batch_size: crops per ``classify`` call.

    Returns:
        ``{"n": N, "accuracy": float, "per_class_recall": {label_name: float | None}}``;
        recall is None for a class with no examples.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W) uint8, got {images.shape} {images.dtype}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    num_classes = len(EMOTIONS)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes})")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")

    predictions = np.empty(len(images), dtype=np.int64)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        scores = np.asarray(classify(batch))
        if scores.shape != (len(batch), num_classes):
            raise ValueError(f"classify returned shape {scores.shape}, expected ({len(batch)}, {num_classes})")
        predictions[start : start + len(batch)] = scores.argmax(axis=1)

    correct = predictions == labels
    recall: dict[str, float | None] = {}
    for class_id, name in enumerate(EMOTIONS):  # FER2013 class ids are in this order.
        mask = labels == class_id
        recall[name] = float(correct[mask].mean()) if mask.any() else None
    return {"n": len(images), "accuracy": float(correct.mean()), "per_class_recall": recall}
