"""GPU paths: bf16, SDPA attention and gradient checkpointing on CUDA (skipped without an NVIDIA GPU)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from emili_trainer.recipes import Recipe
from emili_trainer.training import load_base_model, pick_device, train_dpo, train_sft

pytestmark = pytest.mark.gpu


def _gpu(recipe: Recipe) -> Recipe:
    return dataclasses.replace(
        recipe,
        device="cuda",
        model=dataclasses.replace(
            recipe.model, dtype="bfloat16", attn_implementation="sdpa", gradient_checkpointing=True
        ),
    )


def test_bf16_sdpa_checkpointed_sft_and_dpo_on_cuda(
    tokenizer: PreTrainedTokenizerBase,
    conversation: list[dict[str, Any]],
    make_recipe: Callable[..., Recipe],
    tmp_path: Path,
) -> None:
    sft = _gpu(make_recipe("smollm2-cpu-sft", max_steps=4))
    assert pick_device(sft) == "cuda"
    tokenizer, model = load_base_model(sft, tmp_path)
    assert model.dtype == torch.bfloat16
    result = train_sft(sft, tokenizer, model, [{"id": "a", "messages": conversation}] * 4, tmp_path / "sft")
    assert result.steps == 4 and result.train_loss is not None and torch.isfinite(torch.tensor(result.train_loss))
    pairs = [{"id": "p", "prompt": conversation[:2], "chosen": "I hear you.", "rejected": "Whatever."}] * 4
    dpo = _gpu(make_recipe("smollm2-cpu-dpo", max_steps=2))
    tokenizer, model = load_base_model(dpo, tmp_path)
    result = train_dpo(dpo, tokenizer, model, pairs, tmp_path / "dpo", init_adapter=tmp_path / "sft" / "adapter")
    assert result.steps == 2
