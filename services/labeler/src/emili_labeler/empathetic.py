"""EmPO-style preference pairs from EmpatheticDialogues (reference section 5), without EmPO's bugs.

The dialogues come from :func:`emili_affect.empathetic.load_dialogues` (rows it skips, and why, are described
there).

Pairs (:func:`empo_pairs`): prompt = the dialogue before the target (ends with a speaker turn), with an
optional system prompt whose ``{emotion}`` / ``{situation}`` fields are filled (any other placeholder is
an error, never sent as-is); chosen = the gold target; rejected = the target of a random dialogue of the
opposite emotion, redrawn per epoch from a generator seeded by ``(seed, epoch, conv_id)``, never one whose
text equals the chosen one (case- and whitespace-insensitive). Dialogues without a candidate are skipped
and counted. The test split is refused unless ``allow_test=True``.
"""

from __future__ import annotations

import random
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from emili_affect.empathetic import Dialogue
from emili_labeler.datasets import content_id, normalise_text, plain_reply

__all__ = [
    "ASYMMETRIC_OPPOSITES",
    "OPPOSITE_EMOTION",
    "EmpoResult",
    "build_empo_pairs",
    "empo_pairs",
    "format_system_prompt",
]

# EmPO's table, all 32 entries in the reference's order. Not an involution: four emotions point to an
# emotion whose own opposite is something else (see ASYMMETRIC_OPPOSITES).
OPPOSITE_EMOTION: Mapping[str, str] = {
    "afraid": "angry",
    "angry": "afraid",
    "sad": "joyful",
    "joyful": "sad",
    "grateful": "disgusted",
    "trusting": "disgusted",
    "disgusted": "trusting",
    "surprised": "anticipating",
    "anticipating": "surprised",
    "content": "anxious",
    "anxious": "content",
    "apprehensive": "annoyed",
    "annoyed": "apprehensive",
    "proud": "ashamed",
    "ashamed": "proud",
    "guilty": "proud",
    "prepared": "anxious",
    "nostalgic": "hopeful",
    "hopeful": "nostalgic",
    "sentimental": "apprehensive",
    "jealous": "faithful",
    "faithful": "jealous",
    "embarrassed": "confident",
    "confident": "embarrassed",
    "excited": "devastated",
    "devastated": "excited",
    "lonely": "caring",
    "caring": "lonely",
    "terrified": "furious",
    "furious": "terrified",
    "disappointed": "impressed",
    "impressed": "disappointed",
}
ASYMMETRIC_OPPOSITES = frozenset({"grateful", "guilty", "prepared", "sentimental"})

TEST_SPLIT = "test"
SYSTEM_PROMPT_FIELDS = frozenset({"emotion", "situation"})


def format_system_prompt(template: str, dialogue: Dialogue) -> str:
    """``template`` with ``{emotion}`` and ``{situation}`` filled; any other field raises ``ValueError``.

    EmPO sent a system prompt with its placeholder unfilled; here a template either formats completely or
    fails loudly. Literal braces are written ``{{`` and ``}}``.
    """
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = names - SYSTEM_PROMPT_FIELDS
    if unknown:
        raise ValueError(f"system prompt has unknown placeholders {sorted(unknown)}; allowed: emotion, situation")
    return template.format(emotion=dialogue.emotion, situation=dialogue.situation)


@dataclass
class EmpoResult:
    pairs: list[dict[str, Any]]
    skipped_no_opposite: Counter[str] = field(default_factory=Counter)  # By the chosen dialogue's emotion.

    @property
    def skipped(self) -> int:
        return sum(self.skipped_no_opposite.values())


def _comparable(text: str) -> str:
    return normalise_text(text).casefold()


def _draw_rng(seed: int, epoch: int, conv_id: str) -> random.Random:
    # One generator per (seed, epoch, dialogue): reproducible, fresh each epoch, and independent of which
    # other dialogues are in the batch or their order.
    return random.Random(int(content_id(["empo", seed, epoch, conv_id]), 16))


def build_empo_pairs(
    dialogues: Iterable[Dialogue],
    epoch: int,
    seed: int,
    *,
    split: str,
    allow_test: bool = False,
    system_prompt: str | None = None,
) -> EmpoResult:
    """Pairs for one epoch plus what was skipped; ``split`` must name the dialogues' split."""
    items = sorted(dialogues, key=lambda d: d.conv_id)
    if split == TEST_SPLIT and not allow_test:
        raise ValueError("refusing to build training pairs from the test split; pass allow_test=True to do so")
    wrong = sorted({d.split for d in items} - {split})
    if wrong:
        raise ValueError(f"split={split!r} but the dialogues come from {wrong}")
    if len({d.conv_id for d in items}) != len(items):
        raise ValueError("conv_ids must be unique")
    by_emotion: dict[str, list[Dialogue]] = defaultdict(list)
    for d in items:
        by_emotion[d.emotion].append(d)
    result = EmpoResult(pairs=[])
    for d in items:
        chosen = plain_reply(d.target)
        opposite = OPPOSITE_EMOTION.get(d.emotion)
        pool = [
            c for c in by_emotion.get(opposite or "", []) if _comparable(plain_reply(c.target)) != _comparable(chosen)
        ]
        if not pool:
            result.skipped_no_opposite[d.emotion] += 1
            continue
        other = _draw_rng(seed, epoch, d.conv_id).choice(pool)
        prompt = d.context_messages()
        if system_prompt is not None:
            prompt = [{"role": "system", "content": format_system_prompt(system_prompt, d)}, *prompt]
        body = {"prompt": prompt, "chosen": chosen, "rejected": plain_reply(other.target)}
        result.pairs.append(
            {
                # The epoch is in the id so several epochs' files can be concatenated without id clashes.
                "id": content_id({"source": "empathetic", "conv_id": d.conv_id, "epoch": epoch, **body}),
                **body,
                "source": "empathetic",
                "conv_id": d.conv_id,
                "emotion": d.emotion,
                "rejected_conv_id": other.conv_id,
                "rejected_emotion": other.emotion,
                "split": d.split,
                "epoch": epoch,
                "seed": seed,
            }
        )
    return result


def empo_pairs(
    dialogues: Iterable[Dialogue],
    epoch: int,
    seed: int,
    *,
    split: str,
    allow_test: bool = False,
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """The pairs of :func:`build_empo_pairs`, in conv_id order."""
    return build_empo_pairs(
        dialogues, epoch, seed, split=split, allow_test=allow_test, system_prompt=system_prompt
    ).pairs
