"""Fixtures of the trainer tests: a tiny random Llama with SmolLM2's real tokenizer (read from the GGUF file; no
Hub access), a sample weighted conversation, and recipes pointed at the tiny model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from emili_testing.plugin import tiny_llama
from emili_trainer.recipes import Recipe, load_recipe

ARTIFACTS = Path(__file__).resolve().parents[3] / "var" / "artifacts" / "chat"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_gguf = pytest.mark.skipif(not (ARTIFACTS / GGUF).is_file(), reason=f"{GGUF} is not in {ARTIFACTS} (make setup)")

CONVERSATION = [
    {"role": "system", "content": "You are EMILI, a warm listener."},
    {"role": "user", "content": "I had a rough day at work."},
    {"role": "assistant", "content": "I'm sorry, that sounds exhausting.", "weight": 1},
    {"role": "system", "content": "The user looks SAD (61)."},
    {"role": "user", "content": "My boss yelled at me."},
    {"role": "assistant", "content": "Whatever, it happens.", "weight": 0},
    {"role": "user", "content": "Thanks for listening."},
    {"role": "assistant", "content": "Anytime. Do you want to talk about it?", "weight": 1},
]


def tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    model: LlamaForCausalLM = tiny_llama(tokenizer, seed)
    return model


def tiny_recipe(name: str, model_dir: Path, **train: int) -> Recipe:
    """A shipped CPU recipe pointed at the tiny model, with small steps so tests run in seconds."""
    recipe = load_recipe(name)
    settings = {"batch_size": 2, "save_steps": 2, "max_length": 256, **train}
    return dataclasses.replace(
        recipe,
        model=dataclasses.replace(recipe.model, path=str(model_dir), attn_implementation="eager"),
        lora=dataclasses.replace(recipe.lora, r=4, alpha=8, dropout=0.0),
        optim=dataclasses.replace(recipe.optim, lr=5e-2, warmup_ratio=0.0),
        train=dataclasses.replace(recipe.train, **settings),
        dpo=dataclasses.replace(recipe.dpo, max_prompt_length=128) if recipe.dpo else None,
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    if not (ARTIFACTS / GGUF).is_file():
        pytest.skip(f"{GGUF} is not in {ARTIFACTS} (make setup)")
    return AutoTokenizer.from_pretrained(ARTIFACTS, gguf_file=GGUF, local_files_only=True)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase) -> Path:
    """The tiny model saved with the tokenizer as an HF folder: a base model a recipe can name."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def conversation() -> list[dict[str, Any]]:
    return [dict(m) for m in CONVERSATION]


@pytest.fixture
def make_model(tokenizer: PreTrainedTokenizerBase) -> Callable[..., LlamaForCausalLM]:
    return lambda seed=0: tiny_model(tokenizer, seed)


@pytest.fixture
def make_recipe(tiny_dir: Path) -> Callable[..., Recipe]:
    return lambda name, **train: tiny_recipe(name, tiny_dir, **train)
