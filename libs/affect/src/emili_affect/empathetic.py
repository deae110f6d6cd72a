"""EmpatheticDialogues conversations read into :class:`Dialogue` objects (:func:`load_dialogues`).

* columns ``conv_id, utterance_idx, context, prompt, speaker_idx, utterance, selfeval, tags``; ``context``
  is the emotion label, ``prompt`` the situation; ``_comma_`` becomes ``,`` in ``prompt`` and ``utterance``.
* a row is malformed, counted and skipped, when it has the wrong number of fields (8, or 9 in the raw
  release whose listener rows carry retrieval candidates), an empty ``conv_id``, a non-integer or
  non-positive ``utterance_idx``, a non-integer ``speaker_idx``, an emotion outside the 32, an empty
  utterance, or an utterance holding a swallowed record (``"\\nhit:"``, the HF export's CSV defect).
* roles come from utterance order: odd ``utterance_idx`` = speaker (user), even = listener (assistant).
  A conversation whose indices are not exactly 1..n after skipping malformed rows (a gap would break the
  alternation), or whose rows disagree on emotion or situation, is dropped and counted.
* the target is the LAST listener reply. A conversation ending with a speaker turn is by default cut
  after its last listener reply (``trailing_speaker="truncate"``: the target is still the last listener
  reply, as EmPO's one-target-per-dialogue); ``trailing_speaker="drop"`` drops it instead. Fewer than
  two turns after that: dropped.

The labeler builds EmPO preference pairs from these dialogues, the trainer evaluates on the test split and
the simulator draws personas from them: one loader, so all three skip the same rows.
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "COLUMNS",
    "EMOTIONS",
    "Dialogue",
    "LoadReport",
    "TrailingSpeaker",
    "load_dialogues",
    "split_of",
]

COLUMNS = ("conv_id", "utterance_idx", "context", "prompt", "speaker_idx", "utterance", "selfeval", "tags")

EMOTIONS: tuple[str, ...] = (
    "afraid", "angry", "annoyed", "anticipating", "anxious", "apprehensive", "ashamed", "caring",
    "confident", "content", "devastated", "disappointed", "disgusted", "embarrassed", "excited", "faithful",
    "furious", "grateful", "guilty", "hopeful", "impressed", "jealous", "joyful", "lonely", "nostalgic",
    "prepared", "proud", "sad", "sentimental", "surprised", "terrified", "trusting",
)  # fmt: skip
_EMOTION_SET = frozenset(EMOTIONS)

_SWALLOWED_RECORD = "\nhit:"  # A raw line merged into the previous field by an unbalanced quote.

TrailingSpeaker = Literal["truncate", "drop"]


@dataclass(frozen=True, slots=True)
class Dialogue:
    """One conversation: ``turns`` alternate speaker/listener, start with the speaker, end with the target."""

    conv_id: str
    emotion: str
    situation: str
    turns: tuple[str, ...]
    split: str

    @property
    def target(self) -> str:
        return self.turns[-1]

    def context_messages(self) -> list[dict[str, str]]:
        """The turns before the target as chat messages; the last is the speaker's (user's)."""
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(self.turns[:-1])]


@dataclass
class LoadReport:
    path: str
    split: str
    rows: int = 0
    malformed_rows: int = 0
    malformed_reasons: Counter[str] = field(default_factory=Counter)
    conversations: int = 0  # Distinct conv_ids among well-formed rows.
    dropped_gaps: int = 0  # utterance_idx not exactly 1..n.
    dropped_inconsistent: int = 0  # Rows of one conversation disagree on emotion or situation.
    dropped_trailing_speaker: int = 0  # Only with trailing_speaker="drop".
    truncated_trailing_speaker: int = 0  # Cut after the last listener reply (trailing_speaker="truncate").
    dropped_short: int = 0  # Fewer than two turns.
    dialogues: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["malformed_reasons"] = dict(sorted(self.malformed_reasons.items()))
        return out


def split_of(path: str | os.PathLike[str]) -> str:
    """The split a file holds, from its name: "train", "valid" (also "validation", "dev") or "test"."""
    stem = Path(path).stem.lower()
    for split, names in (("test", ("test",)), ("valid", ("valid", "validation", "dev")), ("train", ("train",))):
        if any(name in stem for name in names):
            return split
    raise ValueError(f"cannot tell the split of {path!s} from its name; pass split=")


def _clean(text: str) -> str:
    return text.replace("_comma_", ",").strip()


def _malformed(row: Sequence[str]) -> str | None:
    """Why a row is malformed, or None."""
    if len(row) not in (len(COLUMNS), len(COLUMNS) + 1):
        return "field_count"
    conv_id, utterance_idx, emotion, _, speaker_idx, utterance = row[:6]
    if not conv_id.strip():
        return "conv_id"
    try:
        if int(utterance_idx) < 1:
            return "utterance_idx"
    except ValueError:
        return "utterance_idx"
    try:
        int(speaker_idx)
    except ValueError:
        return "speaker_idx"
    if emotion.strip() not in _EMOTION_SET:
        return "emotion"
    if _SWALLOWED_RECORD in utterance:
        return "swallowed_record"
    if not _clean(utterance):
        return "empty_utterance"
    return None


def load_dialogues(
    path: str | os.PathLike[str], split: str | None = None, trailing_speaker: TrailingSpeaker = "truncate"
) -> tuple[list[Dialogue], LoadReport]:
    """Dialogues of one EmpatheticDialogues CSV (sorted by conv_id) and what was skipped on the way."""
    split = split if split is not None else split_of(path)
    report = LoadReport(path=str(path), split=split)
    rows: dict[str, list[tuple[int, str, str, str]]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[: len(COLUMNS)]) != COLUMNS:
            raise ValueError(f"{path!s}: expected the columns {', '.join(COLUMNS)}, got {header}")
        for row in reader:
            if not row:
                continue  # A blank line is not a record.
            report.rows += 1
            reason = _malformed(row)
            if reason is not None:
                report.malformed_rows += 1
                report.malformed_reasons[reason] += 1
                continue
            conv_id, idx, emotion, situation, _, utterance = row[:6]
            rows[conv_id.strip()].append((int(idx), emotion.strip(), _clean(situation), _clean(utterance)))
    report.conversations = len(rows)
    dialogues: list[Dialogue] = []
    for conv_id in sorted(rows):
        utterances = sorted(rows[conv_id])
        if [u[0] for u in utterances] != list(range(1, len(utterances) + 1)):
            report.dropped_gaps += 1
            continue
        if len({(u[1], u[2]) for u in utterances}) != 1:
            report.dropped_inconsistent += 1
            continue
        turns = [u[3] for u in utterances]
        if len(turns) % 2 == 1:  # Ends with the speaker (odd index): no listener reply to target there.
            if trailing_speaker == "drop":
                report.dropped_trailing_speaker += 1
                continue
            turns = turns[:-1]
            report.truncated_trailing_speaker += 1
        if len(turns) < 2:
            report.dropped_short += 1
            continue
        _, emotion, situation, _ = utterances[0]
        dialogues.append(Dialogue(conv_id, emotion, situation, tuple(turns), split))
    report.dialogues = len(dialogues)
    return dialogues, report
