"""Face detection (OpenCV Haar cascade) and the face crop the classifier sees."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from emili_fer.settings import DetectionSettings


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    width: int
    height: int

    def scaled(self, factor: float) -> Box:
        return Box(
            round(self.x * factor), round(self.y * factor), round(self.width * factor), round(self.height * factor)
        )


@dataclass(frozen=True)
class Detection:
    face_count: int
    box: Box | None  # The largest face that passed the size filter, in frame coordinates.


def cascade_path(name: str) -> Path:
    path = Path(name)
    if not path.is_absolute():
        path = Path(cv2.data.haarcascades) / name  # type: ignore[attr-defined]
    if not path.is_file():
        raise FileNotFoundError(f"Haar cascade {path} not found (EMILI_FER__DETECTION__CASCADE)")
    return path


class FaceDetector:
    """Thread-safe: each thread gets its own cascade (OpenCV's classifier keeps per-call state)."""

    def __init__(self, settings: DetectionSettings) -> None:
        self.settings = settings
        self.path = str(cascade_path(settings.cascade))
        self._local = threading.local()
        if cv2.CascadeClassifier(self.path).empty():
            raise ValueError(f"Haar cascade {self.path} could not be loaded")

    def _cascade(self) -> cv2.CascadeClassifier:
        cascade = getattr(self._local, "cascade", None)
        if cascade is None:
            cascade = self._local.cascade = cv2.CascadeClassifier(self.path)
        return cascade

    def detect(self, gray: np.ndarray) -> Detection:
        """Find faces on a downscaled copy; keep the largest one tall enough to read."""
        s = self.settings
        height, width = gray.shape[:2]
        scale = min(1.0, s.detect_width / width)
        small = (
            gray
            if scale == 1.0
            else cv2.resize(gray, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        )
        min_side = max(8, int(s.min_face_height_ratio * height * scale))
        found = self._cascade().detectMultiScale(
            small, scaleFactor=s.scale_factor, minNeighbors=s.min_neighbors, minSize=(min_side, min_side)
        )
        if len(found) == 0:
            return Detection(0, None)
        x, y, w, h = max(found, key=lambda b: int(b[2]) * int(b[3]))
        return Detection(len(found), Box(int(x), int(y), int(w), int(h)).scaled(1.0 / scale))


def square_crop(image: np.ndarray, box: Box, padding: float) -> np.ndarray:
    """Square the box around its centre, pad it, and cut it out (zero-filled beyond the frame)."""
    side = round(max(box.width, box.height) * (1.0 + 2.0 * padding))
    cx, cy = box.x + box.width / 2.0, box.y + box.height / 2.0
    x0, y0 = round(cx - side / 2.0), round(cy - side / 2.0)
    height, width = image.shape[:2]
    top, left = max(0, -y0), max(0, -x0)
    bottom, right = max(0, y0 + side - height), max(0, x0 + side - width)
    crop = image[max(0, y0) : min(height, y0 + side), max(0, x0) : min(width, x0 + side)]
    if top or left or bottom or right:
        crop = cv2.copyMakeBorder(crop, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)
    return crop
