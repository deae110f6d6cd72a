"""LoRA SFT and DPO with TRL on labeler datasets: data preparation, the trainers, and their callbacks.

This module knows nothing about queues, locks or object storage: it trains a model on records in a local
working folder and reports through callbacks. :mod:`emili_trainer.jobs` wraps it into resumable runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import PrinterCallback
from trl.trainer.dpo_config import DPOConfig
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from emili_core.errors import FailedPrecondition, InvalidInput
from emili_llm.causal_lm import ModelSource, load_causal_lm, torch_dtype
from emili_trainer.masking import MaskingError, tokenise_turns
from emili_trainer.recipes import Recipe

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # Inside the working folder: the final LoRA adapter and tokenizer.


@dataclass
class Progress:
    """One progress report: what the task state, the run record and the metrics show."""

    step: int
    total_steps: int
    epoch: float
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    tokens_seen: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    train_loss: float | None
    examples: int
    tokens_seen: int
    wall_seconds: float
    tokens_per_second: float
    cancelled: bool = False
    details: dict[str, Any] = field(default_factory=dict)


# --- model -----------------------------------------------------------------------------------------------------


def pick_device(recipe: Recipe) -> str:
    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(f"recipe {recipe.name} needs a CUDA device and this worker has none")
    if recipe.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return recipe.device


def load_base_model(
    recipe: Recipe, artifacts_dir: Path, cache_root: Path | None = None
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The recipe's base model and tokenizer, read from the artifacts folder (nothing is downloaded).

    A GGUF base is dequantised once into ``<name>-dequantised`` in ``cache_root`` (default: beside the GGUF
    file, the folder the chat service uses for the same file, so only the first one pays for dequantising).
    """
    path = Path(recipe.model.path)
    path = path if path.is_absolute() else artifacts_dir / path
    if not path.exists():
        raise FailedPrecondition(f"base model {path} does not exist (recipe {recipe.name}); run `make setup`")
    dtype = torch_dtype(recipe.model.dtype)
    if recipe.model.load_in_4bit:
        tokenizer, model = _load_4bit(path, dtype)
    else:
        source = ModelSource.from_path(path)
        if source.gguf_file is not None:
            cache = (cache_root or source.folder) / f"{source.base_id}-dequantised"
            source = ModelSource(source.folder, source.gguf_file, cache)
        _, tokenizer, model = load_causal_lm(source, dtype)
    model.config.use_cache = False  # The KV cache only costs memory during training.
    if recipe.model.attn_implementation != "eager":
        model.set_attn_implementation(recipe.model.attn_implementation)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def _load_4bit(path: Path, dtype: torch.dtype) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    if not torch.cuda.is_available():
        raise FailedPrecondition("load_in_4bit needs a CUDA device")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise FailedPrecondition(f"load_in_4bit needs bitsandbytes: {exc}") from exc
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype, local_files_only=True)
    return tokenizer, model


def lora_config(recipe: Recipe) -> LoraConfig:
    return LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=list(recipe.lora.target_modules),
        task_type="CAUSAL_LM",
    )


# --- data ------------------------------------------------------------------------------------------------------


def sft_dataset(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Mapping[str, Any]], max_length: int
) -> tuple[Dataset, dict[str, int]]:
    """Pre-tokenised rows, one per weight-1 assistant reply (its labels masked to that reply, its context cut to
    ``max_length``; see :mod:`emili_trainer.masking`), and counts of what had to be left out."""
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    stats = dict.fromkeys(
        ("records", "replies", "examples", "loss_tokens", "context_trimmed", "prompt_cut", "reply_cut", "unfit"), 0
    )
    for record in records:
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidInput(f"SFT record {record.get('id')!r} has no messages")
        try:
            turns = tokenise_turns(tokenizer, messages, max_length)
        except MaskingError as exc:
            raise FailedPrecondition(f"cannot tokenise SFT record {record.get('id')!r}: {exc}") from exc
        stats["records"] += 1
        for counter in ("replies", "context_trimmed", "prompt_cut", "reply_cut", "unfit"):
            stats[counter] += getattr(turns, counter)
        for example in turns.examples:
            stats["examples"] += 1
            stats["loss_tokens"] += example.loss_tokens
            rows["input_ids"].append(example.input_ids)
            rows["labels"].append(example.labels)
    if stats["prompt_cut"] or stats["reply_cut"] or stats["unfit"]:
        log.warning(
            "max_length %d is shorter than the system prompt plus a reply: %d examples lost the start of their "
            "system prompt, %d replies were cut, %d replies had no token left to learn",
            max_length,
            stats["prompt_cut"],
            stats["reply_cut"],
            stats["unfit"],
        )
    if not rows["input_ids"]:
        raise FailedPrecondition("no SFT example has a weight-1 assistant reply within max_length")
    return Dataset.from_dict(rows), stats


def _prompt_tokens(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return len(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def _trim_prompt(tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """Drop the oldest turns (keeping a leading system prompt) until the prompt fits ``limit`` tokens."""
    head = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    tail = prompt[len(head) :]
    while len(tail) > 1 and _prompt_tokens(tokenizer, head + tail) > limit:
        tail = tail[1:]
    return head + tail


def dpo_dataset(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    epochs: int,
    max_prompt_length: int,
    max_length: int | None = None,
) -> tuple[Dataset, int, dict[str, int]]:
    """TRL's conversational preference rows, and how many passes to make over them.

    A pair whose prompt, even trimmed to its system prompt and last user turn, leaves no token of ``max_length``
    for the reply is left out (TRL would drop it silently, and with none left fail with an unrelated error); when
    no pair is left, FailedPrecondition says which limit to raise.

    EmPO's pairs carry the epoch of their rejected draw: the dataset holds one fresh draw per epoch, so the
    trainer makes ONE pass over the draws of epochs 0..E-1 (each dialogue is seen E times, each time with a
    different rejected reply). Feedback pairs have no draws: the trainer makes E passes over them.
    """
    draws = sorted({int(r["epoch"]) for r in records if "epoch" in r})
    if draws:
        if len(draws) < epochs:
            raise FailedPrecondition(
                f"the dataset holds rejected draws for {len(draws)} epoch(s) but the recipe trains {epochs}: "
                f"build it with epochs={epochs}"
            )
        records = [r for r in records if int(r["epoch"]) in draws[:epochs]]
    rows: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": []}
    too_long: list[int] = []
    for record in records:
        prompt = record.get("prompt")
        if not isinstance(prompt, list) or not prompt or prompt[-1].get("role") != "user":
            raise InvalidInput(f"DPO record {record.get('id')!r}: the prompt must be messages ending with a user turn")
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
        trimmed = _trim_prompt(tokenizer, messages, max_prompt_length)
        if max_length is not None and (tokens := _prompt_tokens(tokenizer, trimmed)) >= max_length:
            too_long.append(tokens)
            continue
        rows["prompt"].append(trimmed)
        rows["chosen"].append([{"role": "assistant", "content": str(record["chosen"])}])
        rows["rejected"].append([{"role": "assistant", "content": str(record["rejected"])}])
    if too_long and not rows["prompt"]:
        span = f"{min(too_long)}" if min(too_long) == max(too_long) else f"{min(too_long)}-{max(too_long)}"
        raise FailedPrecondition(
            f"none of the {len(too_long)} DPO pairs fits the recipe's train.max_length={max_length}: their prompts, "
            f"trimmed to the system prompt and last user turn, take {span} tokens and leave no room for the reply; "
            "raise train.max_length (and dpo.max_prompt_length below it)"
        )
    passes = 1 if draws else epochs
    stats = {"pairs": len(rows["prompt"]), "draws": len(draws[:epochs]) or 0, "too_long": len(too_long)}
    return Dataset.from_dict(rows), passes, stats


# --- callbacks -------------------------------------------------------------------------------------------------


class ProgressReporter(TrainerCallback):
    """Turns the trainer's logs into :class:`Progress` reports, with tokens per second since the last one."""

    def __init__(self, report: Callable[[Progress], None]) -> None:
        self.report = report
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._last = (time.perf_counter(), state.num_input_tokens_seen)
        self.report(Progress(state.global_step, state.max_steps, state.epoch or 0.0))

    def on_log(
        self, args: Any, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        logs = logs or {}
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        rate = None
        if self._last is not None and now > self._last[0] and tokens > self._last[1]:
            rate = (tokens - self._last[1]) / (now - self._last[0])
        self._last = (now, tokens)
        loss = logs.get("loss")
        self.report(
            Progress(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=float(state.epoch or 0.0),
                loss=float(loss) if isinstance(loss, int | float) and math.isfinite(loss) else None,
                learning_rate=logs.get("learning_rate"),
                tokens_per_second=rate,
                tokens_seen=int(tokens),
            )
        )


class StopWhen(TrainerCallback):
    """Stops training (after saving a checkpoint) when ``should_stop()`` says so: cancellation."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop
        self.stopped = False

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.should_stop():
            self.stopped = True
            control.should_training_stop = True


class OnSave(TrainerCallback):
    """Calls ``upload(folder, step)`` after each checkpoint is written (to copy it to object storage)."""

    def __init__(self, upload: Callable[[Path, int], None]) -> None:
        self.upload = upload

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.upload(folder, state.global_step)


# --- training --------------------------------------------------------------------------------------------------


def _common_args(recipe: Recipe, output_dir: Path, device: str, epochs: int) -> dict[str, Any]:
    bf16 = recipe.model.dtype == "bfloat16" and device == "cuda"
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": epochs,
        "max_steps": recipe.train.max_steps,
        "per_device_train_batch_size": recipe.train.batch_size,
        "gradient_accumulation_steps": recipe.train.grad_accum,
        "learning_rate": recipe.optim.lr,
        "weight_decay": recipe.optim.weight_decay,
        "lr_scheduler_type": recipe.optim.scheduler,
        "warmup_steps": recipe.optim.warmup_ratio,  # A float below 1 is a ratio of the total steps.
        "max_grad_norm": recipe.optim.max_grad_norm,
        "optim": recipe.optim.name,
        "seed": recipe.train.seed,
        "data_seed": recipe.train.seed,
        "logging_steps": recipe.train.logging_steps,
        "save_strategy": "steps",
        "save_steps": recipe.train.save_steps,
        "save_total_limit": 1,
        "report_to": [],
        "bf16": bf16,
        "fp16": recipe.model.dtype == "float16" and device == "cuda",
        "use_cpu": device == "cpu",
        "activation_checkpointing": recipe.model.gradient_checkpointing,
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "max_length": recipe.train.max_length,
    }


def _run(trainer: Any, resume_from: Path | None, stopper: StopWhen, output_dir: Path, examples: int) -> TrainResult:
    trainer.remove_callback(PrinterCallback)  # Progress goes to our reporter and logs, not to stdout.
    start = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    wall = time.perf_counter() - start
    adapter_dir = output_dir / ADAPTER_DIR
    trainer.save_model(str(adapter_dir))  # The adapter and tokenizer, written by the main process only.
    state = trainer.state
    tokens = int(state.num_input_tokens_seen)
    return TrainResult(
        adapter_dir=adapter_dir,
        steps=state.global_step,
        train_loss=float(outcome.training_loss) if outcome.training_loss is not None else None,
        examples=examples,
        tokens_seen=tokens,
        wall_seconds=wall,
        tokens_per_second=tokens / wall if wall > 0 else 0.0,
        cancelled=stopper.stopped,
    )


def train_sft(
    recipe: Recipe,
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    records: Sequence[Mapping[str, Any]],
    output_dir: Path,
    *,
    resume_from: Path | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainResult:
    """LoRA SFT with TRL's SFTTrainer; the loss falls only on weight-1 assistant tokens."""
    device = pick_device(recipe)
    dataset, stats = sft_dataset(tokenizer, records, recipe.train.max_length)
    args = SFTConfig(**_common_args(recipe, output_dir, device, recipe.train.epochs), packing=False)
    stopper = StopWhen(should_stop)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(recipe),
        callbacks=[*callbacks, stopper],
    )
    result = _run(trainer, resume_from, stopper, output_dir, stats["examples"])
    result.details = stats
    return result


def train_dpo(
    recipe: Recipe,
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    records: Sequence[Mapping[str, Any]],
    output_dir: Path,
    *,
    init_adapter: Path | None = None,
    resume_from: Path | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainResult:
    """LoRA DPO with TRL's DPOTrainer.

    With ``init_adapter`` (an SFT run's adapter) the adapter is trained further and a frozen copy of it is the
    reference policy, as in EmPO (DPO after SFT); the result still applies to the plain base model. Without
    one, a fresh adapter is trained against the base model.
    """
    assert recipe.dpo is not None  # The recipe validator guarantees it for kind "dpo".
    device = pick_device(recipe)
    dataset, passes, stats = dpo_dataset(
        tokenizer, records, recipe.train.epochs, recipe.dpo.max_prompt_length, recipe.train.max_length
    )
    args = DPOConfig(
        **_common_args(recipe, output_dir, device, passes),
        beta=recipe.dpo.beta,
        loss_type=[recipe.dpo.loss_type],
    )
    peft_config: LoraConfig | None = lora_config(recipe)
    train_model: PreTrainedModel | PeftModel = model
    if init_adapter is not None:
        train_model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        peft_config = None
    stopper = StopWhen(should_stop)
    trainer = DPOTrainer(
        model=train_model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[*callbacks, stopper],
    )
    prepared = trainer.train_dataset
    if isinstance(prepared, Sized) and len(prepared) == 0:  # TRL dropped every pair itself: say so, not torch.
        raise FailedPrecondition(
            f"TRL left none of the {stats['pairs']} DPO pairs after truncating to train.max_length="
            f"{recipe.train.max_length}: raise train.max_length"
        )
    result = _run(trainer, resume_from, stopper, output_dir, stats["pairs"])
    result.details = {**stats, "passes": passes}
    return result
