"""Gold labels and the per-arm table against hand-computed examples."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from emili_affect.vad import VAD, TextVAD
from emili_core.keys import session_record_keys
from emili_core.objectstore import Bucket
from emili_core.settings import S3Settings
from emili_labeler import jobs, pipeline_steps
from emili_labeler.gold import GoldLabel, arm_table, gold_label, survey_texts
from emili_labeler.runtime import build_runtime
from emili_labeler.settings import LabelerSettings
from emili_session.events import Event, EventKind

T0 = 1_790_000_000_000

WORDS = {"tired": VAD(0.2, 0.3, 0.4), "better": VAD(0.8, 0.5, 0.6), "calm": VAD(0.7, 0.1, 0.5)}


class FakeScorer:
    """Mean of known word values; the real scorer is tested in libs/affect/tests/test_vad_*."""

    def score_batch(self, texts: Sequence[str]) -> list[TextVAD]:
        results = []
        for text in texts:
            found = [w for w in (word.strip(".,") for word in text.lower().split()) if w in WORDS]
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


# --- what is scored: free text, ticked feelings, or both -------------------------------------------------------

FEELINGS_ONLY = [
    {"kind": "pre_survey", "current_feelings": ["Tired"], "desired_feelings": ["Calm"], "text": ""},
    {"kind": "post_survey", "current_feelings": ["Better", "Calm"], "desired_feelings": [], "text": ""},
]


def test_feelings_alone_give_gold_labels() -> None:
    label = gold_label(FEELINGS_ONLY, FakeScorer())
    assert label.pre == VAD(0.2, 0.3, 0.4)  # "tired": the desired "calm" is a wish, not how the user feels.
    assert label.post == pytest.approx(VAD(0.75, 0.3, 0.55))
    assert label.missing == [] and label.delta is not None
    free_text_only = gold_label(FEELINGS_ONLY, FakeScorer(), "free_text")
    assert free_text_only.pre is None and free_text_only.post is None
    assert free_text_only.missing == ["pre", "post"] and free_text_only.to_json()["missing"] == ["pre", "post"]


def test_feelings_and_free_text_are_scored_together() -> None:
    events = [{"kind": "pre_survey", "current_feelings": ["Tired"], "text": "calm"}]
    assert survey_texts(events, "both") == ("tired. calm", None)
    assert survey_texts(events, "feelings") == ("tired", None)
    assert survey_texts(events, "free_text") == ("calm", None)
    both = gold_label(events, FakeScorer(), "both")
    assert both.pre == pytest.approx(VAD(0.45, 0.2, 0.45))  # The mean over both words.
    assert gold_label(events, FakeScorer(), "feelings").pre == VAD(0.2, 0.3, 0.4)
    assert both.missing == ["post"]
    with pytest.raises(ValueError, match="gold text source"):
        survey_texts(events, "everything")  # type: ignore[arg-type]


def test_a_resubmitted_survey_replaces_the_first_feelings_too() -> None:
    events = [
        {"kind": "pre_survey", "current_feelings": ["Tired"], "text": ""},
        {"kind": "pre_survey", "current_feelings": ["Calm"], "text": ""},
    ]
    assert survey_texts(events) == ("calm", None)


# --- the labelling jobs count and list sessions without gold labels ----------------------------------------------


def _store_surveyed_session(store: Any, session_id: str, pre: dict[str, Any], post: dict[str, Any]) -> None:
    events = [
        Event(f"{T0}-0", EventKind.SESSION_CREATED, T0, {"model_arm": "base", "model_id": "x", "options": {}}),
        Event(f"{T0 + 1}-0", EventKind.PRE_SURVEY, T0 + 1, {"desired_feelings": [], **pre}),
        Event(f"{T0 + 2}-0", EventKind.POST_SURVEY, T0 + 2, {"desired_feelings": [], **post}),
    ]
    keys = session_record_keys(session_id)
    store.put_bytes(
        Bucket.SESSIONS, keys["events.jsonl"], "".join(json.dumps(e.to_json()) + "\n" for e in events).encode()
    )
    manifest = {"session_id": session_id, "user_id": "u", "model_arm": "base", "use_for_training": True}
    store.put_json(Bucket.SESSIONS, keys["session.json"], {**manifest, "last_event_id": events[-1].event_id})


@pytest.mark.integration
def test_sessions_without_gold_labels_are_counted_and_listed(s3_settings: S3Settings) -> None:
    settings = LabelerSettings(s3=s3_settings)
    runtime = build_runtime(
        settings.model_copy(update={"labeler": settings.labeler.model_copy(update={"oov_method": "none"})})
    )
    ticked = {"current_feelings": ["Sad"], "text": ""}
    _store_surveyed_session(runtime.store, "gold-ticked", ticked, {"current_feelings": ["Happy"], "text": ""})
    _store_surveyed_session(runtime.store, "gold-blank", ticked, {"current_feelings": [], "text": ""})
    state = {"sessions": ["gold-ticked", "gold-blank"]}

    result = pipeline_steps.label(runtime, state)  # type: ignore[arg-type]

    assert result["labelled"] == 2 and result["missing_gold"] == 1
    assert result["missing_gold_sessions"] == {"gold-blank": ["post"]}
    assert any("no pre- or post-chat VAD" in note for note in result["notes"])
    table = jobs.delta_table(runtime, state["sessions"])
    assert table["missing_gold_sessions"] == {"gold-blank": ["post"]} and table["arms"]["base · real"]["n"] == 1
    assert runtime.label_settings["gold_text_source"] == "both"


@pytest.mark.integration
def test_a_survey_that_says_better_scores_above_one_that_says_worse(s3_settings: S3Settings) -> None:
    """The shipped lexicon (Warriner's) rates lemmas: "better" and "worse" are read as "good" and "bad"."""
    settings = LabelerSettings(s3=s3_settings)

    def runtime(lemmatize: bool) -> Any:
        options = settings.labeler.model_copy(update={"oov_method": "none", "lemmatize": lemmatize})
        return build_runtime(settings.model_copy(update={"labeler": options}))

    with_lemmas, without = runtime(True), runtime(False)
    better, worse = (f"I feel {w} than before the chat." for w in ("better", "worse"))
    scored = with_lemmas.scorer.score_batch([better, worse])
    assert scored[0].vad.valence > scored[1].vad.valence + 0.15
    assert "good" in scored[0].tokens and "bad" in scored[1].tokens
    plain = without.scorer.score_batch([better, worse])
    assert plain[0].vad == plain[1].vad  # Both words unknown: only "feel" and "chat" are scored.
    # A label depends on it: labels made either way are kept apart.
    assert with_lemmas.label_settings["lemmatize"] is True and without.label_settings["lemmatize"] is False
    assert with_lemmas.settings_hash != without.settings_hash
