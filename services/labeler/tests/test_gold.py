"""Gold labels and the per-arm table against hand-computed examples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from emili_affect.vad import VAD, TextVAD
from emili_labeler.gold import GoldLabel, arm_table, gold_label, survey_texts

WORDS = {"tired": VAD(0.2, 0.3, 0.4), "better": VAD(0.8, 0.5, 0.6), "calm": VAD(0.7, 0.1, 0.5)}


class FakeScorer:
    """Mean of known word values; the real scorer is tested in libs/affect/tests/test_vad_*."""

    def score_batch(self, texts: Sequence[str]) -> list[TextVAD]:
        results = []
        for text in texts:
            found = [w for w in text.lower().split() if w in WORDS]
            vad = VAD(*np.mean([WORDS[w] for w in found], axis=0)) if found else None
            results.append(
                TextVAD(
                    "fake",
                    vad,
                    len(found) / max(1, len(text.split())),
                    tuple(found),
                    ("lexicon",) * len(found),
                    np.zeros((len(found), 3)),
                )
            )
        return results


def test_delta_is_post_minus_pre() -> None:
    events = [
        {"kind": "pre_survey", "text": "tired"},
        {"kind": "user_message", "text": "hello"},
        {"kind": "post_survey", "text": "better and calm"},
    ]
    label = gold_label(events, FakeScorer())
    assert label.pre == VAD(0.2, 0.3, 0.4)
    assert label.post == pytest.approx(VAD(0.75, 0.3, 0.55))
    assert label.delta == pytest.approx(VAD(0.55, 0.0, 0.15))
    assert label.post_coverage == pytest.approx(2 / 3) and label.lexicon == "fake"


def test_missing_survey_has_no_delta() -> None:
    label = gold_label([{"kind": "pre_survey", "text": "tired"}], FakeScorer())
    assert label.pre is not None and label.post is None and label.delta is None
    assert survey_texts([{"kind": "pre_survey", "text": ""}]) == (None, None)


def test_arm_table() -> None:
    def label(dv: float) -> GoldLabel:
        return GoldLabel(VAD(0.5, 0.5, 0.5), VAD(0.5 + dv, 0.5, 0.5 - dv), 1.0, 1.0, "fake")

    table = arm_table(
        [
            ("base", label(0.1)),
            ("base", label(0.3)),
            ("v1", label(-0.2)),
            ("v1", GoldLabel(None, None, None, None, "fake")),
        ]
    )
    assert table["base"]["n"] == 2 and table["base"]["valence"]["mean"] == pytest.approx(0.2)
    assert table["base"]["dominance"]["mean"] == pytest.approx(-0.2)
    assert table["v1"]["n"] == 1 and table["v1"]["valence"]["ci95"] == pytest.approx([-0.2, -0.2])
