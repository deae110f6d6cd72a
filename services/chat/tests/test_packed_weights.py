"""Packed float16 weights for the local model: close to float32, invisible to state dicts, under LoRA adapters."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from emili_chat.llm.packed_weights import Float16PackedLinear, pack_linear_layers


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def test_a_packed_layer_computes_what_the_float_layer_does() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    packed = Float16PackedLinear(linear)
    x = torch.randn(2, 5, 96)
    with torch.inference_mode():
        error = _relative_error(packed(x), linear(x))
    assert error < 1e-3
    assert error > 0  # It really runs on rounded weights, not on the float ones.
    assert packed.weight is linear.weight and packed.bias is linear.bias
    assert set(packed.state_dict()) == {"weight", "bias"}


def test_every_linear_layer_is_replaced_and_the_logits_barely_move() -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(ids).logits
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert pack_linear_layers(model) == linears == 2 * 7 + 1
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # Still tied.
    with torch.inference_mode():
        after = model(ids).logits
    assert 0 < _relative_error(after, before) < 1e-3


def test_a_model_that_is_not_float32_is_left_as_it_was() -> None:
    model = _tiny_llama().to(torch.bfloat16)
    assert pack_linear_layers(model) == 0
    assert sum(type(m) is nn.Linear for m in model.modules()) == 15


def test_a_broken_kernel_keeps_the_float_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("no kernel for this CPU")

    monkeypatch.setattr(torch.ops.quantized, "linear_dynamic_fp16", broken)
    model = _tiny_llama()
    assert pack_linear_layers(model) == 0
    assert sum(type(m) is nn.Linear for m in model.modules()) == 15


def test_lora_adapters_wrap_packed_layers_and_mixed_batches_stay_apart() -> None:
    model = _tiny_llama()
    pack_linear_layers(model)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        base_logits = model(ids).logits
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Float16PackedLinear)
    with torch.inference_mode():
        mixed = peft_model(input_ids=ids, adapter_names=["default", "__base__"]).logits
    assert torch.allclose(mixed[1], base_logits[1], atol=1e-5)  # The base row is the packed base model's.
    assert not torch.allclose(mixed[0], base_logits[0], atol=1e-3)  # The adapter's row has its update.
