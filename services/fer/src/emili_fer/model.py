"""The ONNX classifier: a batch of preprocessed faces in, probabilities (and extra outputs) out."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from emili_fer.manifest import ModelManifest

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class ModelOutput:
    probabilities: np.ndarray  # (N, len(labels)) float32
    extras: dict[str, np.ndarray]  # extra column name -> (N,) float32


class DeviceMismatch(RuntimeError):
    """The model is not running where it was configured to run (e.g. CUDA silently fell back to CPU)."""


class OnnxClassifier:
    def __init__(self, manifest: ModelManifest, device: str = "cpu", intra_op_threads: int = 1) -> None:
        if not manifest.onnx.is_file():
            raise FileNotFoundError(f"ONNX model {manifest.onnx} not found; `make setup` converts the default one")
        self.manifest = manifest
        self.device = device
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device == "cuda" and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu with CUDA/cuDNN from pip wheels finds those libraries only when preloaded.
            ort.preload_dlls()
        wanted = [CUDA, CPU] if device == "cuda" else [CPU]
        available = ort.get_available_providers()
        providers = [p for p in wanted if p in available]
        self.session = ort.InferenceSession(str(manifest.onnx), options, providers=providers)
        self.providers = self.session.get_providers()
        outputs = {o.name for o in self.session.get_outputs()}
        missing = ({manifest.output} | set(manifest.extra_outputs)) - outputs
        if missing:
            raise ValueError(f"model {manifest.onnx} has no outputs {sorted(missing)}; it has {sorted(outputs)}")
        self._output_names = [manifest.output, *manifest.extra_outputs]

    def check_device(self) -> None:
        """onnxruntime falls back to CPU quietly when CUDA fails to load: refuse to serve like that."""
        if self.device == "cuda" and CUDA not in self.providers:
            raise DeviceMismatch(
                f"configured for CUDA but onnxruntime runs on {self.providers} "
                f"(available: {ort.get_available_providers()}); install onnxruntime-gpu and the CUDA libraries"
            )

    def __call__(self, batch: np.ndarray) -> ModelOutput:
        """``batch``: (N, H, W, C) float32, already normalised."""
        tensor = np.ascontiguousarray(batch.transpose(0, 3, 1, 2) if self.manifest.layout == "NCHW" else batch)
        outputs = self.session.run(self._output_names, {self.manifest.input: tensor})
        probabilities = outputs[0].astype(np.float32, copy=False)
        if self.manifest.apply_softmax:
            shifted = np.exp(probabilities - probabilities.max(axis=1, keepdims=True))
            probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        extras: dict[str, np.ndarray] = {}
        for values, columns in zip(outputs[1:], self.manifest.extra_outputs.values(), strict=True):
            values = np.asarray(values, dtype=np.float32).reshape(len(batch), -1)
            for i, column in enumerate(columns):
                extras[column] = values[:, i]
        return ModelOutput(probabilities, extras)

    def warm_up(self, max_batch_size: int) -> None:
        """Run the batch sizes the server will use, so the first real frames do not pay for allocation."""
        m = self.manifest
        for size in sorted({1, max(1, max_batch_size // 2), max_batch_size}):
            self(np.zeros((size, m.height, m.width, m.channels), np.float32))
        log.info("model %s warmed up on %s", m.id, self.providers)
