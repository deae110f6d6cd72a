"""SFT and DPO with TRL on a tiny random model: the adapter changes, the loss covers only weighted tokens,
EmPO draws give one pass per epoch's draw, cancellation stops the run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from emili_core.errors import FailedPrecondition
from emili_trainer.masking import IGNORE_INDEX
from emili_trainer.recipes import Recipe
from emili_trainer.training import Progress, ProgressReporter, dpo_dataset, sft_dataset, train_dpo, train_sft


def _sft_records(conversation: list[dict[str, Any]], n: int = 8) -> list[dict[str, Any]]:
    return [{"id": f"s{i}", "messages": conversation} for i in range(n)]


def _pairs(n: int = 8, epochs: int | None = None) -> list[dict[str, Any]]:
    pairs = []
    for i in range(n):
        pair: dict[str, Any] = {
            "id": f"p{i}",
            "prompt": [{"role": "user", "content": f"I lost my job today ({i})."}],
            "chosen": "That must be so hard. How are you holding up?",
            "rejected": "Cool, congrats!",
        }
        for epoch in range(epochs or 1):
            pairs.append({**pair, "epoch": epoch} if epochs else pair)
    return pairs


def _lora_b(adapter_dir: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {k: v for k, v in weights.items() if "lora_B" in k}


def test_sft_dataset_labels_only_weighted_tokens(
    tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, Any]]
) -> None:
    dataset, stats = sft_dataset(tokenizer, _sft_records(conversation, 2), 512)
    assert stats["examples"] == 4 and stats["loss_tokens"] > 0  # One example per weight-1 reply.
    first, second = (
        tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label >= 0])
        for row in (dataset[0], dataset[1])
    )
    assert "exhausting" in first and "Anytime" in second and "Anytime" not in first and "exhausting" not in second
    for trained in (first, second):
        assert "Whatever" not in trained and "rough day" not in trained and "SAD" not in trained


def test_sft_changes_the_adapter_and_learns(
    tokenizer: PreTrainedTokenizerBase,
    conversation: list[dict[str, Any]],
    make_model: Callable[..., Any],
    make_recipe: Callable[..., Recipe],
    tmp_path: Path,
) -> None:
    reports: list[Progress] = []
    recipe = make_recipe("smollm2-cpu-sft", max_steps=12)
    result = train_sft(
        recipe,
        tokenizer,
        make_model(),
        _sft_records(conversation),
        tmp_path,
        callbacks=[ProgressReporter(reports.append)],
    )
    assert result.steps == 12 and not result.cancelled
    lora_b = _lora_b(result.adapter_dir)
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b.values())  # LoRA B starts at zero; training moved it.
    losses = [r.loss for r in reports if r.loss is not None]
    assert losses[-1] < losses[0]  # The same 8 examples, 12 steps at a high lr: the loss must fall.
    assert any(r.tokens_per_second for r in reports) and reports[-1].step == 12
    assert (result.adapter_dir / "tokenizer_config.json").is_file()  # The registry version carries its tokenizer.


def test_sft_loss_ignores_unweighted_text(
    tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, Any]], make_model: Callable[..., Any]
) -> None:
    """The loss the trainer optimises equals the loss over weight-1 reply tokens alone: changing the user's
    words changes the context, but removing weight-0 replies from the labels changes nothing."""
    dataset, _ = sft_dataset(tokenizer, _sft_records(conversation, 1), 512)
    row = dataset[0]
    ids = torch.tensor([row["input_ids"]])
    labels = torch.tensor([row["labels"]])
    model = make_model()
    loss = model(input_ids=ids, labels=labels).loss
    logits = model(input_ids=ids).logits[0, :-1]
    targets = labels[0, 1:]
    keep = targets != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, manual, atol=1e-5)


def test_dpo_from_an_sft_adapter(
    tokenizer: PreTrainedTokenizerBase,
    conversation: list[dict[str, Any]],
    make_model: Callable[..., Any],
    make_recipe: Callable[..., Recipe],
    tmp_path: Path,
) -> None:
    sft = train_sft(
        make_recipe("smollm2-cpu-sft", max_steps=4),
        tokenizer,
        make_model(),
        _sft_records(conversation),
        tmp_path / "sft",
    )
    before = _lora_b(sft.adapter_dir)
    dpo = train_dpo(
        make_recipe("smollm2-cpu-dpo", max_steps=6),
        tokenizer,
        make_model(),
        _pairs(),
        tmp_path / "dpo",
        init_adapter=sft.adapter_dir,
    )
    after = _lora_b(dpo.adapter_dir)
    assert before.keys() == after.keys()  # The SFT adapter was trained further, not replaced.
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model = PeftModel.from_pretrained(make_model(), str(dpo.adapter_dir))  # It applies to the plain base model.
    assert model.peft_config["default"].r == 4


def test_empo_draws_give_one_pass_per_epoch(tokenizer: PreTrainedTokenizerBase) -> None:
    dataset, passes, stats = dpo_dataset(tokenizer, _pairs(4, epochs=3), epochs=3, max_prompt_length=128)
    assert passes == 1 and len(dataset) == 12 and stats["draws"] == 3
    dataset, passes, _ = dpo_dataset(tokenizer, _pairs(4, epochs=3), epochs=2, max_prompt_length=128)
    assert passes == 1 and len(dataset) == 8  # Only the draws of the epochs trained.
    with pytest.raises(FailedPrecondition, match="epochs=4"):
        dpo_dataset(tokenizer, _pairs(4, epochs=3), epochs=4, max_prompt_length=128)
    dataset, passes, _ = dpo_dataset(tokenizer, _pairs(4), epochs=3, max_prompt_length=128)
    assert passes == 3 and len(dataset) == 4  # Feedback pairs: no draws, several passes.


def test_long_prompts_lose_their_oldest_turns(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = [{"role": "system", "content": "You are EMILI."}]
    for i in range(40):
        prompt += [{"role": "user", "content": f"message {i} " * 5}, {"role": "assistant", "content": "I see."}]
    prompt.append({"role": "user", "content": "last words"})
    record = {"id": "x", "prompt": prompt, "chosen": "a", "rejected": "b"}
    dataset, _, _ = dpo_dataset(tokenizer, [record], epochs=1, max_prompt_length=64)
    kept = dataset[0]["prompt"]
    assert kept[0]["content"] == "You are EMILI." and kept[-1]["content"] == "last words"
    assert len(kept) < len(prompt)


def test_pairs_whose_prompt_leaves_no_room_for_the_reply_are_named(tokenizer: PreTrainedTokenizerBase) -> None:
    def pair(system_words: int) -> dict[str, Any]:
        prompt = [{"role": "system", "content": "rule " * system_words}, {"role": "user", "content": "hello"}]
        return {"id": f"p{system_words}", "prompt": prompt, "chosen": "a kind reply", "rejected": "go away"}

    # A system prompt longer than max_length: no trimming of old turns can make room, so the pair is left out...
    dataset, _, stats = dpo_dataset(tokenizer, [pair(5), pair(400)], epochs=1, max_prompt_length=48, max_length=96)
    assert len(dataset) == 1 and stats == {"pairs": 1, "draws": 0, "too_long": 1}
    # ...and with none left the error names the limit to raise, instead of TRL's silent drop and torch's error.
    with pytest.raises(FailedPrecondition, match=r"none of the 2 DPO pairs fits the recipe's train.max_length=96"):
        dpo_dataset(tokenizer, [pair(300), pair(400)], epochs=1, max_prompt_length=48, max_length=96)


def test_cancellation_stops_after_the_current_step(
    tokenizer: PreTrainedTokenizerBase,
    conversation: list[dict[str, Any]],
    make_model: Callable[..., Any],
    make_recipe: Callable[..., Recipe],
    tmp_path: Path,
) -> None:
    steps: list[int] = []
    result = train_sft(
        make_recipe("smollm2-cpu-sft", max_steps=20),
        tokenizer,
        make_model(),
        _sft_records(conversation),
        tmp_path,
        callbacks=[ProgressReporter(lambda p: steps.append(p.step))],
        should_stop=lambda: bool(steps) and steps[-1] >= 3,
    )
    assert result.cancelled and result.steps < 20


def test_a_dataset_with_nothing_to_learn_is_refused(
    tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, Any]]
) -> None:
    unweighted = [{k: v for k, v in m.items() if k != "weight"} for m in conversation]
    with pytest.raises(FailedPrecondition, match="weight-1"):
        sft_dataset(tokenizer, _sft_records(unweighted, 2), 512)
