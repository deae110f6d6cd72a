"""What a loop simulation study's candidates learned, by the simulator's own yardstick (SYNTHETIC: simulated users).

    make bench-hidden-quality PIPELINE=pl-...          # base, the pipeline's SFT and DPO models
    python services/trainer/bench/bench_hidden_quality.py --pipeline pl-... --version dpo-... --samples 4

The simulated users react to a hidden reply quality (:func:`emili_pipeline.simulator.reply_quality`: empathy,
reflection, a question, minus dismissal, advice and length). A study iteration shows a candidate's effect only
through 48 simulated users' noisy faces and surveys, about an hour on this CPU; this asks the question directly. For
each prompted turn of the pipeline's held-out sessions (contexts no model trained on) every model samples
``--samples`` replies as the chat service does (temperature 1.0, 160 new tokens), draw i of every model from the
same seed, and each reply is scored against the user message it answers. Prints JSON: per model, mean quality,
words and components; per candidate, the paired difference from base with a 95% interval over contexts.

Reads the pipeline state and models from the local stack's S3 server (`make up`); loads the models in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from emili_core.keys import pipeline_state_key
from emili_core.objectstore import Bucket
from emili_pipeline.simulator.state import reply_quality
from emili_pipeline.study_signal import last_user_message, paired_quality
from emili_session.registry import download_adapter
from emili_trainer import jobs
from emili_trainer.evaluation.job import generate_replies, session_rows
from emili_trainer.recipes import load_recipe
from emili_trainer.settings import TrainerSettings
from emili_trainer.training import load_base_model

BASE = "base"
TEMPERATURE = 1.0  # The chat service's default (EMILI used 1.0).
MAX_NEW_TOKENS = 160  # The chat service's reply limit.


def sample_replies(
    model: Any, tokenizer: Any, contexts: list[list[dict[str, str]]], samples: int, seed: int
) -> list[list[str]]:
    """``samples`` replies per context; context i's draws always start from seed + i, whatever the model."""
    out: list[list[str]] = []
    for i, context in enumerate(contexts):
        drawn = generate_replies(
            model, tokenizer, [context] * samples, MAX_NEW_TOKENS, seed=seed + i, temperature=TEMPERATURE
        )
        print(f"  context {i + 1}/{len(contexts)}: {samples} replies", file=sys.stderr, flush=True)
        out.append(drawn)
    return out


def score(contexts: list[list[dict[str, str]]], replies: list[list[str]]) -> dict[str, Any]:
    per_context: dict[str, list[float]] = {}
    components: dict[str, list[float]] = {}
    words: list[int] = []
    for i, (context, drawn) in enumerate(zip(contexts, replies, strict=True)):
        user = last_user_message(context)
        for reply in drawn:
            quality = reply_quality(reply, user)
            per_context.setdefault(str(i), []).append(quality.score)
            words.append(len(reply.split()))
            for name, value in quality.components.items():
                components.setdefault(name, []).append(value)
    values = [v for vs in per_context.values() for v in vs]
    return {
        "per_context": per_context,
        "quality": round(float(np.mean(values)), 4),
        "words": round(float(np.mean(words)), 1),
        "components": {name: round(float(np.mean(v)), 3) for name, v in components.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="A pipeline id (its held-out sessions give the contexts).")
    parser.add_argument("--version", action="append", default=[], help="Model versions (default: the pipeline's).")
    parser.add_argument("--samples", type=int, default=4, help="Replies per context and model.")
    parser.add_argument("--contexts", type=int, default=24, help="At most this many held-out contexts.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    settings = TrainerSettings()
    runtime = jobs.build_runtime(settings)
    key = pipeline_state_key(args.pipeline)
    if not runtime.store.exists(Bucket.MODELS, key):
        sys.exit(f"no pipeline {args.pipeline} on this stack (no {key}); a study's study.json names its pipeline ids")
    state = runtime.store.get_json(Bucket.MODELS, key)
    steps = state.get("steps", {})
    trained = (((steps.get(k) or {}).get("outputs") or {}).get("model_version") for k in ("sft", "dpo"))
    versions = args.version or [v for v in trained if v]
    rows = session_rows(runtime, state["heldout_sessions"], args.contexts)
    if not rows:
        sys.exit(f"pipeline {args.pipeline} has no held-out contexts")
    contexts = [[{"role": m["role"], "content": m["content"]} for m in r.context] for r in rows]
    if settings.trainer.torch_threads:
        torch.set_num_threads(settings.trainer.torch_threads)
    recipe = load_recipe("smollm2-cpu-dpo")  # Only for its base model: the one the study's adapters were trained on.
    tokenizer, model = load_base_model(recipe, settings.artifacts_dir, settings.trainer.model_cache_dir)
    model.config.use_cache = True
    model.eval()

    results: dict[str, Any] = {}
    started = time.perf_counter()
    print(f"{BASE}: {len(contexts)} contexts, {args.samples} replies each", file=sys.stderr, flush=True)
    results[BASE] = score(contexts, sample_replies(model, tokenizer, contexts, args.samples, args.seed))
    with tempfile.TemporaryDirectory(prefix="emili-hidden-quality-") as tmp:
        for version in versions:
            print(f"{version}:", file=sys.stderr, flush=True)
            adapted = PeftModel.from_pretrained(model, download_adapter(runtime.store, version, Path(tmp) / version))
            adapted.eval()
            results[version] = score(contexts, sample_replies(adapted, tokenizer, contexts, args.samples, args.seed))
            results[version]["minus_base"] = paired_quality(
                results[version]["per_context"], results[BASE]["per_context"]
            )
            model = adapted.unload()
    for result in results.values():
        result.pop("per_context")
    print(
        json.dumps(
            {
                "data": "SYNTHETIC: the simulator's hidden reply quality, not a measure of people",
                "pipeline": args.pipeline,
                "contexts": len(contexts),
                "samples": args.samples,
                "models": results,
                "wall_seconds": round(time.perf_counter() - started, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
