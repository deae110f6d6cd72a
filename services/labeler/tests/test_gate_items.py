"""The evaluation gate's online items from session labels: Delta v and the mean reaction per session, negative
reactions per reply (the flag's mirror image on the same delta), per arm, real and synthetic sessions apart."""

from __future__ import annotations

from typing import Any

import pytest

from emili_labeler.jobs import arm_gate_items, label_threshold, session_gate_items
from emili_labeler.reactions import negative_reaction


def _label(
    arm: str, pre_v: float | None, post_v: float | None, deltas: list[float | None], threshold: Any = 0.0
) -> dict[str, Any]:
    def vad(v: float | None) -> dict[str, float] | None:
        return None if v is None else {"valence": v, "arousal": 0.5, "dominance": 0.5}

    vector = None if threshold is None else {"weights": [1.0] * 7, "threshold": threshold}
    return {
        "model_arm": arm,
        "gold": {"pre": vad(pre_v), "post": vad(post_v), "pre_coverage": 1.0, "post_coverage": 1.0, "lexicon": "x"},
        "turns": [{"turn_id": f"t{i}", "delta": d, "flagged": d is not None and d >= 0} for i, d in enumerate(deltas)],
        "settings": {"weights": "learned" if vector is None else "emotion_tune", "weight_vector": vector},
    }


@pytest.mark.parametrize(
    ("delta", "threshold", "negative"),
    [
        (None, 0.0, None),  # No reaction was read: not an item.
        (0.0, 0.0, False),  # An unchanged face is neither positive nor negative.
        (-0.01, 0.0, True),
        (5.0, 0.0, False),
        (-0.05, 0.1, False),  # A fall smaller than the flag's threshold is not a negative reaction.
        (-0.1, 0.1, True),
        (-0.3, 0.1, True),
    ],
)
def test_negative_reaction_mirrors_the_flag(delta: float | None, threshold: float, negative: bool | None) -> None:
    assert negative_reaction(delta, threshold) is negative


def test_session_items_read_the_label() -> None:
    label = _label("sft-1", 0.4, 0.7, [1.0, -2.0, None, -0.05], threshold=0.1)
    assert label_threshold(label) == 0.1
    items = session_gate_items(label)
    assert items["delta_v"] == [pytest.approx(0.3)]
    assert items["negative_reaction"] == [0.0, 1.0, 0.0]  # The unread turn is left out.
    assert items["negative_reaction_rate"] == [pytest.approx(1 / 3)]  # One item for the session.
    assert items["reaction"] == [pytest.approx((1.0 - 2.0 - 0.05) / 3)]  # The mean change of the read ones.
    assert label_threshold(_label("a", 0.1, 0.2, [], threshold=None)) == 0.0  # Learned weights flag at 0.
    # A session without both surveys has no Delta v, but its replies still count.
    assert session_gate_items(_label("a", None, 0.2, [-1.0])) == {
        "delta_v": [],
        "reaction": [-1.0],
        "negative_reaction": [1.0],
        "negative_reaction_rate": [1.0],
    }
    # No reaction read: no reaction item.
    assert session_gate_items(_label("a", 0.1, 0.2, [None]))["reaction"] == []
    assert session_gate_items(_label("a", 0.1, 0.2, [None]))["negative_reaction_rate"] == []


def test_items_are_grouped_by_arm_and_origin_never_pooled() -> None:
    labels = [
        (_label("base", 0.5, 0.6, [-1.0, 1.0]), True),
        (_label("base", 0.5, 0.4, [2.0]), True),
        (_label("sft-1", 0.2, 0.5, [-3.0]), True),
        (_label("sft-1", 0.3, 0.3, []), False),
        ({**_label("", 0.1, 0.2, []), "model_arm": ""}, False),  # No arm recorded: the base model.
    ]
    items = arm_gate_items(labels)
    assert set(items) == {"base", "sft-1"}
    synthetic = items["base"]["synthetic"]
    assert synthetic["sessions"] == 2 and synthetic["delta_v"] == [pytest.approx(0.1), pytest.approx(-0.1)]
    assert synthetic["negative_reaction"] == [1.0, 0.0, 0.0]
    assert synthetic["negative_reaction_rate"] == [0.5, 0.0]  # Per session: replies of one person go together.
    assert items["base"]["real"] == {
        "sessions": 1,
        "delta_v": [pytest.approx(0.1)],
        "delta_v_users": [""],
        "reaction": [],
        "reaction_users": [],
        "negative_reaction": [],
        "negative_reaction_rate": [],
        "negative_reaction_rate_users": [],
    }
    assert items["sft-1"]["real"]["delta_v"] == [0.0] and items["sft-1"]["synthetic"]["negative_reaction"] == [1.0]


def test_each_per_session_item_names_its_user_so_arms_can_be_paired() -> None:
    labels = [
        ({**_label("base", 0.5, 0.6, []), "user_id": "eval-1-0"}, True),
        ({**_label("base", None, 0.6, [1.0]), "user_id": "eval-1-1"}, True),  # No Delta v: no item, no user.
        ({**_label("sft-1", 0.2, 0.5, [2.0, 4.0]), "user_id": "eval-1-0"}, True),
    ]
    items = arm_gate_items(labels)
    assert items["base"]["synthetic"]["delta_v_users"] == ["eval-1-0"]
    assert items["sft-1"]["synthetic"]["delta_v_users"] == ["eval-1-0"]
    assert len(items["base"]["synthetic"]["delta_v"]) == 1
    # Reactions: eval-1-0 had none read on base, eval-1-1 had one.
    assert items["base"]["synthetic"]["reaction_users"] == ["eval-1-1"]
    assert items["sft-1"]["synthetic"]["reaction"] == [3.0]
    assert items["sft-1"]["synthetic"]["reaction_users"] == ["eval-1-0"]


def test_signal_evidence_pairs_each_users_mean_reaction_with_their_mean_survey_change_and_mood_before() -> None:
    from emili_labeler.jobs import signal_evidence
    from emili_session.gate_items import SIGNAL_METRIC

    def of(user: str, pre: float | None, post: float | None, deltas: list[float | None]) -> dict[str, Any]:
        return _label("base", pre, post, deltas) | {"user_id": user}

    labels = [
        of("u2", 0.0, 0.4, [1.0, 3.0]),  # reaction 2, Δv 0.4
        of("u1", 0.5, 0.4, [-1.0]),  # reaction -1, Δv -0.1
        of("u2", 0.2, 0.4, [0.0]),  # reaction 0, Δv 0.2: u2's means are 1 and 0.3
        of("u3", None, 0.4, [1.0]),  # no pre-chat survey: no Δv, not an item
        of("u4", 0.1, 0.4, [None]),  # no reaction read: not an item
        of("", 0.1, 0.4, [2.0]),  # no user: not an item
    ]
    evidence = signal_evidence(labels)[SIGNAL_METRIC]
    assert evidence["paired"] is True
    assert evidence["candidate"] == [pytest.approx(-1.0), pytest.approx(1.0)]  # u1, u2
    assert evidence["baseline"] == [pytest.approx(-0.1), pytest.approx(0.3)]
    assert evidence["covariate"] == [pytest.approx(0.5), pytest.approx(0.1)]  # The pre-chat valence.
    assert signal_evidence([])[SIGNAL_METRIC] == {"candidate": [], "baseline": [], "paired": True, "covariate": []}
    # Real sessions only, when there are any; synthetic ones otherwise (a simulation study's).
    synthetic = of("u9", 0.0, 0.9, [5.0]) | {"synthetic": True}
    assert signal_evidence([*labels, synthetic])[SIGNAL_METRIC]["candidate"] == evidence["candidate"]
    assert signal_evidence([synthetic])[SIGNAL_METRIC]["candidate"] == [pytest.approx(5.0)]
