"""Half-size weights for the local model on a CPU: a decoding step reads half the bytes, and computes as before.

A small model's decoding step on a CPU is bound by reading its weights from memory (SmolLM2-135M in float32:
540 MB a step). :class:`Float16PackedLinear` keeps each linear layer's weights as float16 in fbgemm's packed
layout and multiplies float32 activations by them with fbgemm's float16 GEMM (torch's ``linear_dynamic_fp16``,
the kernel behind torch's float16 dynamic quantisation): activations and sums stay float32, only the weights are
rounded. On the 2-core machine a 10-row step of SmolLM2-135M (300 tokens of context) went from 283 to 156 ms, and
the next token agreed with float32's in 99.5% of positions of sampled replies (mean KL 3e-6 nats): its weights were
4-bit in the GGUF file, so float16 keeps them almost exactly.

Tried and not used: int8 weights with bfloat16 activations (``_weight_int8pack_mm``) were slower (193 ms) and less
exact (96%); int8 weights and activations (fbgemm's dynamic int8) were wrong, 49% with ``down_proj`` quantised,
because SmolLM2's activations have outlier channels.

The layer stays an ``nn.Linear`` with its float32 weight (tied to the embeddings for the LM head), so PEFT wraps
it for LoRA adapters like any linear layer: the adapters' updates run in float32 on top of the packed base.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# How far the packed layer may be from float32, relative to the output's scale, before it is not used.
_SELF_CHECK_TOLERANCE = 1e-2


class Float16PackedLinear(nn.Linear):
    """``linear`` with its forward on float16 weights packed for fbgemm (float32 activations and sums).

    ``weight`` and ``bias`` are ``linear``'s own parameters, kept for everything that reads them (PEFT, tied
    embeddings, saving); the packed copy is not a parameter or buffer, so it appears in no state dict.
    """

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        bias = None if linear.bias is None else linear.bias.detach()
        object.__setattr__(self, "_packed", torch.ops.quantized.linear_prepack_fp16(linear.weight.detach(), bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.quantized.linear_dynamic_fp16(x, self._packed)
        return y


def pack_linear_layers(model: nn.Module) -> int:
    """Replaces every plain ``nn.Linear`` of ``model`` (float32, on the CPU) with :class:`Float16PackedLinear`,
    in place; returns how many. Leaves the model as it was, and returns 0, when the model is not float32 on the
    CPU, or when this torch build's kernel is missing or disagrees with float32 (checked on the first layer)."""
    linears = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    if not linears:
        return 0
    first = linears[0][2]
    if first.weight.device.type != "cpu" or first.weight.dtype != torch.float32:
        log.info("packed float16 weights are for float32 models on the CPU; keeping %s", first.weight.dtype)
        return 0
    problem = _self_check(first)
    if problem:
        log.warning("packed float16 weights not used, float32 kept: %s", problem)
        return 0
    for parent, name, child in linears:
        setattr(parent, name, Float16PackedLinear(child))
    return len(linears)


def _self_check(linear: nn.Linear) -> str:
    """Why the packed layer cannot stand in for ``linear`` here ("" when it can)."""
    x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            expected, got = linear(x), Float16PackedLinear(linear)(x)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        return f"torch's float16 GEMM (fbgemm) failed: {exc}"
    error = (got - expected).norm() / expected.norm().clamp(min=1e-12)
    if not error <= _SELF_CHECK_TOLERANCE:
        return f"relative error {float(error):.4f} against float32"
    return ""
