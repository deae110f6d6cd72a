"""The model manifest: everything the pipeline needs to know about an ONNX FER model.

Any ONNX model drops in through a manifest (size, colour, layout, normalisation, extra outputs), but its
labels must be EMILI's seven emotions in their order (:data:`emili_session.emotions.EMOTIONS`): readouts,
reaction weights and datasets read readings by those names, and evaluation by FER2013 class id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from emili_session.emotions import check_labels


class ModelManifest(BaseModel):
    id: str = Field(..., min_length=1)
    onnx: Path
    input: str = "input"
    output: str = "probabilities"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    width: int = Field(..., ge=8, le=1024)
    height: int = Field(..., ge=8, le=1024)
    color: Literal["gray", "rgb", "bgr"] = "gray"
    mean: list[float]
    std: list[float]
    labels: list[str] = Field(..., min_length=2)
    # Optional extra outputs: ONNX output name -> names of its columns (e.g. {"va": ["valence", "arousal"]}).
    extra_outputs: dict[str, list[str]] = {}
    # Set when the model's output is logits rather than probabilities.
    apply_softmax: bool = False

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @model_validator(mode="after")
    def _check_normalisation(self) -> ModelManifest:
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values for color={self.color}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        return self


def load_manifest(path: Path, artifacts_dir: Path) -> ModelManifest:
    """Read a manifest; a relative ``onnx`` path is taken under ``artifacts_dir``."""
    if not path.is_file():
        raise FileNotFoundError(f"FER model manifest {path} does not exist (EMILI_FER__MANIFEST)")
    try:
        manifest = ModelManifest.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"invalid FER model manifest {path}: {exc}") from exc
    check_labels(manifest.labels, f"FER model manifest {path}")
    if not manifest.onnx.is_absolute():
        manifest = manifest.model_copy(update={"onnx": artifacts_dir / manifest.onnx})
    return manifest
