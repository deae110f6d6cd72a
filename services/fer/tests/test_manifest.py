"""Another ONNX FER model drops in through a manifest alone: other size, colour, layout, extra outputs; its
labels must be EMILI's seven emotions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from emili_fer.engine import FerEngine, FrameInput, Reading
from emili_fer.manifest import load_manifest
from emili_fer.settings import FerOptions
from emili_session.emotions import EMOTIONS


def _tiny_model(path: Path) -> None:
    """NHWC 32x32 RGB in; 7 logits (softmax applied by the pipeline) and valence/arousal out."""
    rng = np.random.default_rng(0)
    weights = helper.make_tensor("w", TensorProto.FLOAT, [3, 7], rng.normal(size=21).astype(np.float32).ravel())
    va_weights = helper.make_tensor("wva", TensorProto.FLOAT, [3, 2], rng.normal(size=6).astype(np.float32).ravel())
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["pixels", "axes"], ["pooled"], keepdims=0),  # (N, 3)
            helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
            helper.make_node("MatMul", ["pooled", "wva"], ["va_raw"]),
            helper.make_node("Tanh", ["va_raw"], ["va"]),
        ],
        "tiny_fer",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 32, 32, 3])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 7]),
            helper.make_tensor_value_info("va", TensorProto.FLOAT, ["batch", 2]),
        ],
        initializer=[weights, va_weights, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)


def test_drop_in_model_with_extra_outputs(tmp_path: Path, face_jpeg: bytes) -> None:
    _tiny_model(tmp_path / "tiny.onnx")
    manifest = {
        "id": "tiny-test-model",
        "onnx": "tiny.onnx",
        "input": "pixels",
        "output": "logits",
        "apply_softmax": True,
        "layout": "NHWC",
        "width": 32,
        "height": 32,
        "color": "rgb",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "labels": list(EMOTIONS),
        "extra_outputs": {"va": ["valence", "arousal"]},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(manifest))
    engine = FerEngine(FerOptions(manifest=tmp_path / "tiny.yaml"), tmp_path)
    engine.load()
    (reading,) = engine.analyze_sync([FrameInput(face_jpeg)])
    assert isinstance(reading, Reading) and reading.face_found
    assert reading.model_id == "tiny-test-model"
    assert list(reading.probabilities) == list(EMOTIONS)
    assert sum(reading.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert set(reading.extras) == {"valence", "arousal"} and all(-1 <= v <= 1 for v in reading.extras.values())


def test_manifest_errors_are_clear(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "id: x\nonnx: m.onnx\nwidth: 64\nheight: 64\nmean: [0.5, 0.5]\nstd: [0.5]\nlabels: [a, b]\ncolor: gray\n"
    )
    with pytest.raises(ValueError, match="mean needs 1 or 1 values"):
        load_manifest(tmp_path / "bad.yaml", tmp_path)
    with pytest.raises(FileNotFoundError, match="EMILI_FER__MANIFEST"):
        load_manifest(tmp_path / "missing.yaml", tmp_path)


def test_labels_other_than_emilis_emotions_are_refused(tmp_path: Path) -> None:
    base = "id: x\nonnx: m.onnx\nwidth: 64\nheight: 64\nmean: [0.5]\nstd: [0.5]\ncolor: gray\n"
    (tmp_path / "valence.yaml").write_text(base + "labels: [negative, neutral, positive]\n")
    with pytest.raises(ValueError, match=r"valence.yaml has labels \['negative', 'neutral', 'positive'\]"):
        load_manifest(tmp_path / "valence.yaml", tmp_path)
    reordered = [*EMOTIONS[1:], EMOTIONS[0]]
    (tmp_path / "reordered.yaml").write_text(base + f"labels: [{', '.join(reordered)}]\n")
    with pytest.raises(ValueError, match="in this order"):
        load_manifest(tmp_path / "reordered.yaml", tmp_path)


def test_missing_output_is_reported(tmp_path: Path) -> None:
    _tiny_model(tmp_path / "tiny.onnx")
    manifest = {
        "id": "t",
        "onnx": "tiny.onnx",
        "input": "pixels",
        "output": "probs",
        "layout": "NHWC",
        "width": 32,
        "height": 32,
        "color": "rgb",
        "mean": [0.5],
        "std": [0.5],
        "labels": list(EMOTIONS),
    }
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(manifest))
    engine = FerEngine(FerOptions(manifest=tmp_path / "t.yaml"), tmp_path)
    with pytest.raises(ValueError, match=r"has no outputs \['probs'\]"):
        engine.load()
