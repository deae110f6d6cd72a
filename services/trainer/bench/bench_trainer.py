"""Trainer benchmark: LoRA SFT and DPO wall time and tokens/s with the shipped recipes.

    make bench-trainer                 # CPU: SmolLM2-135M, 200 SFT examples and 200 DPO pairs
    python services/trainer/bench/bench_trainer.py --gpu   # GPU: a ~1B Llama (random init) vs TRL's defaults

The CPU run uses the shipped CPU recipes unchanged (one epoch), in this process, without the queue: it measures
training, not scheduling. Examples come from EmpatheticDialogues (../shared/data, valid split) when present,
else from built-in conversations. Prints JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from emili_core.settings import REPO_ROOT, load_settings
from emili_trainer.recipes import Recipe, load_recipe
from emili_trainer.settings import TrainerSettings
from emili_trainer.training import load_base_model, train_dpo, train_sft

ED = REPO_ROOT.parent / "shared" / "data" / "empatheticdialogues" / "valid.csv"
SYSTEM = "You are EMILI, a warm and emotionally intelligent listener."
BUILT_IN = [
    (
        "I finally passed my driving test after three tries!",
        "Congratulations! That persistence paid off. How do you feel?",
    ),
    ("My cat has been sick all week and I'm worried.", "I'm sorry, that sounds stressful. What did the vet say?"),
    ("Work was exhausting, my boss yelled at everyone.", "That sounds draining. Did anything help you unwind?"),
    ("We're moving to a new city next month.", "That's a big change! Are you more excited or nervous?"),
    ("My best friend forgot my birthday again.", "Ouch, that hurts. Have you told them how it made you feel?"),
]


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """n short conversations (user, assistant, user, assistant)."""
    if ED.is_file():
        from emili_affect.empathetic import load_dialogues

        dialogues, _ = load_dialogues(ED, split="valid")
        chosen = sorted(dialogues, key=lambda d: d.conv_id)[:n]
        return [[*d.context_messages(), {"role": "assistant", "content": d.target}] for d in chosen]
    rng = random.Random(seed)
    result = []
    for _ in range(n):
        (u1, a1), (u2, a2) = rng.sample(BUILT_IN, 2)
        result.append(
            [
                {"role": "user", "content": u1},
                {"role": "assistant", "content": a1},
                {"role": "user", "content": u2},
                {"role": "assistant", "content": a2},
            ]
        )
    return result


def sft_records(convs: list[list[dict[str, str]]]) -> list[dict[str, Any]]:
    records = []
    for i, conv in enumerate(convs):
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
        messages += [{**m, "weight": 1} if m["role"] == "assistant" else dict(m) for m in conv]
        records.append({"id": f"bench-{i}", "messages": messages})
    return records


def dpo_records(convs: list[list[dict[str, str]]]) -> list[dict[str, Any]]:
    """Chosen: the real last reply; rejected: another conversation's last reply (EmPO's idea, no emotion table)."""
    records = []
    for i, conv in enumerate(convs):
        other = convs[(i + len(convs) // 2) % len(convs)]
        records.append(
            {"id": f"pair-{i}", "prompt": conv[:-1], "chosen": conv[-1]["content"], "rejected": other[-1]["content"]}
        )
    return records


def _summary(result: Any, recipe: Recipe) -> dict[str, Any]:
    return {
        "recipe": recipe.name,
        "examples": result.examples,
        "steps": result.steps,
        "wall_s": round(result.wall_seconds, 1),
        "tokens": result.tokens_seen,
        "tokens_per_s": round(result.tokens_per_second, 1),
        "train_loss": round(result.train_loss, 4) if result.train_loss is not None else None,
        **({"details": result.details} if result.details else {}),
    }


def bench_cpu(examples: int, threads: int | None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    settings = load_settings(TrainerSettings)
    convs = conversations(examples)
    out: dict[str, Any] = {
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "data": "EmpatheticDialogues valid" if ED.is_file() else "built-in",
    }
    with tempfile.TemporaryDirectory() as tmp:
        sft = load_recipe("smollm2-cpu-sft")
        start = time.perf_counter()
        tokenizer, model = load_base_model(sft, settings.artifacts_dir)
        out["load_s"] = round(time.perf_counter() - start, 1)
        result = train_sft(sft, tokenizer, model, sft_records(convs), Path(tmp) / "sft")
        out["sft"] = _summary(result, sft)
        dpo = load_recipe("smollm2-cpu-dpo")
        tokenizer, model = load_base_model(dpo, settings.artifacts_dir)
        result = train_dpo(
            dpo, tokenizer, model, dpo_records(convs), Path(tmp) / "dpo", init_adapter=result.adapter_dir
        )
        out["dpo"] = _summary(result, dpo)
    return out


def bench_gpu(steps: int) -> dict[str, Any]:
    """LoRA SFT of a ~1B Llama (random init) with this project's GPU settings vs TRL's defaults."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    settings = load_settings(TrainerSettings)
    tokenizer = AutoTokenizer.from_pretrained(
        settings.artifacts_dir / "chat", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    convs = conversations(max(64, steps * 8))
    base = load_recipe("empo-7b-sft")
    results: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "params": None}
    variants = {
        "emili": dataclasses.replace(base, lora=dataclasses.replace(base.lora, r=64, alpha=16)),
        "trl_defaults": dataclasses.replace(
            base,
            model=dataclasses.replace(
                base.model, dtype="float32", attn_implementation="eager", gradient_checkpointing=False
            ),
            lora=dataclasses.replace(base.lora, r=64, alpha=16),
            optim=dataclasses.replace(base.optim, name="adamw_torch"),
        ),
    }
    for name, recipe in variants.items():
        recipe = dataclasses.replace(
            recipe, train=dataclasses.replace(recipe.train, max_steps=steps, batch_size=8, grad_accum=1)
        )
        torch.cuda.reset_peak_memory_stats()
        model = LlamaForCausalLM(config).to(dtype=getattr(torch, recipe.model.dtype))
        model.set_attn_implementation(recipe.model.attn_implementation)
        results["params"] = sum(p.numel() for p in model.parameters())
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        with tempfile.TemporaryDirectory() as tmp:
            result = train_sft(recipe, tokenizer, model, sft_records(convs), Path(tmp))
        results[name] = {
            **_summary(result, recipe),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "dtype": recipe.model.dtype,
            "attn": recipe.model.attn_implementation,
            "gradient_checkpointing": recipe.model.gradient_checkpointing,
        }
        del model
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark instead of the CPU one")
    parser.add_argument("--gpu-steps", type=int, default=30)
    args = parser.parse_args()
    result = bench_gpu(args.gpu_steps) if args.gpu else bench_cpu(args.examples, args.threads)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
