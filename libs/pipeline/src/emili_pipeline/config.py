"""The pipeline's config file (``emili pipeline run CONFIG.yaml``): who is simulated, which recipes train, what
is held out and evaluated.

``auto`` inputs pick the development data in ``../shared/data`` when it is there (EmpatheticDialogues personas,
FER2013 faces) and the built-in personas and FER readings when it is not, so a fresh clone runs the same file.
:func:`resolve` turns them into concrete values before anything runs, so the pipeline id names what was used.
It also turns every recipe into its YAML text (a shipped recipe's through the trainer's ``GetRecipe``) and records
what another step needs from a recipe (``recipes.dpo_epochs``), so no worker imports another service's config.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from emili_core.errors import InvalidInput
from emili_core.settings import REPO_ROOT
from emili_pipeline.simulator.run import SimulatorSettings

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SHARED_PERSONAS = SHARED_DATA / "empatheticdialogues"
SHARED_FACES = SHARED_DATA / "fer2013-publictest" / "fer2013_publictest_48x48.npz"
AUTO = "auto"

_STRICT = ConfigDict(extra="forbid")
BASE_ARM = "base"


# A shipped recipe's name -> its YAML text (the CLI asks the trainer's GetRecipe; tests look it up in a dict).
RecipeFetcher = Callable[[str], str]


class Recipes(BaseModel):
    """Each a recipe shipped with the trainer (by name) or a recipe YAML file; :func:`resolve` replaces both with
    the recipe's text, which travels with the pipeline (workers need no copy, the pipeline id names the content)."""

    model_config = _STRICT
    sft: str = "smollm2-cpu-sft"
    dpo: str = "smollm2-cpu-dpo"
    # The DPO recipe's train.epochs, recorded by resolve(): the labeler draws one EmPO rejected reply per epoch.
    dpo_epochs: int | None = Field(None, ge=1)

    def require_dpo_epochs(self) -> int:
        if self.dpo_epochs is None:
            raise InvalidInput("recipes.dpo_epochs is unset: the pipeline config was not resolved (config.resolve)")
        return self.dpo_epochs


class Evaluation(BaseModel):
    model_config = _STRICT
    # Contexts per source (held-out sessions, EmpatheticDialogues test) each arm answers.
    max_examples: int = Field(16, ge=1, le=10_000)
    # Simulated users per arm (base, the baseline when it is another version, SFT, SFT+DPO) after training:
    # Tables 1 and 2 and the gate's online evidence compare their ratings, survey changes and reactions. 0 skips
    # them (the tables then hold the collected sessions' arm only).
    users_per_arm: int = Field(4, ge=0, le=10_000)
    concurrency: int = Field(3, ge=1, le=256)
    # all: every model the pipeline has (base, the baseline, SFT, SFT+DPO: the paper's tables); gate: only what the
    # gate compares, the baseline and the candidate (the loop's choice: a third less simulated users and replies).
    arms: Literal["all", "gate"] = "all"


class PipelineConfig(BaseModel):
    model_config = _STRICT

    name: str = Field("pipeline", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    seed: int = 0
    users: int = Field(8, ge=1, le=100_000)  # Simulated users collected before training.
    concurrency: int = Field(3, ge=1, le=256)
    arm: str = "base"  # The model arm the collected sessions talk to.
    personas: str = AUTO  # builtin | a JSON/YAML file | ed:PATH | auto
    # Use only the first N personas: users who share a persona open with the same words, which is what
    # feedback preference pairs need (replies to the same context, one liked and one not).
    persona_limit: int | None = Field(None, ge=1)
    faces: str | None = AUTO  # class folders or an NPZ | auto | null (FER readings)
    # Overrides of the simulator's settings (turns, seconds_between_turns, frames_per_second, linger_s, ...).
    simulator: dict[str, Any] = Field(default_factory=dict)
    heldout_share: float = Field(0.25, ge=0.0, lt=1.0)  # Sessions kept out of training, for evaluation.
    recipes: Recipes = Recipes()
    # feedback: pairs from the users' reactions; empathetic: EmPO pairs (needs the labeler's
    # EMILI_LABELER__EMPATHETIC_DIALOGUES); auto: feedback, else EmPO, else DPO is skipped (the reason is kept).
    dpo_source: Literal["auto", "feedback", "empathetic"] = "auto"
    # At most this many feedback pairs per context (replies to the same opening); unset: the labeler's default (4).
    # Only replies to a shared context pair, so the pairs a pipeline can get are at most this times its contexts.
    pairs_per_context: int | None = Field(None, ge=1, le=10_000)
    # Which pairs a context keeps when it has more than that: margin (the widest reaction gaps) or random; unset:
    # the labeler's default (margin).
    pair_selection: Literal["margin", "random"] | None = None
    # Keep only this share of all positive x negative combinations, the widest reaction margins, before the cap
    # (faces are noisy: narrow margins order replies little better than chance); unset: all of them.
    pair_margin_share: float | None = Field(None, gt=0.0, le=1.0)
    # sessions: SFT on the flagged replies of the collected sessions; empathetic: EmPO's SFT stage, every listener
    # turn of EmpatheticDialogues (its train split when the labeler's folder has one, else valid), before DPO.
    sft_source: Literal["sessions", "empathetic"] = "sessions"
    # SFT on only this share of the flagged replies, those with the largest reactions (every session together):
    # a flag on a barely positive change of a noisy face is weak evidence; unset: every flagged reply.
    sft_delta_share: float | None = Field(None, gt=0.0, le=1.0)
    # A reply cut off at the token limit. rejected_only: never trained on by SFT nor the chosen side of a pair, may
    # be the rejected side; trimmed: cut back to its last complete sentence, then trained on and paired as any
    # other reply (SFT still teaches stopping sooner: every target ends); open_end: SFT trains it as generated
    # with no loss on the end-of-turn marker, pairs use it trimmed (self-training on random replies leaves the
    # model's stopping as it was); unset: the labeler's default (rejected_only).
    cut_replies: Literal["rejected_only", "trimmed", "open_end"] | None = None
    evaluation: Evaluation = Evaluation()
    # The production arm the candidate (the last version trained: DPO, else SFT) is compared with by the
    # evaluation gate: "base" or a registered model version. Every evaluation step talks to it too.
    baseline: str = Field(BASE_ARM, pattern=r"^[A-Za-z0-9._-]{1,64}$")

    @field_validator("sft_delta_share")
    @classmethod
    def _delta_share_needs_sessions(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("sft_source") != "sessions":
            raise ValueError("sft_delta_share selects flagged session replies: it needs sft_source sessions")
        return value

    @field_validator("baseline")
    @classmethod
    def _baseline_names_an_arm(cls, value: str) -> str:
        if value.strip(".") == "":
            raise ValueError(f"baseline {value!r} is not a model version")  # As the model registry refuses it.
        return value

    @model_serializer(mode="wrap")
    def _without_default_baseline(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A config written before these fields existed dumps as it did, so its pipeline id (a digest of the dump)
        # and the states stored under it stay the same.
        data: dict[str, Any] = handler(self)
        if data.get("baseline") == BASE_ARM:
            data.pop("baseline")
        for optional in (
            "pairs_per_context",
            "pair_selection",
            "pair_margin_share",
            "sft_delta_share",
            "cut_replies",
        ):
            if data.get(optional) is None:
                data.pop(optional, None)
        evaluation = data.get("evaluation")
        if isinstance(evaluation, dict) and evaluation.get("arms") == "all":
            evaluation.pop("arms")
        return data

    def simulator_settings(self, base: SimulatorSettings | None = None) -> SimulatorSettings:
        """The simulator's settings: ``base`` (the environment's) with this file's overrides and inputs."""
        merged = {**(base or SimulatorSettings()).model_dump(), **self.simulator, "model_arm": self.arm}
        merged["faces"] = None if self.faces in (None, AUTO) else Path(self.faces)
        try:
            return SimulatorSettings.model_validate(merged)
        except ValidationError as exc:
            raise InvalidInput(f"simulator settings: {exc}") from None


def load_config(path: Path) -> PipelineConfig:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read pipeline config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{path} must be a YAML mapping")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"{path} is not a valid pipeline config: {exc}") from None


def _recipe(value: str, folder: Path, fetch: RecipeFetcher | None) -> str:
    """A recipe's YAML text: given as text already, read from a file, or fetched by a shipped recipe's name."""
    if "\n" in value:
        return value
    if value.endswith((".yaml", ".yml")):
        path = Path(value) if Path(value).is_absolute() else folder / value
        if not path.is_file():
            path = Path(value).resolve()
        if not path.is_file():
            raise InvalidInput(f"recipe file {value} not found (relative paths are read from {folder})")
        return path.read_text(encoding="utf-8")
    if fetch is None:
        raise InvalidInput(f"recipe {value!r} names a shipped recipe, and nothing was given to fetch it")
    return fetch(value)


def _train_epochs(text: str, recipe: str) -> int:
    """``train.epochs`` of a recipe's text: read here, so the labeler never loads the trainer's recipes."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInput(f"the DPO recipe {recipe} is not valid YAML: {exc}") from None
    train = data.get("train") if isinstance(data, dict) else None
    epochs = train.get("epochs") if isinstance(train, dict) else None
    if epochs is None:
        raise InvalidInput(
            f"the DPO recipe {recipe} sets no train.epochs; the pipeline needs it (EmPO pairs get one rejected "
            "draw per DPO epoch)"
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InvalidInput(f"the DPO recipe {recipe} has train.epochs {epochs!r}; it must be a whole number >= 1")
    return epochs


def resolve(
    config: PipelineConfig,
    config_dir: Path,
    shared: Path = SHARED_DATA,
    *,
    fetch_recipe: RecipeFetcher | None = None,
) -> PipelineConfig:
    """Concrete inputs: ``auto`` replaced by what exists, recipes by their text (files read, shipped recipes
    fetched with ``fetch_recipe``), the DPO recipe's epochs recorded, paths made absolute."""
    personas, faces = config.personas, config.faces
    ed, npz = shared / SHARED_PERSONAS.name, shared / SHARED_FACES.relative_to(SHARED_DATA)
    if personas == AUTO:
        personas = f"ed:{ed}" if (ed / "valid.csv").is_file() else "builtin"
    elif personas.startswith("ed:") and not Path(personas[3:]).is_absolute():
        personas = f"ed:{(config_dir / personas[3:]).resolve()}"
    elif personas != "builtin" and not Path(personas).is_absolute():
        personas = str((config_dir / personas).resolve())
    if faces == AUTO:
        faces = str(npz) if npz.is_file() else None
    elif faces is not None and not Path(faces).is_absolute():
        faces = str((config_dir / faces).resolve())
    sft = _recipe(config.recipes.sft, config_dir, fetch_recipe)
    dpo = _recipe(config.recipes.dpo, config_dir, fetch_recipe)
    dpo_name = config.recipes.dpo if "\n" not in config.recipes.dpo else "(given as text)"
    recipes = Recipes(sft=sft, dpo=dpo, dpo_epochs=_train_epochs(dpo, dpo_name))
    return config.model_copy(update={"personas": personas, "faces": faces, "recipes": recipes})
