"""The training recipes of every shipped pipeline leave room for what they train on: a recorded session's prompt
begins with the chat service's system prompt, so a recipe whose token limits are below that trains nothing (DPO:
every pair dropped, the step fails) or only cut prompts (SFT). The loop's shipped recipes once had 512 tokens, and
the first round of the shipped loop on real sessions failed at DPO for it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from emili_chat.settings import ChatOptions
from emili_trainer.recipes import load_recipe

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "libs" / "pipeline" / "configs"
ARTIFACTS = REPO / "var" / "artifacts" / "chat"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Beyond the system prompt: a user turn of a sentence or two with its emotion readout, and a reply of a few sentences.
USER_TURN_TOKENS, REPLY_TOKENS = 32, 64
# EmPO's SFT trains on EmpatheticDialogues dialogues, which carry no system prompt.
NOT_ON_SESSIONS = {("empo.yaml", "sft")}


def _pipeline_recipes() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        for kind, recipe in (raw.get("recipes") or {}).items():
            if kind in ("sft", "dpo") and (path.name, kind) not in NOT_ON_SESSIONS:
                found.append((path.name, kind, recipe if "/" not in recipe else str(CONFIGS / recipe)))
    return found


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    if not (ARTIFACTS / GGUF).is_file():
        pytest.skip(f"{GGUF} is not in {ARTIFACTS} (make setup)")
    return AutoTokenizer.from_pretrained(ARTIFACTS, gguf_file=GGUF, local_files_only=True)


@pytest.fixture(scope="module")
def session_prompt_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens of the shortest prompt a recorded session gives: the system prompt, one word from the user."""
    system = ChatOptions().system_prompt.read_text().strip()
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return len(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def test_every_shipped_pipeline_is_checked() -> None:
    configs = {name for name, _, _ in _pipeline_recipes()}
    assert {"loop.yaml", "demo.yaml", "ci.yaml", "loop-simulation.yaml"} <= configs


@pytest.mark.parametrize(("config", "kind", "recipe"), _pipeline_recipes())
def test_a_sessions_prompt_and_reply_fit_the_recipe(
    config: str, kind: str, recipe: str, session_prompt_tokens: int
) -> None:
    shipped = load_recipe(recipe)
    prompt = session_prompt_tokens + USER_TURN_TOKENS
    where = f"{config}'s {kind} recipe {shipped.name}"
    if kind == "dpo":
        assert shipped.dpo is not None
        assert shipped.dpo.max_prompt_length >= prompt, f"{where}: dpo.max_prompt_length below a session's prompt"
        room = shipped.train.max_length - shipped.dpo.max_prompt_length
        assert room >= REPLY_TOKENS, f"{where}: {room} tokens left for the replies"
    else:
        assert shipped.train.max_length >= prompt + REPLY_TOKENS, f"{where}: train.max_length cuts the prompt"
