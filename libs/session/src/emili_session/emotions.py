"""The seven emotions a face reading scores, in the FER model's output order (FER2013's classes).

Readings, readouts, reaction weights and simulated faces all key or order their scores by these names; the
FER service refuses a model manifest whose labels differ, so every service reads the same seven numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

__all__ = ["EMOTIONS", "check_labels"]

EMOTIONS: Final[tuple[str, ...]] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def check_labels(labels: Sequence[str], what: str) -> None:
    """Refuse ``labels`` (e.g. a model's outputs) unless they are exactly :data:`EMOTIONS` in that order."""
    if tuple(labels) != EMOTIONS:
        raise ValueError(
            f"{what} has labels {list(labels)}; EMILI needs exactly {list(EMOTIONS)} in this order "
            "(emili_session.emotions.EMOTIONS), because readouts, reaction weights and datasets use them"
        )
