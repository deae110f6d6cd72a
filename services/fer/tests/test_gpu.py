"""CUDA execution: runs only on a machine with an NVIDIA GPU and onnxruntime-gpu."""

from __future__ import annotations

import pytest

from emili_fer.engine import FerEngine, FrameInput, Reading
from emili_fer.settings import FerOptions

from .conftest import artifacts_dir

pytestmark = pytest.mark.gpu


def test_cuda_provider_is_active_and_agrees_with_cpu(face_jpeg: bytes) -> None:
    gpu = FerEngine(FerOptions(device="cuda"), artifacts_dir())
    gpu.load()  # Raises if onnxruntime fell back to CPU.
    assert gpu.classifier is not None and gpu.classifier.providers[0] == "CUDAExecutionProvider"
    cpu = FerEngine(FerOptions(device="cpu"), artifacts_dir())
    cpu.load()
    (a,) = gpu.analyze_sync([FrameInput(face_jpeg)])
    (b,) = cpu.analyze_sync([FrameInput(face_jpeg)])
    assert isinstance(a, Reading) and isinstance(b, Reading)
    for label in a.probabilities:
        assert a.probabilities[label] == pytest.approx(b.probabilities[label], abs=1e-3)
