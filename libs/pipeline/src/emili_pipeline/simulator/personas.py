"""Who a simulated user is: a situation, an emotion, what they say, and what they write in the surveys.

Sources, chosen by a spec string (:func:`load_personas`):

* ``builtin`` — the project's own 12 personas in ``emili_pipeline/data/personas.json``;
* a path to a JSON or YAML file in the same shape (``{"personas": [...]}`` or a bare list);
* ``ed:PATH`` — EmpatheticDialogues conversations (a CSV file, or a folder whose ``valid.csv`` is used):
  the emotion label and situation of each conversation, and the speaker's turns as the user's lines.
  Parsed with the shared loader (``emili_affect.empathetic.load_dialogues``) so malformed rows are
  skipped exactly as the labeler skips them. ED is CC BY-NC: it is read by path, never shipped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, field_validator

from emili_affect.empathetic import load_dialogues
from emili_pipeline.simulator.state import EMOTION_VAD

BUILTIN = "builtin"
ED_PREFIX = "ed:"


class Persona(BaseModel):
    persona_id: str = Field(min_length=1)
    emotion: str  # One of EmpatheticDialogues' 32 labels.
    situation: str = Field(min_length=1)
    user_lines: list[str] = Field(min_length=1)
    # Survey free text; empty means: made up from the situation and the simulated state.
    pre_text: str = ""
    post_text: str = ""
    source: str = BUILTIN

    @field_validator("emotion")
    @classmethod
    def _known_emotion(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in EMOTION_VAD:
            raise ValueError(f"unknown emotion {value!r}; one of EmpatheticDialogues' 32 labels")
        return value

    @field_validator("user_lines")
    @classmethod
    def _no_empty_lines(cls, lines: list[str]) -> list[str]:
        cleaned = [line.strip() for line in lines]
        if not all(cleaned):
            raise ValueError("user lines must not be empty")
        return cleaned


def _parse(data: Any, source: str) -> list[Persona]:
    items = data.get("personas") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ValueError(f"{source}: expected a non-empty list of personas (or {{'personas': [...]}})")
    return [Persona.model_validate({"source": source, **item}) for item in items]


def builtin_personas() -> list[Persona]:
    text = resources.files("emili_pipeline").joinpath("data/personas.json").read_text(encoding="utf-8")
    return _parse(json.loads(text), BUILTIN)


def personas_from_file(path: Path) -> list[Persona]:
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    return _parse(data, str(path))


def personas_from_empathetic_dialogues(path: Path, limit: int | None = None) -> list[Persona]:
    """One persona per conversation, in the loader's (conv_id) order; the speaker's turns are the lines."""
    csv_path = path / "valid.csv" if path.is_dir() else path
    dialogues, _ = load_dialogues(csv_path)
    personas = []
    for dialogue in dialogues[:limit] if limit is not None else dialogues:
        personas.append(
            Persona(
                persona_id=f"ed-{dialogue.conv_id}",
                emotion=dialogue.emotion,
                situation=dialogue.situation,
                user_lines=list(dialogue.turns[0::2]),  # Speaker turns: the user's side.
                source=f"empatheticdialogues:{csv_path.name}",
            )
        )
    if not personas:
        raise ValueError(f"{csv_path}: no usable EmpatheticDialogues conversation")
    return personas


def load_personas(spec: str = BUILTIN, limit: int | None = None) -> list[Persona]:
    """Personas from ``builtin``, a JSON/YAML file, or ``ed:PATH`` (see the module docstring)."""
    if spec == BUILTIN:
        personas = builtin_personas()
    elif spec.startswith(ED_PREFIX):
        return personas_from_empathetic_dialogues(Path(spec[len(ED_PREFIX) :]).expanduser(), limit)
    else:
        personas = personas_from_file(Path(spec).expanduser())
    return personas[:limit] if limit is not None else personas


def pick(personas: Sequence[Persona], index: int) -> Persona:
    """The persona of user ``index``: users cycle through the list, so any N users can share a small set."""
    return personas[index % len(personas)]
