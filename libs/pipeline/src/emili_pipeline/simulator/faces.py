"""What the simulated user's face shows: FER probabilities drawn from the hidden state, or real face images.

Mean expression (:func:`expression_mean`): the state shown on the face is ``clip(expressiveness * (v, a,
d), -1, 1)`` (a low-expressiveness user looks nearer neutral). Each FER class k has a prototype point
p_k in VAD space (:data:`FACE_PROTOTYPES`); its logit is ``-|shown - p_k|^2 / (2 width^2)`` plus the
user's resting-face bias for k, plus ``neutral_prior`` for neutral; the mean is their softmax. A user at
rest therefore mostly looks neutral, as people in front of a webcam do.

Readings (:func:`sample_reading`): ``Dirichlet(concentration * mean)``, floored at 1e-4 and renormalised so
every class is present and the seven sum to 1; with probability ``missing_rate`` no face is found (the
user looked away).

Frames (:class:`FaceSet`): the target class is drawn from the same mean, and a random image of that class
is sent. Two layouts are read:

* a folder with one sub-folder per class (``angry/ disgust/ fear/ happy/ sad/ surprise/ neutral/``; common
  aliases such as ``happiness`` or ``surprised`` are accepted) holding JPEG or PNG files, sent as they are;
* an NPZ file with ``images`` (N, H, W) uint8 grayscale crops and ``labels`` (N,) FER2013 class ids, like
  the development copy of FER2013 PublicTest. Crops are tight (the face fills the 48 px image), which the
  FER service's face detector would miss, so each is scaled up and centred on a grey canvas before being
  JPEG-encoded. FER2013 has no open license: it is read by path, never shipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydantic import BaseModel, Field

from emili_pipeline.simulator.state import EmotionState, UserTraits
from emili_session.emotions import EMOTIONS

FACE_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "angry": (-0.6, 0.6, 0.4),
    "disgust": (-0.7, 0.3, 0.2),
    "fear": (-0.6, 0.7, -0.6),
    "happy": (0.8, 0.4, 0.4),
    "sad": (-0.7, -0.4, -0.4),
    "surprise": (0.3, 0.8, 0.0),
    "neutral": (0.0, 0.0, 0.0),
}
_PROTOTYPES = np.array([FACE_PROTOTYPES[c] for c in EMOTIONS])
_NEUTRAL = EMOTIONS.index("neutral")
_ALIASES = {
    "anger": "angry",
    "disgusted": "disgust",
    "fearful": "fear",
    "afraid": "fear",
    "happiness": "happy",
    "sadness": "sad",
    "surprised": "surprise",
    "calm": "neutral",
}
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


class FaceModelSettings(BaseModel):
    """How the state shows on the face; ``EMILI_PIPELINE__SIMULATOR__FACE__<FIELD>``."""

    width: float = Field(0.5, gt=0)
    neutral_prior: float = 0.5
    concentration: float = Field(40.0, gt=0)  # Higher: readings closer to the mean.
    missing_rate: float = Field(0.02, ge=0, le=1)
    frame_size: int = Field(240, ge=96, le=1080)  # Square canvas for NPZ crops.
    face_size: int = Field(144, ge=48, le=1080)  # The crop's size on that canvas.


@dataclass(frozen=True)
class Reading:
    face_found: bool
    probabilities: dict[str, float]  # Empty when no face was found.


def expression_mean(state: EmotionState, traits: UserTraits, params: FaceModelSettings) -> np.ndarray:
    """The expected FER probabilities (EMOTIONS order) for a user in ``state``."""
    shown = np.clip(traits.expressiveness * state.vector(), -1.0, 1.0)
    logits = -np.sum((_PROTOTYPES - shown) ** 2, axis=1) / (2 * params.width**2) + np.array(traits.resting_face)
    logits[_NEUTRAL] += params.neutral_prior
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()  # type: ignore[no-any-return]


def sample_reading(
    state: EmotionState, traits: UserTraits, params: FaceModelSettings, rng: np.random.Generator
) -> Reading:
    if rng.random() < params.missing_rate:
        return Reading(False, {})
    mean = expression_mean(state, traits, params)
    drawn = np.maximum(rng.dirichlet(params.concentration * mean + 1e-3), 1e-4)
    drawn /= drawn.sum()
    return Reading(True, {c: float(p) for c, p in zip(EMOTIONS, drawn, strict=True)})


def target_class(state: EmotionState, traits: UserTraits, params: FaceModelSettings, rng: np.random.Generator) -> str:
    """The FER class whose image the user's face shows now, drawn from the expression mean."""
    mean = expression_mean(state, traits, params)
    return EMOTIONS[int(rng.choice(len(EMOTIONS), p=mean))]


def class_name(name: str) -> str | None:
    """A folder name as a FER class, or None if it names none."""
    lowered = name.strip().lower()
    lowered = _ALIASES.get(lowered, lowered)
    return lowered if lowered in EMOTIONS else None


class FaceSet:
    """Labelled face images by FER class; :meth:`pick` returns encoded bytes (JPEG or PNG)."""

    def __init__(self, source: str, images: dict[str, Sequence[Path] | np.ndarray], params: FaceModelSettings) -> None:
        self.source = source
        self.images = {c: v for c, v in images.items() if len(v)}
        self.params = params
        if not self.images:
            raise ValueError(f"{source}: no face images found for any of {', '.join(EMOTIONS)}")

    def counts(self) -> dict[str, int]:
        return {c: len(v) for c, v in self.images.items()}

    def pick(self, wanted: str, rng: np.random.Generator, order: Sequence[str] = EMOTIONS) -> tuple[str, bytes]:
        """A random image of class ``wanted``; without one, of the first class in ``order`` that has some."""
        label = wanted if wanted in self.images else next(c for c in order if c in self.images)
        pool = self.images[label]
        item = pool[int(rng.integers(len(pool)))]
        if isinstance(item, Path):
            return label, item.read_bytes()
        return label, self._encode(np.asarray(item))

    def _encode(self, crop: np.ndarray) -> bytes:
        size, face = self.params.frame_size, self.params.face_size
        canvas = np.full((size, size), 128, dtype=np.uint8)
        scaled = cv2.resize(crop, (face, face), interpolation=cv2.INTER_CUBIC)
        top = (size - face) // 2
        canvas[top : top + face, top : top + face] = scaled
        ok, encoded = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise ValueError("could not encode a face image as JPEG")
        return bytes(encoded.tobytes())


def _from_folders(root: Path, params: FaceModelSettings) -> FaceSet:
    images: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = class_name(folder.name)
        if label is not None:
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES and f.is_file())
            images.setdefault(label, []).extend(files)
    return FaceSet(str(root), dict(images), params)


def _from_npz(path: Path, params: FaceModelSettings) -> FaceSet:
    with np.load(path) as data:
        crops, labels = np.asarray(data["images"]), np.asarray(data["labels"])
    if crops.ndim != 3 or crops.dtype != np.uint8 or len(crops) != len(labels):
        raise ValueError(f"{path}: expected images (N, H, W) uint8 and labels (N,)")
    return FaceSet(str(path), {c: crops[labels == i] for i, c in enumerate(EMOTIONS)}, params)


def load_face_set(path: Path, params: FaceModelSettings | None = None) -> FaceSet:
    """Class folders, an NPZ file, or a folder holding exactly one NPZ file (see the module docstring)."""
    params = params or FaceModelSettings()
    path = path.expanduser()
    if path.is_file() and path.suffix == ".npz":
        return _from_npz(path, params)
    if path.is_dir():
        archives = sorted(path.glob("*.npz"))
        if len(archives) == 1 and not any(class_name(p.name) for p in path.iterdir() if p.is_dir()):
            return _from_npz(archives[0], params)
        return _from_folders(path, params)
    raise FileNotFoundError(f"no face set at {path}: expected class folders or an .npz file")
