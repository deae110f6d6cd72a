"""Recipes: every shipped one parses and validates; bad ones are refused with a message naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from emili_core.errors import InvalidInput, NotFound
from emili_trainer.recipes import Recipe, load_recipe, parse_recipe, shipped_recipes

MINIMAL = "name: x\nkind: sft\nmodel: {path: chat/m.gguf}\n"


def test_every_shipped_recipe_parses() -> None:
    names = shipped_recipes()
    assert {"smollm2-cpu-sft", "smollm2-cpu-dpo", "empo-7b-sft", "empo-7b-dpo"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert isinstance(recipe, Recipe)
        assert recipe.name == name  # The file stem and the recipe's name agree.
        assert (recipe.dpo is not None) == (recipe.kind == "dpo")


# Recipe files the pipeline configs name by path (libs/pipeline/configs/recipes); read as files, not imported.
PIPELINE_RECIPES = sorted((Path(__file__).resolve().parents[3] / "libs/pipeline/configs/recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINE_RECIPES, ids=lambda p: p.stem)
def test_every_pipeline_recipe_file_parses(path: Path) -> None:
    recipe = load_recipe(str(path))
    assert recipe.name == path.stem
    assert (recipe.dpo is not None) == (recipe.kind == "dpo")


def test_empo_recipes_match_the_published_settings() -> None:
    sft, dpo = load_recipe("empo-7b-sft"), load_recipe("empo-7b-dpo")
    assert (sft.lora.r, sft.lora.alpha, sft.optim.lr, sft.train.epochs) == (1024, 64, 1e-5, 1)
    assert dpo.dpo is not None
    assert (dpo.dpo.beta, dpo.optim.lr, dpo.train.epochs) == (0.05, 1e-6, 3)
    assert sft.model.dtype == dpo.model.dtype == "bfloat16"
    assert sft.device == "cuda"


def test_a_recipe_file_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(MINIMAL + "train: {epochs: 2}\n")
    recipe = load_recipe(str(path))
    assert recipe.train.epochs == 2
    assert recipe.lora.r == 16  # Defaults fill what the file leaves out.


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("name: x\nkind: dpo\nmodel: {path: m}\n", "needs a 'dpo' section"),
        (MINIMAL + "dpo: {beta: 0.1}\n", "must not have a 'dpo' section"),
        (MINIMAL + "optim: {lr: -1}\n", "greater than 0"),
        (MINIMAL + "lora: {rank: 8}\n", "rank"),
        (MINIMAL + "train: {epochs: 0}\n", "greater than or equal to 1"),
        ("name: Bad Name\nkind: sft\nmodel: {path: m}\n", "pattern"),
        ("kind: sft\nmodel: {path: m}\n", "name"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("name: [unclosed\n", "not valid YAML"),
        ("name: x\nkind: dpo\nmodel: {path: m}\ntrain: {max_length: 64}\ndpo: {max_prompt_length: 64}\n", "shorter"),
    ],
)
def test_bad_recipes_are_refused(text: str, complaint: str) -> None:
    with pytest.raises(InvalidInput, match=complaint):
        parse_recipe(text)


def test_unknown_recipe() -> None:
    with pytest.raises(NotFound, match="smollm2-cpu-sft"):
        load_recipe("no-such-recipe")


def test_digest_depends_on_content_only() -> None:
    a = parse_recipe(MINIMAL)
    b = parse_recipe("kind: sft\nname: x\nmodel:\n  path: chat/m.gguf\n")
    c = parse_recipe(MINIMAL + "train: {seed: 1}\n")
    assert a.digest == b.digest != c.digest
