"""Turn face crops into the model's input tensor, as the manifest describes."""

from __future__ import annotations

import cv2
import numpy as np

from emili_fer.manifest import ModelManifest


class Preprocessor:
    def __init__(self, manifest: ModelManifest) -> None:
        self.manifest = manifest
        channels = manifest.channels
        self.mean = np.asarray(manifest.mean, np.float32).reshape(1, 1, -1).repeat(channels // len(manifest.mean), 2)
        self.std = np.asarray(manifest.std, np.float32).reshape(1, 1, -1).repeat(channels // len(manifest.std), 2)

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        """uint8 gray (H, W) or BGR (H, W, 3) crop -> float32 (h, w, C) normalised input."""
        m = self.manifest
        if m.color == "gray" and crop.ndim == 3:
            crop = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
        elif m.color != "gray" and crop.ndim == 2:
            crop = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR)
        if m.color == "rgb":
            crop = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)
        # Bilinear, as the `fer` package resizes for this model (its published accuracy depends on it).
        resized = cv2.resize(crop, (m.width, m.height), interpolation=cv2.INTER_LINEAR)
        pixels = resized.astype(np.float32).reshape(m.height, m.width, m.channels) / 255.0
        return (pixels - self.mean) / self.std

    def batch(self, crops: np.ndarray) -> np.ndarray:
        return (
            np.stack([self(c) for c in crops])
            if len(crops)
            else np.zeros((0, self.manifest.height, self.manifest.width, self.manifest.channels), np.float32)
        )
