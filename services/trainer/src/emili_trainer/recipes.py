"""Training recipes: YAML files parsed into config dataclasses, validated before any work starts.

A recipe fixes everything that decides a run's result: the base model, the LoRA adapter, the optimiser and
schedule, epochs, batch, lengths, the seed, and for DPO its beta. The recipes shipped with the trainer are in
``emili_trainer/recipes/``; a recipe is named by its file stem (``smollm2-cpu-sft``) or given as a path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from emili_core.errors import InvalidInput, NotFound

_STRICT = ConfigDict(extra="forbid")

RecipeKind = Literal["sft", "dpo"]


@dataclass(frozen=True, config=_STRICT)
class ModelConfig:
    # A path relative to the artifacts folder (or absolute): an HF model folder or a .gguf file.
    path: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False  # QLoRA: needs bitsandbytes and a CUDA device.


@dataclass(frozen=True, config=_STRICT)
class LoraSettings:
    r: Annotated[int, Field(ge=1)] = 16
    alpha: Annotated[int, Field(ge=1)] = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, config=_STRICT)
class OptimConfig:
    name: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "sgd"] = "adamw_torch"
    lr: Annotated[float, Field(gt=0.0)] = 2e-4
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0.0)] = 1.0


@dataclass(frozen=True, config=_STRICT)
class TrainConfig:
    epochs: Annotated[int, Field(ge=1)] = 1
    batch_size: Annotated[int, Field(ge=1)] = 4
    grad_accum: Annotated[int, Field(ge=1)] = 1
    max_length: Annotated[int, Field(ge=16)] = 512
    seed: int = 0
    save_steps: Annotated[int, Field(ge=1)] = 20  # Checkpoint (to object storage) every this many optimiser steps.
    logging_steps: Annotated[int, Field(ge=1)] = 1
    max_steps: Annotated[int, Field(ge=-1)] = -1  # -1: run the epochs.


@dataclass(frozen=True, config=_STRICT)
class DpoConfig:
    beta: Annotated[float, Field(gt=0.0)] = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    max_prompt_length: Annotated[int, Field(ge=8)] = 384


@dataclass(frozen=True, config=_STRICT)
class Recipe:
    name: Annotated[str, StringConstraints(min_length=1, pattern=r"^[a-z0-9][a-z0-9._-]*$")]
    kind: RecipeKind
    model: ModelConfig
    description: str = ""
    lora: LoraSettings = LoraSettings()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    dpo: DpoConfig | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _dpo_needs_dpo_settings(self) -> Recipe:
        if self.kind == "dpo" and self.dpo is None:
            raise ValueError("a dpo recipe needs a 'dpo' section (beta, loss_type, max_prompt_length)")
        if self.kind == "sft" and self.dpo is not None:
            raise ValueError("an sft recipe must not have a 'dpo' section")
        if self.dpo is not None and self.dpo.max_prompt_length >= self.train.max_length:
            raise ValueError("dpo.max_prompt_length must be shorter than train.max_length")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def digest(self) -> str:
        """sha256 of the recipe's canonical JSON: two recipes with equal content are the same recipe."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def shipped_recipes() -> dict[str, Path]:
    folder = resources.files("emili_trainer") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInput(f"{source} must be a YAML mapping")
    try:
        return Recipe(**data)
    except (ValidationError, TypeError) as exc:
        raise InvalidInput(f"{source} is not a valid recipe: {exc}") from exc


def shipped_recipe_text(name: str) -> str:
    """The YAML text of a recipe shipped with the trainer (names only: a caller never reads the server's files)."""
    shipped = shipped_recipes()
    if name not in shipped:
        raise NotFound(f"no shipped recipe {name!r}; shipped: {', '.join(sorted(shipped))}")
    return shipped[name].read_text(encoding="utf-8")


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a YAML file by path."""
    shipped = shipped_recipes()
    if name_or_path in shipped:
        path = shipped[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise NotFound(f"no recipe {name_or_path!r}: not a file, nor one of {sorted(shipped)}")
    return parse_recipe(path.read_text(encoding="utf-8"), str(path))
