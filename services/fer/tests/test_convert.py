"""Tests for emili_fer.convert (Keras 2 HDF5 -> ONNX, no TensorFlow)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from emili_fer.convert import convert_keras_h5_to_onnx, main

DATA_DIR = Path(__file__).parent / "data"
REFERENCE = DATA_DIR / "mini_xception_reference.npz"
TOLERANCE = 1e-4


def _repo_root() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "Makefile").exists() or (parent / ".git").exists():
            return parent
    raise RuntimeError(f"no repository root (Makefile or .git) above {here}")


@pytest.fixture(scope="module")
def emotion_h5() -> Path:
    env = os.environ.get("EMILI_FER_TEST_H5")
    path = Path(env) if env else _repo_root() / "var/artifacts/fer/emotion_model.hdf5"
    if not path.is_file():
        pytest.skip(f"{path} not found: `make setup` fetches the fer emotion model (or set EMILI_FER_TEST_H5)")
    return path


@pytest.fixture(scope="module")
def emotion_onnx(emotion_h5: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "emotion_model.onnx"
    convert_keras_h5_to_onnx(emotion_h5, out)
    return out


def _run(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": x})[0]


# --- the real mini-Xception model -------------------------------------------------


def test_matches_keras_reference(emotion_onnx: Path) -> None:
    ref = np.load(REFERENCE)
    inputs, expected = ref["inputs"], ref["outputs"]
    assert inputs.shape == (32, 64, 64) and expected.shape == (32, 7)
    got = _run(emotion_onnx, inputs[:, None, :, :].astype(np.float32))
    assert got.dtype == np.float32 and got.shape == expected.shape
    max_abs_diff = float(np.abs(got - expected).max())
    assert max_abs_diff <= TOLERANCE, f"max abs diff vs Keras {max_abs_diff:.3g}"
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_model_interface_and_metadata(emotion_h5: Path, emotion_onnx: Path) -> None:
    model = onnx.load(str(emotion_onnx))
    onnx.checker.check_model(model)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, _dims(inp)) == ("input", ["batch", 1, 64, 64])
    assert (out.name, _dims(out)) == ("probabilities", ["batch", 7])
    assert {o.domain: o.version for o in model.opset_import} == {"": 17}
    sha = hashlib.sha256(emotion_h5.read_bytes()).hexdigest()
    props = {p.key: p.value for p in model.metadata_props}
    assert props["source_sha256"] == sha
    assert props["converter"] == "converted by emili_fer.convert"
    assert sha in model.doc_string

    # Dynamic batch: any batch size works and rows are probability vectors.
    for batch in (1, 5):
        probs = _run(emotion_onnx, np.zeros((batch, 1, 64, 64), np.float32))
        assert probs.shape == (batch, 7)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_conversion_is_deterministic(emotion_h5: Path, emotion_onnx: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.onnx"
    main([str(emotion_h5), str(again)])
    assert again.read_bytes() == emotion_onnx.read_bytes()


# --- tiny hand-built Keras files (no downloaded artifact needed) --------------------


def _layer(class_name: str, name: str, config: dict[str, Any], *inputs: str) -> dict[str, Any]:
    nodes = [[[src, 0, 0, {}] for src in inputs]] if inputs else []
    return {"class_name": class_name, "name": name, "config": {"name": name, **config}, "inbound_nodes": nodes}


def _write_keras_h5(
    path: Path,
    layers: list[dict[str, Any]],
    weights: dict[str, dict[str, np.ndarray]],
    input_shape: tuple[int, int, int] = (8, 8, 2),
) -> Path:
    """Write an HDF5 file laid out like Keras 2.0.x `model.save()`."""
    layers = [_layer("InputLayer", "in", {"batch_input_shape": [None, *input_shape], "dtype": "float32"}), *layers]
    config = {
        "class_name": "Model",
        "config": {
            "name": "tiny",
            "layers": layers,
            "input_layers": [["in", 0, 0]],
            "output_layers": [[layers[-1]["name"], 0, 0]],
        },
    }
    with h5py.File(path, "w") as h5:
        h5.attrs["model_config"] = json.dumps(config).encode()
        h5.attrs["keras_version"] = b"2.0.5"
        root = h5.create_group("model_weights")
        root.attrs["layer_names"] = [layer["name"].encode() for layer in layers]
        for layer in layers:
            group = root.create_group(layer["name"])
            names = [f"{layer['name']}/{layer['name']}_1/{key}:0" for key in weights.get(layer["name"], {})]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for full, array in zip(names, weights.get(layer["name"], {}).values(), strict=True):
                group.create_dataset(full, data=array.astype(np.float32))
    return path


def _tf_pad(x: np.ndarray, kernel: int, stride: int, padding: str) -> np.ndarray:
    """Pad NHWC like TensorFlow ('same' puts the odd pixel at bottom/right)."""
    if padding == "valid":
        return x
    pads = []
    for size in x.shape[1:3]:
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, [(0, 0), *pads, (0, 0)], constant_values=np.nan)


def _windows(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    win = np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(1, 2))
    return win[:, ::stride, ::stride]  # (N, H', W', C, kh, kw)


def _np_conv(x: np.ndarray, k: np.ndarray, stride: int, padding: str) -> np.ndarray:
    w = _windows(np.nan_to_num(_tf_pad(x, k.shape[0], stride, padding)), k.shape[0], stride)
    return np.einsum("nhwcij,ijco->nhwo", w, k)


def _np_depthwise(x: np.ndarray, k: np.ndarray, stride: int, padding: str) -> np.ndarray:
    w = _windows(np.nan_to_num(_tf_pad(x, k.shape[0], stride, padding)), k.shape[0], stride)
    out = np.einsum("nhwcij,ijcm->nhwcm", w, k)
    return out.reshape(*out.shape[:3], -1)


def _np_bn(x: np.ndarray, p: dict[str, np.ndarray], eps: float) -> np.ndarray:
    return (x - p["moving_mean"]) / np.sqrt(p["moving_variance"] + eps) * p["gamma"] + p["beta"]


def _bn_weights(rng: np.random.Generator, c: int) -> dict[str, np.ndarray]:
    return {
        "gamma": rng.uniform(0.5, 1.5, c),
        "beta": rng.normal(0, 0.5, c),
        "moving_mean": rng.normal(0, 0.5, c),
        "moving_variance": rng.uniform(0.2, 2.0, c),
    }


def test_tiny_model_matches_numpy_reference(tmp_path: Path) -> None:
    """Every supported layer/option against an independent NHWC numpy implementation."""
    rng = np.random.default_rng(1)
    conv = {"data_format": "channels_last", "dilation_rate": [1, 1], "activation": "linear"}
    w = {
        "c1": {"kernel": rng.normal(0, 0.5, (3, 3, 2, 4)), "bias": rng.normal(0, 0.1, 4)},
        "bn1": _bn_weights(rng, 4),
        "sep": {
            "depthwise_kernel": rng.normal(0, 0.5, (3, 3, 4, 2)),
            "pointwise_kernel": rng.normal(0, 0.5, (1, 1, 8, 4)),
        },
        "bn2": _bn_weights(rng, 4),
        "c2": {"kernel": rng.normal(0, 0.5, (1, 1, 4, 4))},
        "bn3": _bn_weights(rng, 4),
        "head": {"kernel": rng.normal(0, 0.5, (3, 3, 4, 3)), "bias": rng.normal(0, 0.1, 3)},
    }
    layers = [
        _layer(
            "Conv2D",
            "c1",
            {**conv, "filters": 4, "kernel_size": [3, 3], "strides": [2, 2], "padding": "same", "use_bias": True},
            "in",
        ),
        _layer("BatchNormalization", "bn1", {"axis": -1, "epsilon": 1e-3, "center": True, "scale": True}, "c1"),
        _layer("Activation", "relu1", {"activation": "relu"}, "bn1"),
        _layer(
            "SeparableConv2D",
            "sep",
            {
                **conv,
                "filters": 4,
                "kernel_size": [3, 3],
                "strides": [1, 1],
                "padding": "same",
                "depth_multiplier": 2,
                "use_bias": False,
            },
            "relu1",
        ),
        _layer("BatchNormalization", "bn2", {"axis": -1, "epsilon": 1e-3}, "sep"),
        _layer(
            "MaxPooling2D",
            "pool",
            {"pool_size": [3, 3], "strides": [2, 2], "padding": "same", "data_format": "channels_last"},
            "bn2",
        ),
        _layer(
            "Conv2D",
            "c2",
            {
                **conv,
                "filters": 4,
                "kernel_size": [1, 1],
                "strides": [2, 2],
                "padding": "same",
                "use_bias": False,
                "activation": "relu",
            },
            "relu1",
        ),
        # BN after a conv with its own relu cannot be folded: exercises the standalone BN path.
        _layer("BatchNormalization", "bn3", {"axis": -1, "epsilon": 0.01}, "c2"),
        _layer("Add", "add", {}, "pool", "bn3"),
        _layer(
            "Conv2D",
            "head",
            {**conv, "filters": 3, "kernel_size": [3, 3], "strides": [1, 1], "padding": "valid", "use_bias": True},
            "add",
        ),
        _layer("GlobalAveragePooling2D", "gap", {"data_format": "channels_last"}, "head"),
        _layer("Activation", "out", {"activation": "softmax"}, "gap"),
    ]
    h5 = _write_keras_h5(tmp_path / "tiny.h5", layers, w, input_shape=(9, 10, 2))
    onnx_path = tmp_path / "tiny.onnx"
    convert_keras_h5_to_onnx(h5, onnx_path)

    x = rng.normal(0, 1, (3, 9, 10, 2))
    relu1 = np.maximum(_np_bn(_np_conv(x, w["c1"]["kernel"], 2, "same") + w["c1"]["bias"], w["bn1"], 1e-3), 0)
    sep = _np_conv(
        _np_depthwise(relu1, w["sep"]["depthwise_kernel"], 1, "same"), w["sep"]["pointwise_kernel"], 1, "valid"
    )
    bn2 = _np_bn(sep, w["bn2"], 1e-3)
    pool = np.nanmax(_windows(_tf_pad(bn2, 3, 2, "same"), 3, 2), axis=(-2, -1))
    bn3 = _np_bn(np.maximum(_np_conv(relu1, w["c2"]["kernel"], 2, "same"), 0), w["bn3"], 0.01)
    head = _np_conv(pool + bn3, w["head"]["kernel"], 1, "valid") + w["head"]["bias"]
    logits = head.mean(axis=(1, 2))
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    got = _run(onnx_path, x.transpose(0, 3, 1, 2).astype(np.float32))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_unsupported_layer_raises(tmp_path: Path) -> None:
    layers = [_layer("Dense", "dense", {"units": 3, "activation": "linear"}, "in")]
    h5 = _write_keras_h5(tmp_path / "dense.h5", layers, {"dense": {"kernel": np.zeros((2, 3))}})
    with pytest.raises(ValueError, match="Dense"):
        convert_keras_h5_to_onnx(h5, tmp_path / "dense.onnx")
    assert not (tmp_path / "dense.onnx").exists()


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"activation": "tanh"}, "activation 'tanh'"),
        ({"padding": "causal"}, "padding='causal'"),
        ({"data_format": "channels_first"}, "data_format='channels_first'"),
    ],
)
def test_unsupported_option_raises(tmp_path: Path, option: dict[str, Any], match: str) -> None:
    config = {
        "filters": 2,
        "kernel_size": [1, 1],
        "strides": [1, 1],
        "padding": "valid",
        "use_bias": False,
        "activation": "linear",
        "data_format": "channels_last",
        "dilation_rate": [1, 1],
        **option,
    }
    layers = [
        _layer("Conv2D", "conv", config, "in"),
        _layer("GlobalAveragePooling2D", "gap", {"data_format": "channels_last"}, "conv"),
    ]
    h5 = _write_keras_h5(tmp_path / "bad.h5", layers, {"conv": {"kernel": np.ones((1, 1, 2, 2))}})
    with pytest.raises(ValueError, match=match):
        convert_keras_h5_to_onnx(h5, tmp_path / "bad.onnx")
