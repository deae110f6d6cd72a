"""The labeler's engine types from stored labels and manifests, and their messages."""

from __future__ import annotations

import json
from typing import Any

from emili.labeler.v1 import labeler_pb2
from emili_labeler.codec import dataset_to_pb, session_label_to_pb, text_scores_to_pb
from emili_labeler.engine import Dataset, SessionLabel, TextScore, TextScores, Vad

LABEL: dict[str, Any] = {
    "session_id": "s1",
    "user_id": "alice",
    "model_arm": "base",
    "use_for_training": True,
    "synthetic": False,
    "gold": {
        "pre": {"valence": 0.2, "arousal": 0.5, "dominance": 0.4},
        "post": {"valence": 0.7, "arousal": 0.4, "dominance": 0.5},
        "delta": {"valence": 0.5, "arousal": -0.1, "dominance": 0.1},
        "pre_coverage": 0.5,
        "post_coverage": 0.6,
        "lexicon": "nrc-vad",
    },
    "turns": [
        {"turn_id": "t1", "flagged": True, "delta": 0.3, "reason": "flagged", "unprompted": False},
        {"turn_id": None, "flagged": False, "delta": None, "reason": "no_post_readings", "unprompted": True},
    ],
    "settings": {},
    "settings_hash": "abc",
    "key": "s1/labels/abc.json",
    "source_last_event_id": "9-0",
}


def test_session_label() -> None:
    message = session_label_to_pb(SessionLabel.from_json(LABEL))
    assert (message.session_id, message.user_id, message.lexicon, message.key) == (
        "s1",
        "alice",
        "nrc-vad",
        LABEL["key"],
    )
    assert message.delta.valence == 0.5 and message.pre.valence == 0.2
    first, second = message.turns
    assert first.flagged and first.HasField("delta") and first.delta == 0.3
    assert second.turn_id == "" and not second.flagged and not second.HasField("delta")


def test_a_label_without_survey_text_has_no_vad() -> None:
    gold = {**LABEL["gold"], "post": None, "delta": None}
    message = session_label_to_pb(SessionLabel.from_json({**LABEL, "gold": gold}))
    assert message.HasField("pre") and not message.HasField("post") and not message.HasField("delta")


def test_text_scores() -> None:
    scores = TextScores((TextScore(Vad(0.8, 0.5, 0.6), 1.0, ("love",)), TextScore(None, 0.0, ())), "nrc-vad", "softmax")
    message = text_scores_to_pb(scores)
    assert message.lexicon == "nrc-vad" and message.oov_method == "softmax"
    assert message.scores[0].vad.valence == 0.8 and list(message.scores[0].tokens) == ["love"]
    assert not message.scores[1].HasField("vad")


def test_dataset() -> None:
    manifest = {
        "id": "d1",
        "kind": "dpo_feedback",
        "content_hash": "h",
        "counts": {"pairs": 3},
        "source_sessions": ["s1"],
        "label_settings": {"b": 1, "a": 2},
        "created_from": {},
        "key": "dpo_feedback/d1/data.jsonl",
    }
    message = dataset_to_pb(Dataset.from_manifest(manifest))
    assert message.kind == labeler_pb2.DATASET_KIND_DPO_FEEDBACK and dict(message.counts) == {"pairs": 3}
    assert message.label_settings_json == json.dumps({"a": 2, "b": 1}) and message.key == manifest["key"]
