"""EmPO's training data from EmpatheticDialogues (reference section 5), without EmPO's bugs: SFT dialogues and
preference pairs.

The dialogues come from :func:`emili_affect.empathetic.load_dialogues` (rows it skips, and why, are described
there). The test split is refused unless ``allow_test=True``.

SFT (:func:`empathetic_sft_examples`, EmPO's first stage): each dialogue as chat messages, the speaker's turns as
``user`` messages (never trained on) and the listener's as ``assistant`` messages with ``weight`` 1 (trained), in
the SFT record format of :func:`emili_labeler.datasets.sft_examples`, so the trainer masks and splits them the
same way (one example per listener turn, with the turns before it as context).

Pairs (:func:`empo_pairs`, the DPO stage): prompt = the dialogue before the target (ends with a speaker turn),
with an optional system prompt whose ``{emotion}`` / ``{situation}`` fields are filled (any other placeholder is
an error, never sent as-is); chosen = the gold target; rejected = the target of a dialogue of the opposite
emotion. The rejected draw is balanced as EmPO's ``get_opposite_ed_keys`` balances it: for each emotion, the
opposite emotion's dialogues are shuffled and dealt out in turn, so each is the rejected reply of about equally
many dialogues (floor or ceiling of their ratio) instead of some many times and others never, as independent
draws would do. The deal is shuffled afresh per epoch from a generator seeded by ``(seed, epoch, emotion)``;
unlike EmPO's (which repeats the pool only once, so an emotion with more than twice as many dialogues as its
opposite leaves some without a pair) it cycles for as long as needed. A rejected reply never reads the same as
the chosen one (case- and whitespace-insensitive): that dialogue takes the next in the deal. Dialogues without a
candidate are skipped and counted.
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
    "empathetic_sft_examples",
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


def _draw_rng(seed: int, epoch: int, emotion: str) -> random.Random:
    # One generator per (seed, epoch, emotion): reproducible, fresh each epoch, independent of the input order
    # and of the other emotions' dialogues.
    return random.Random(int(content_id(["empo", seed, epoch, emotion]), 16))


def _balanced_draws(group: list[Dialogue], pool: list[Dialogue], rng: random.Random) -> dict[str, Dialogue | None]:
    """A rejected dialogue from ``pool`` for each of ``group`` (one emotion's dialogues, by conv_id): the pool
    shuffled and dealt out cyclically, skipping a candidate whose reply reads the same as the chosen one."""
    deal = list(pool)
    rng.shuffle(deal)
    drawn: dict[str, Dialogue | None] = {}
    position = 0
    for d in group:
        chosen = _comparable(plain_reply(d.target))
        drawn[d.conv_id] = None
        for step in range(len(deal)):
            candidate = deal[(position + step) % len(deal)]
            if _comparable(plain_reply(candidate.target)) != chosen:
                drawn[d.conv_id] = candidate
                position += step + 1
                break
    return drawn


def _checked(dialogues: Iterable[Dialogue], split: str, allow_test: bool) -> list[Dialogue]:
    """The dialogues by conv_id, after checking they come from ``split`` and that it may be trained on."""
    items = sorted(dialogues, key=lambda d: d.conv_id)
    if split == TEST_SPLIT and not allow_test:
        raise ValueError("refusing to build training data from the test split; pass allow_test=True to do so")
    wrong = sorted({d.split for d in items} - {split})
    if wrong:
        raise ValueError(f"split={split!r} but the dialogues come from {wrong}")
    if len({d.conv_id for d in items}) != len(items):
        raise ValueError("conv_ids must be unique")
    return items


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
    items = _checked(dialogues, split, allow_test)
    by_emotion: dict[str, list[Dialogue]] = defaultdict(list)
    for d in items:
        by_emotion[d.emotion].append(d)
    drawn: dict[str, Dialogue | None] = {}
    for emotion, group in by_emotion.items():
        pool = by_emotion.get(OPPOSITE_EMOTION.get(emotion, ""), [])
        drawn.update(_balanced_draws(group, pool, _draw_rng(seed, epoch, emotion)))
    result = EmpoResult(pairs=[])
    for d in items:
        chosen = plain_reply(d.target)
        other = drawn[d.conv_id]
        if other is None:
            result.skipped_no_opposite[d.emotion] += 1
            continue
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


def empathetic_sft_examples(
    dialogues: Iterable[Dialogue],
    *,
    split: str,
    allow_test: bool = False,
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """One SFT record per dialogue (in conv_id order): speaker turns as untrained ``user`` messages, listener turns
    as ``assistant`` messages of weight 1; ``split`` must name the dialogues' split."""
    items = _checked(dialogues, split, allow_test)
    records = []
    for d in items:
        messages: list[dict[str, Any]] = []
        if system_prompt is not None:
            messages.append({"role": "system", "content": format_system_prompt(system_prompt, d)})
        for i, turn in enumerate(d.turns):
            if i % 2 == 0:
                messages.append({"role": "user", "content": turn})
            else:
                messages.append({"role": "assistant", "content": plain_reply(turn), "weight": 1})
        body = {"source": "empathetic", "conv_id": d.conv_id, "messages": messages}
        records.append({"id": content_id(body), **body, "emotion": d.emotion, "split": d.split})
    return records
