"""Session gold labels (paper section 2.3): VAD of the pre- and post-chat texts, and per-arm tables.

v_x comes from the user's pre-chat survey text, v_y from the post-chat text, and Delta v = v_y - v_x;
a positive valence change means the chat helped. The per-arm table with bootstrap 95% confidence
intervals is the paper's Table 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from emili_affect.stats import bootstrap_ci
from emili_affect.vad import VAD, TextVAD
from emili_session.events import EventKind

DIMENSIONS = ("valence", "arousal", "dominance")


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
        }


def survey_texts(events: Sequence[Mapping[str, Any]]) -> tuple[str | None, str | None]:
    """The last pre-chat and post-chat survey texts of a session (a resubmitted survey replaces the first)."""
    pre = post = None
    for event in events:
        if event["kind"] == EventKind.PRE_SURVEY:
            pre = str(event.get("text", "")) or None
        elif event["kind"] == EventKind.POST_SURVEY:
            post = str(event.get("text", "")) or None
    return pre, post


def gold_label(events: Sequence[Mapping[str, Any]], scorer: Scorer) -> GoldLabel:
    pre_text, post_text = survey_texts(events)
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
