"""The NRC Emotion Intensity Lexicon (Mohammad 2018), read by path: the labeler only reads VAD lexicons.

File format (v1, and NRC's 2022 repackaging without identity terms): a TSV with the header
``word<TAB>emotion<TAB>emotion-intensity-score``, one row per (word, emotion) pair, scores in [0, 1],
eight emotions (anger, anticipation, disgust, fear, joy, sadness, surprise, trust). A word may have rows
for several emotions. The lexicon may not be redistributed, so the project never copies it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EmotionIntensity", "load_emotion_intensity"]

HEADER = ("word", "emotion", "emotion-intensity-score")


@dataclass(frozen=True)
class EmotionIntensity:
    """Per lowercased word, its intensity score for each emotion it was rated for."""

    name: str
    source: str
    sha256: str
    scores: Mapping[str, Mapping[str, float]]

    def __len__(self) -> int:
        return len(self.scores)

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and word.lower() in self.scores

    def intensity(self, word: str) -> float | None:
        """The word's strongest emotion intensity (max over its emotions); None when the word is not rated.

        The maximum, not the mean: a word rated 0.9 for fear and 0.2 for sadness is an intense word.
        """
        emotions = self.scores.get(word.lower())
        return max(emotions.values()) if emotions else None


def load_emotion_intensity(path: str | Path, name: str = "nrc-emotion-intensity-v1") -> EmotionIntensity:
    """Read the lexicon; the header line is optional. Raises ValueError naming the line of a malformed row."""
    path = Path(path)
    data = path.read_bytes()
    scores: dict[str, dict[str, float]] = {}
    for number, line in enumerate(data.decode("utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path}:{number}: expected 3 tab-separated fields, got {len(fields)}")
        if number == 1 and tuple(f.strip().lower() for f in fields) == HEADER:
            continue
        word, emotion, raw = (f.strip() for f in fields)
        try:
            score = float(raw)
        except ValueError:
            raise ValueError(f"{path}:{number}: the score must be a number: {line!r}") from None
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"{path}:{number}: the score {score} lies outside [0, 1]")
        scores.setdefault(word.lower(), {})[emotion.lower()] = score
    if not scores:
        raise ValueError(f"{path}: no lexicon entries found")
    return EmotionIntensity(name=name, source=str(path), sha256=hashlib.sha256(data).hexdigest(), scores=scores)
