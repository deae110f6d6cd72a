"""Convert a Keras 2 HDF5 functional model (mini-Xception emotion classifier) to ONNX.

The model is read with h5py and the graph is written with ``onnx.helper``, so
no TensorFlow is needed at conversion or inference time.  Only the layer types
used by the FER mini-Xception model are supported; anything else raises a
``ValueError`` instead of producing a silently wrong graph.

Layout: Keras tensors are NHWC, the ONNX graph is NCHW throughout (kernels are
transposed on the way in), so the ONNX input is ``[batch, C, H, W]``.

Usage::

    python -m emili_fer.convert emotion_model.hdf5 emotion_model.onnx
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["convert_keras_h5_to_onnx", "main"]

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
CONVERTER = "emili_fer.convert"

SUPPORTED_LAYERS = frozenset(
    {
        "InputLayer",
        "Conv2D",
        "SeparableConv2D",
        "BatchNormalization",
        "Activation",
        "Add",
        "MaxPooling2D",
        "GlobalAveragePooling2D",
    }
)
_CONV_LAYERS = frozenset({"Conv2D", "SeparableConv2D"})
_ACTIVATIONS = frozenset({"linear", "relu", "softmax"})


@dataclass(frozen=True)
class _Tensor:
    """An ONNX value plus its static NCHW (or NC) shape; dim 0 is the dynamic batch."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Layer:
    class_name: str
    name: str
    config: dict[str, Any]
    inputs: tuple[str, ...]


def _fail(layer: _Layer, message: str) -> ValueError:
    return ValueError(f"layer {layer.name!r} ({layer.class_name}): {message}")


def _pair(value: Any, layer: _Layer, key: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise _fail(layer, f"{key}={value!r} is not an int or a pair of ints")


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int, int]:
    """TF 'same' padding for one spatial dim: (begin, end, output size).

    TF puts the odd extra pixel at the end (bottom/right); explicit pads make
    that exact for any runtime instead of relying on auto_pad semantics.
    """
    effective = (kernel - 1) * dilation + 1
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2, out


def _spatial(
    layer: _Layer,
    shape: tuple[int, ...],
    kernel: tuple[int, int],
    strides: tuple[int, int],
    dilation: tuple[int, int],
    padding: str,
) -> tuple[list[int], tuple[int, int]]:
    """ONNX pads [top, left, bottom, right] and output (H, W) for a Keras window op."""
    height, width = shape[2], shape[3]
    if padding == "valid":
        outs = tuple(
            (size - ((k - 1) * d + 1)) // s + 1
            for size, k, s, d in zip((height, width), kernel, strides, dilation, strict=True)
        )
        if min(outs) < 1:
            raise _fail(layer, f"input {height}x{width} is smaller than the window")
        return [0, 0, 0, 0], (outs[0], outs[1])
    if padding == "same":
        top, bottom, out_h = _same_pads(height, kernel[0], strides[0], dilation[0])
        left, right, out_w = _same_pads(width, kernel[1], strides[1], dilation[1])
        return [top, left, bottom, right], (out_h, out_w)
    raise _fail(layer, f"padding={padding!r} is not supported (only 'same' and 'valid')")


def _check_channels_last(layer: _Layer) -> None:
    # None means the Keras default, which for the TF backend is channels_last.
    fmt = layer.config.get("data_format")
    if fmt not in (None, "channels_last"):
        raise _fail(layer, f"data_format={fmt!r} is not supported")


def _parse_layers(model_config: dict[str, Any]) -> tuple[list[_Layer], str, str]:
    """Validate the functional-model config; return layers plus input/output layer names."""
    if model_config.get("class_name") not in ("Model", "Functional"):
        raise ValueError(f"only Keras functional models are supported, got {model_config.get('class_name')!r}")
    config = model_config["config"]
    layers: list[_Layer] = []
    for raw in config["layers"]:
        layer = _Layer(raw["class_name"], raw["name"], raw["config"], ())
        if layer.class_name not in SUPPORTED_LAYERS:
            raise _fail(layer, f"unsupported layer type; supported: {sorted(SUPPORTED_LAYERS)}")
        nodes = raw.get("inbound_nodes", [])
        if len(nodes) > 1:
            raise _fail(layer, "shared layers (called more than once) are not supported")
        inputs: list[str] = []
        for inbound in nodes[0] if nodes else []:
            # Keras 2 format: [layer_name, node_index, tensor_index, kwargs].
            if not isinstance(inbound, list) or len(inbound) not in (3, 4):
                raise _fail(layer, f"unrecognised inbound node format {inbound!r}")
            src, node_index, tensor_index = inbound[0], inbound[1], inbound[2]
            kwargs = inbound[3] if len(inbound) == 4 else {}
            if node_index != 0 or tensor_index != 0:
                raise _fail(layer, "multi-node / multi-output inbound connections are not supported")
            if kwargs:
                raise _fail(layer, f"call arguments {kwargs!r} are not supported")
            inputs.append(src)
        layers.append(_Layer(layer.class_name, layer.name, layer.config, tuple(inputs)))

    ins, outs = config["input_layers"], config["output_layers"]
    if len(ins) != 1 or len(outs) != 1:
        raise ValueError("exactly one model input and one model output are supported")
    if ins[0][1:] != [0, 0] or outs[0][1:] != [0, 0]:
        raise ValueError("model input/output must be node 0, tensor 0 of their layers")
    return _toposort(layers), ins[0][0], outs[0][0]


def _toposort(layers: list[_Layer]) -> list[_Layer]:
    # Keras usually lists layers topologically already; sorting makes that an
    # explicit guarantee rather than an assumption. Stable on the original order.
    by_name = {layer.name: layer for layer in layers}
    for layer in layers:
        for src in layer.inputs:
            if src not in by_name:
                raise _fail(layer, f"input layer {src!r} does not exist")
    done: set[str] = set()
    ordered: list[_Layer] = []
    pending = list(layers)
    while pending:
        ready = [layer for layer in pending if all(src in done for src in layer.inputs)]
        if not ready:
            raise ValueError("model graph has a cycle")
        for layer in ready:
            done.add(layer.name)
            ordered.append(layer)
        pending = [layer for layer in pending if layer.name not in done]
    return ordered


class _WeightReader:
    """Per-layer weights from ``model_weights/<layer>`` keyed by short name ('kernel', 'bias', ...)."""

    def __init__(self, h5: h5py.File) -> None:
        self._root = h5.get("model_weights", h5)  # Keras 2 full-model files nest weights here

    def get(self, layer: _Layer) -> dict[str, np.ndarray]:
        if layer.name not in self._root:
            return {}
        group = self._root[layer.name]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
        weights: dict[str, np.ndarray] = {}
        for full in names:
            # e.g. "conv2d_1/conv2d_1_1/kernel:0" -> "kernel"
            short = full.rsplit("/", 1)[-1].split(":", 1)[0]
            if short in weights:
                raise _fail(layer, f"duplicate weight {short!r}")
            weights[short] = np.asarray(group[full], dtype=np.float32)
        return weights


class _GraphBuilder:
    def __init__(self, reader: _WeightReader) -> None:
        self.reader = reader
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def activation(self, layer: _Layer, tensor: _Tensor, activation: str, suffix: str = "") -> _Tensor:
        if activation not in _ACTIVATIONS:
            raise _fail(layer, f"activation {activation!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
        if activation == "linear":
            return tensor
        out = f"{layer.name}{suffix}"
        if activation == "relu":
            return _Tensor(self.node("Relu", [tensor.name], out, out), tensor.shape)
        # Keras softmax runs over the last (channel) axis, which is axis 1 in NCHW and in [N, C].
        return _Tensor(self.node("Softmax", [tensor.name], out, out, axis=1), tensor.shape)


def _bn_scale_shift(layer: _Layer, weights: dict[str, np.ndarray], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Inference-time BN as y = x * scale + shift (float64 for an exact-as-possible fold)."""
    cfg = layer.config
    axis = cfg.get("axis", -1)
    if isinstance(axis, list):
        axis = axis[0] if len(axis) == 1 else axis
    if axis not in (-1, 3):
        raise _fail(layer, f"axis={cfg.get('axis')!r} is not supported (only the channel axis)")
    for flag in ("renorm", "virtual_batch_size", "adjustment", "synchronized"):
        if cfg.get(flag):
            raise _fail(layer, f"{flag}={cfg[flag]!r} is not supported")
    eps = float(cfg.get("epsilon", 1e-3))
    try:
        gamma = weights["gamma"] if cfg.get("scale", True) else np.ones(channels, np.float32)
        beta = weights["beta"] if cfg.get("center", True) else np.zeros(channels, np.float32)
        mean, var = weights["moving_mean"], weights["moving_variance"]
    except KeyError as exc:
        raise _fail(layer, f"missing weight {exc}") from None
    for arr in (gamma, beta, mean, var):
        if arr.shape != (channels,):
            raise _fail(layer, f"weight shape {arr.shape} does not match {channels} channels")
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    shift = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return scale, shift


def _build_graph(
    layers: list[_Layer], input_layer: str, output_layer: str, reader: _WeightReader
) -> tuple[_GraphBuilder, _Tensor, _Tensor]:
    by_name = {layer.name: layer for layer in layers}
    consumers: dict[str, list[str]] = {layer.name: [] for layer in layers}
    for layer in layers:
        for src in layer.inputs:
            consumers[src].append(layer.name)

    def fold_target(conv: _Layer) -> _Layer | None:
        # Folding BN into the conv is exact algebra only when the conv output
        # feeds nothing but that BN and no nonlinearity sits in between.
        outs = consumers[conv.name]
        if conv.name == output_layer or len(outs) != 1:
            return None
        bn = by_name[outs[0]]
        if bn.class_name != "BatchNormalization" or conv.config.get("activation", "linear") != "linear":
            return None
        return bn

    builder = _GraphBuilder(reader)
    tensors: dict[str, _Tensor] = {}
    folded: set[str] = set()
    graph_input: _Tensor | None = None

    for layer in layers:
        cfg = layer.config
        kind = layer.class_name
        ins = [tensors[src] for src in layer.inputs]

        if kind == "InputLayer":
            shape = cfg.get("batch_input_shape") or cfg.get("batch_shape")
            if layer.name != input_layer or not shape or len(shape) != 4 or None in shape[1:]:
                raise _fail(layer, f"need a single static NHWC image input, got shape {shape!r}")
            if cfg.get("dtype", "float32") != "float32":
                raise _fail(layer, f"dtype={cfg.get('dtype')!r} is not supported")
            _, height, width, channels = shape
            graph_input = _Tensor(INPUT_NAME, (-1, int(channels), int(height), int(width)))
            tensors[layer.name] = graph_input
            continue

        if len(ins) != 1 and kind != "Add":
            raise _fail(layer, f"expected exactly one input, got {len(ins)}")

        if kind in _CONV_LAYERS:
            bn = fold_target(layer)
            tensors[layer.name] = _convert_conv(builder, layer, ins[0], bn)
            if bn is not None:
                folded.add(bn.name)
        elif kind == "BatchNormalization":
            if layer.name in folded:
                # Already folded into the producing conv: BN output is the conv output.
                tensors[layer.name] = ins[0]
            else:
                tensors[layer.name] = _convert_batchnorm(builder, layer, ins[0])
        elif kind == "Activation":
            tensors[layer.name] = builder.activation(layer, ins[0], cfg.get("activation", "linear"))
        elif kind == "Add":
            tensors[layer.name] = _convert_add(builder, layer, ins)
        elif kind == "MaxPooling2D":
            tensors[layer.name] = _convert_maxpool(builder, layer, ins[0])
        elif kind == "GlobalAveragePooling2D":
            tensors[layer.name] = _convert_global_avg_pool(builder, layer, ins[0])
        else:  # pragma: no cover - guarded by SUPPORTED_LAYERS in _parse_layers
            raise _fail(layer, "unsupported layer type")

    if graph_input is None:
        raise ValueError("model has no InputLayer")
    return builder, graph_input, tensors[output_layer]


def _convert_conv(builder: _GraphBuilder, layer: _Layer, x: _Tensor, bn: _Layer | None) -> _Tensor:
    cfg = layer.config
    _check_channels_last(layer)
    if len(x.shape) != 4:
        raise _fail(layer, f"expected a 4-D input, got shape {x.shape}")
    if cfg.get("groups", 1) != 1:
        raise _fail(layer, f"groups={cfg['groups']!r} is not supported")
    kernel_size = _pair(cfg["kernel_size"], layer, "kernel_size")
    strides = _pair(cfg.get("strides", 1), layer, "strides")
    dilation = _pair(cfg.get("dilation_rate", 1), layer, "dilation_rate")
    pads, (out_h, out_w) = _spatial(layer, x.shape, kernel_size, strides, dilation, cfg.get("padding", "valid"))
    weights = builder.reader.get(layer)
    in_ch = x.shape[1]
    filters = int(cfg["filters"])
    use_bias = bool(cfg.get("use_bias", True))
    expected = {"kernel", "bias"} if layer.class_name == "Conv2D" else {"depthwise_kernel", "pointwise_kernel", "bias"}
    if not use_bias:
        expected.discard("bias")
    if set(weights) != expected:
        raise _fail(layer, f"expected weights {sorted(expected)}, found {sorted(weights)}")

    window = {"kernel_shape": list(kernel_size), "strides": list(strides), "dilations": list(dilation), "pads": pads}
    source = x.name
    if layer.class_name == "Conv2D":
        # Keras (kh, kw, in, out) -> ONNX (out, in, kh, kw).
        kernel = weights["kernel"]
        if kernel.shape != (*kernel_size, in_ch, filters):
            raise _fail(layer, f"kernel shape {kernel.shape} does not match config")
        w = kernel.transpose(3, 2, 0, 1).astype(np.float64)
        conv_attrs = window
    else:
        multiplier = int(cfg.get("depth_multiplier", 1))
        depthwise = weights["depthwise_kernel"]
        pointwise = weights["pointwise_kernel"]
        if depthwise.shape != (*kernel_size, in_ch, multiplier) or pointwise.shape != (
            1,
            1,
            in_ch * multiplier,
            filters,
        ):
            raise _fail(layer, f"kernel shapes {depthwise.shape}/{pointwise.shape} do not match config")
        # Depthwise = grouped conv with group=in_ch; TF orders its outputs as c * multiplier + m,
        # which is exactly a row-major reshape of (in, mult) -> (in * mult).
        dw = depthwise.reshape(*kernel_size, in_ch * multiplier).transpose(2, 0, 1)[:, None, :, :]
        source = builder.node(
            "Conv",
            [x.name, builder.const(f"{layer.name}/depthwise_kernel", dw)],
            f"{layer.name}/depthwise",
            f"{layer.name}/depthwise",
            group=in_ch,
            **window,
        )
        # Padding and strides belong to the depthwise step; pointwise is a plain 1x1 conv.
        w = pointwise.transpose(3, 2, 0, 1).astype(np.float64)
        conv_attrs = {"kernel_shape": [1, 1]}

    bias = weights["bias"].astype(np.float64) if use_bias else None
    if bias is not None and bias.shape != (filters,):
        raise _fail(layer, f"bias shape {bias.shape} does not match {filters} filters")
    out_name = layer.name
    if bn is not None:
        scale, shift = _bn_scale_shift(bn, builder.reader.get(bn), filters)
        w = w * scale[:, None, None, None]
        bias = shift if bias is None else bias * scale + shift
        out_name = bn.name

    inputs = [source, builder.const(f"{out_name}/kernel", w)]
    if bias is not None:
        inputs.append(builder.const(f"{out_name}/bias", bias))
    out = _Tensor(builder.node("Conv", inputs, out_name, out_name, **conv_attrs), (-1, filters, out_h, out_w))
    return builder.activation(layer, out, cfg.get("activation", "linear"), suffix="/activation")


def _convert_batchnorm(builder: _GraphBuilder, layer: _Layer, x: _Tensor) -> _Tensor:
    channels = x.shape[1]
    scale, shift = _bn_scale_shift(layer, builder.reader.get(layer), channels)
    # Standalone BN as Mul + Add with precomputed scale/shift (same math as the fold).
    bshape = (channels, 1, 1) if len(x.shape) == 4 else (channels,)
    scaled = builder.node(
        "Mul",
        [x.name, builder.const(f"{layer.name}/scale", scale.reshape(bshape))],
        f"{layer.name}/scaled",
        f"{layer.name}/mul",
    )
    out = builder.node(
        "Add", [scaled, builder.const(f"{layer.name}/shift", shift.reshape(bshape))], layer.name, layer.name
    )
    return _Tensor(out, x.shape)


def _convert_add(builder: _GraphBuilder, layer: _Layer, ins: list[_Tensor]) -> _Tensor:
    if len(ins) < 2:
        raise _fail(layer, "Add needs at least two inputs")
    if any(t.shape != ins[0].shape for t in ins):
        raise _fail(layer, f"input shapes differ: {[t.shape for t in ins]}")
    acc = ins[0].name
    for i, t in enumerate(ins[1:], start=1):
        name = layer.name if i == len(ins) - 1 else f"{layer.name}/partial_{i}"
        acc = builder.node("Add", [acc, t.name], name, name)
    return _Tensor(acc, ins[0].shape)


def _convert_maxpool(builder: _GraphBuilder, layer: _Layer, x: _Tensor) -> _Tensor:
    cfg = layer.config
    _check_channels_last(layer)
    if len(x.shape) != 4:
        raise _fail(layer, f"expected a 4-D input, got shape {x.shape}")
    pool = _pair(cfg.get("pool_size", 2), layer, "pool_size")
    strides = _pair(cfg.get("strides") or pool, layer, "strides")  # Keras: strides=None means pool_size
    # ONNX MaxPool ignores padded cells (acts as -inf), matching TF 'same' pooling.
    pads, (out_h, out_w) = _spatial(layer, x.shape, pool, strides, (1, 1), cfg.get("padding", "valid"))
    out = builder.node(
        "MaxPool", [x.name], layer.name, layer.name, kernel_shape=list(pool), strides=list(strides), pads=pads
    )
    return _Tensor(out, (-1, x.shape[1], out_h, out_w))


def _convert_global_avg_pool(builder: _GraphBuilder, layer: _Layer, x: _Tensor) -> _Tensor:
    _check_channels_last(layer)
    if layer.config.get("keepdims"):
        raise _fail(layer, "keepdims=True is not supported")
    if len(x.shape) != 4:
        raise _fail(layer, f"expected a 4-D input, got shape {x.shape}")
    pooled = builder.node("GlobalAveragePool", [x.name], f"{layer.name}/pooled", f"{layer.name}/pool")
    out = builder.node("Flatten", [pooled], layer.name, layer.name, axis=1)
    return _Tensor(out, (-1, x.shape[1]))


def _rename_output(builder: _GraphBuilder, old: str, new: str) -> None:
    # Give the model output its stable public name without an extra Identity node.
    for node in builder.nodes:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def convert_keras_h5_to_onnx(h5_path: Path, onnx_path: Path, *, opset: int = 17) -> None:
    """Convert a Keras 2 functional-model HDF5 file to an ONNX file.

    The ONNX model takes ``input`` [batch, C, H, W] float32 (NCHW) and returns
    ``probabilities`` [batch, classes] float32. Output bytes depend only on the
    input file contents and ``opset``.

    Raises:
        ValueError: the model uses a layer type or option this converter does not handle.
    """
    h5_path, onnx_path = Path(h5_path), Path(onnx_path)
    if opset < 13:
        raise ValueError(f"opset {opset} is too old; need >= 13 (Softmax axis semantics)")
    source_bytes = h5_path.read_bytes()
    sha256 = hashlib.sha256(source_bytes).hexdigest()

    with h5py.File(h5_path, "r") as h5:
        raw_config = h5.attrs.get("model_config")
        if raw_config is None:
            raise ValueError(f"{h5_path} has no 'model_config' attribute (weights-only file?)")
        if isinstance(raw_config, bytes):
            raw_config = raw_config.decode("utf-8")
        model_config = json.loads(raw_config)
        keras_version = h5.attrs.get("keras_version", b"unknown")
        keras_version = keras_version.decode() if isinstance(keras_version, bytes) else str(keras_version)

        layers, input_layer, output_layer = _parse_layers(model_config)
        builder, graph_input, graph_output = _build_graph(layers, input_layer, output_layer, _WeightReader(h5))

    if len(graph_output.shape) != 2:
        raise ValueError(f"model output must be [batch, classes], got rank {len(graph_output.shape)}")
    if graph_output.name == INPUT_NAME:
        raise ValueError("model output is its input; nothing to convert")
    _rename_output(builder, graph_output.name, OUTPUT_NAME)

    channels, height, width = graph_input.shape[1:]
    graph = helper.make_graph(
        builder.nodes,
        str(model_config["config"].get("name", "model")),
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", channels, height, width])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", graph_output.shape[1]])],
        initializer=builder.initializers,
    )
    opset_id = helper.make_opsetid("", opset)
    model = helper.make_model(
        graph,
        opset_imports=[opset_id],
        producer_name=CONVERTER,
        doc_string=f"Converted by {CONVERTER} from a Keras {keras_version} HDF5 model, sha256 {sha256}.",
        # Pin the IR version to the opset (not the installed onnx) so bytes are reproducible
        # and older onnxruntime builds can still load the file.
        ir_version=helper.find_min_ir_version_for([opset_id]),
    )
    helper.set_model_props(
        model,
        {
            "source_sha256": sha256,
            "source_format": f"keras-{keras_version}-hdf5",
            "converter": f"converted by {CONVERTER}",
            "input_layout": "NCHW",
        },
    )
    onnx.checker.check_model(model, full_check=True)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx_path.write_bytes(model.SerializeToString(deterministic=True))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m emili_fer.convert",
        description="Convert a Keras 2 HDF5 mini-Xception emotion model to ONNX (no TensorFlow needed).",
    )
    parser.add_argument("h5", type=Path, help="input Keras .hdf5/.h5 model file")
    parser.add_argument("onnx", type=Path, help="output .onnx file")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default: 17, min 13)")
    args = parser.parse_args(argv)
    try:
        convert_keras_h5_to_onnx(args.h5, args.onnx, opset=args.opset)
    except (OSError, ValueError) as exc:  # bad path or unsupported model: message, no traceback
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {args.onnx}")


if __name__ == "__main__":
    main()
