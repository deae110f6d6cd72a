"""Reading a causal LM's weights from this machine: a Hugging Face folder, or a GGUF file dequantised on load.

Shared by the chat service (which serves the model) and the trainer (which fine-tunes the same base), so both
see the same weights and the slow dequantisation is done once and cached. Nothing is fetched from the Hub.
Imports torch and transformers: only services that run models import this module.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

LoadSource = Literal["folder", "gguf", "cache"]

# Written into the cache folder: which GGUF file (and which version of it) the cached weights came from.
CACHE_MARKER = "emili-gguf-source.json"
# Quantisation suffix of GGUF file names ("SmolLM2-135M-Instruct.Q4_1", "-q4_k_m", "-F16"), left out of model ids.
_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|B?F\d+)$", re.IGNORECASE)


class ModelLoadError(ValueError):
    """The weights could not be read; the message names the path."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are: ``folder`` (an HF folder, or the folder holding ``gguf_file``)."""

    folder: Path
    gguf_file: str | None = None
    cache_dir: Path | None = None

    @classmethod
    def from_path(cls, path: Path, cache_dir: Path | None = None) -> ModelSource:
        """A path to a ``.gguf`` file names both the folder and the file; anything else is an HF folder."""
        path = Path(path)
        if path.suffix == ".gguf":
            return cls(path.parent, path.name, cache_dir)
        return cls(path, None, None)

    @property
    def base_id(self) -> str:
        """A readable id of the base model: the file or folder name without its quantisation suffix."""
        stem = Path(self.gguf_file).stem if self.gguf_file else self.folder.name
        return _QUANT_SUFFIX.sub("", stem)


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def load_causal_lm(
    source: ModelSource, dtype: torch.dtype = torch.float32
) -> tuple[LoadSource, PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and model, and where they were read from. Raises :class:`ModelLoadError`."""
    if source.gguf_file is None:
        return "folder", *load_folder(source.folder, dtype)
    gguf_path = source.folder / source.gguf_file
    if not gguf_path.is_file():
        raise ModelLoadError(f"no GGUF file at {gguf_path}")
    if source.cache_dir is not None and _cache_matches(source.cache_dir, gguf_path):
        return "cache", *load_folder(source.cache_dir, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file, local_files_only=True)
        # dequantize=True asks for plain float weights; transformers otherwise keeps a GGUF "quantizer"
        # attached that refuses save_pretrained, even for architectures it dequantises anyway.
        model = AutoModelForCausalLM.from_pretrained(
            source.folder,
            gguf_file=source.gguf_file,
            dtype=dtype,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {gguf_path}: {exc}") from exc
    if source.cache_dir is not None:
        _write_cache(source.cache_dir, gguf_path, tokenizer, model)
    return "gguf", tokenizer, model


def load_folder(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a model from {folder}: {exc}") from exc
    return tokenizer, model


def _source_stamp(gguf_path: Path) -> dict[str, object]:
    stat = gguf_path.stat()
    return {"gguf": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cache_matches(cache_dir: Path, gguf_path: Path) -> bool:
    try:
        return bool(json.loads((cache_dir / CACHE_MARKER).read_text()) == _source_stamp(gguf_path))
    except (OSError, ValueError):
        return False


def _write_cache(cache_dir: Path, gguf_path: Path, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Save next to the final place, then rename, so a crash never leaves a half-written cache to load."""
    staging = cache_dir.with_name(f"{cache_dir.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / CACHE_MARKER).write_text(json.dumps(_source_stamp(gguf_path)))
        shutil.rmtree(cache_dir, ignore_errors=True)
        staging.rename(cache_dir)
    except (OSError, ValueError) as exc:
        # The cache only saves time; without it the next start dequantises again.
        log.warning("could not cache the dequantised model in %s: %s", cache_dir, exc)
        shutil.rmtree(staging, ignore_errors=True)
    else:
        log.info("cached the dequantised model in %s", cache_dir)
