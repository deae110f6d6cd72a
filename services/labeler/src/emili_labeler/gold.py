"""Session gold labels (paper section 2.3): VAD of the pre- and post-chat surveys, and per-arm tables.

v_x comes from the user's pre-chat survey, v_y from the post-chat survey, and Delta v = v_y - v_x; a positive
valence change means the chat helped. What is scored (``gold_text_source``): the survey's free text
(``free_text``), the feelings the user ticked (``feelings``), or both together (``both``, the default, as the
research group's own pre-processing did): a participant who only ticks feelings still gets v_x and v_y. The
feelings are the survey's ``current_feelings`` (how the user feels at that moment); ``desired_feelings`` are a
wish, not a state, and are not scored. A survey with nothing to score leaves its side missing (``missing``), and
the labelling jobs count and list such sessions. The per-arm table with bootstrap 95% confidence intervals is the
paper's Table 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from emili_affect.stats import bootstrap_ci
from emili_affect.vad import VAD, TextVAD
from emili_session.events import EventKind

DIMENSIONS = ("valence", "arousal", "dominance")
GoldTextSource = Literal["free_text", "feelings", "both"]
GOLD_TEXT_SOURCES: tuple[GoldTextSource, ...] = ("free_text", "feelings", "both")


class Scorer(Protocol):
    def score_batch(self, texts: Sequence[str]) -> list[TextVAD]: ...


@dataclass(frozen=True)
class GoldLabel:
    pre: VAD | None
    post: VAD | None
    pre_coverage: float | None
    post_coverage: float | None
    lexicon: str

    @property
    def delta(self) -> VAD | None:
        if self.pre is None or self.post is None:
            return None
        return VAD(*(b - a for a, b in zip(self.pre, self.post, strict=True)))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GoldLabel:
        def vad(v: Mapping[str, float] | None) -> VAD | None:
            return None if v is None else VAD(v["valence"], v["arousal"], v["dominance"])

        return cls(vad(data["pre"]), vad(data["post"]), data["pre_coverage"], data["post_coverage"], data["lexicon"])

    def to_json(self) -> dict[str, Any]:
        def vad(v: VAD | None) -> dict[str, float] | None:
            return None if v is None else v._asdict()

        return {
            "pre": vad(self.pre),
            "post": vad(self.post),
            "delta": vad(self.delta),
            "pre_coverage": self.pre_coverage,
            "post_coverage": self.post_coverage,
            "lexicon": self.lexicon,
            "missing": self.missing,
        }

    @property
    def missing(self) -> list[str]:
        """The sides ("pre", "post") without a VAD: no survey, nothing to score in it, or no word scored."""
        return [side for side, vad in (("pre", self.pre), ("post", self.post)) if vad is None]


def _survey_text(event: Mapping[str, Any], source: GoldTextSource) -> str | None:
    """What is scored of one survey: its ticked feelings (in lower case, as a list of words), its free text, or
    both; None when that is empty."""
    feelings = ", ".join(str(f).strip().lower() for f in event.get("current_feelings") or () if str(f).strip())
    text = str(event.get("text", "")).strip()
    parts = {"free_text": [text], "feelings": [feelings], "both": [feelings, text]}[source]
    return ". ".join(p for p in parts if p) or None


def survey_texts(events: Sequence[Mapping[str, Any]], source: GoldTextSource = "both") -> tuple[str | None, str | None]:
    """What is scored of the last pre-chat and post-chat surveys of a session (a resubmitted survey replaces the
    first)."""
    if source not in GOLD_TEXT_SOURCES:
        raise ValueError(f"unknown gold text source {source!r}: one of {', '.join(GOLD_TEXT_SOURCES)}")
    pre = post = None
    for event in events:
        if event["kind"] == EventKind.PRE_SURVEY:
            pre = _survey_text(event, source)
        elif event["kind"] == EventKind.POST_SURVEY:
            post = _survey_text(event, source)
    return pre, post


def gold_label(events: Sequence[Mapping[str, Any]], scorer: Scorer, source: GoldTextSource = "both") -> GoldLabel:
    pre_text, post_text = survey_texts(events, source)
    texts = [t for t in (pre_text, post_text) if t is not None]
    scored = iter(scorer.score_batch(texts)) if texts else iter(())
    pre = next(scored) if pre_text is not None else None
    post = next(scored) if post_text is not None else None
    lexicon = (pre or post).lexicon if (pre or post) is not None else ""  # type: ignore[union-attr]
    return GoldLabel(
        pre=pre.vad if pre else None,
        post=post.vad if post else None,
        pre_coverage=pre.coverage if pre else None,
        post_coverage=post.coverage if post else None,
        lexicon=lexicon,
    )


def arm_table(labels: Sequence[tuple[str, GoldLabel]], samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Table 2: per model arm, the mean Delta valence/arousal/dominance with bootstrap 95% CIs."""
    by_arm: dict[str, list[VAD]] = {}
    for arm, label in labels:
        if label.delta is not None:
            by_arm.setdefault(arm, []).append(label.delta)
    table: dict[str, Any] = {}
    for arm, deltas in sorted(by_arm.items()):
        row: dict[str, Any] = {"n": len(deltas)}
        for i, dim in enumerate(DIMENSIONS):
            values = [d[i] for d in deltas]
            low, high = bootstrap_ci(values, samples, seed)
            row[dim] = {"mean": float(np.mean(values)), "ci95": [low, high]}
        table[arm] = row
    return table
