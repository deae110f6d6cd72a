"""Reaction flags: hand-computed windows, scores and deltas for both built-in weight vectors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from emili_labeler.reactions import (
    EMOTION_TUNE_ORIGINAL,
    POPULATION_MEAN_2025,
    VARIANT_2025,
    VARIANT_2025_ZSCORED,
    TurnReaction,
    WeightVector,
    WindowSettings,
    fer_gaps,
    flag_turns,
)
from emili_session.emotions import EMOTIONS

T0 = 1_700_000_000_000  # Unix ms.
A = T0 + 4_000  # The assistant reply finishes 4 s after the user message.
ARRIVAL_MS = 30  # A reading's event is recorded a little after its capture.

Event = dict[str, Any]


def reading(capture_ms: int, probs: dict[str, float], face_found: bool = True) -> Event:
    return {
        "kind": "fer_reading",
        "time_ms": capture_ms + ARRIVAL_MS,
        "capture_time_ms": capture_ms,
        "face_found": face_found,
        "probabilities": probs if face_found else {},
        "source": "client",
    }


def fer(capture_ms: int, **probs: float) -> Event:
    return reading(capture_ms, probs)


def no_face(capture_ms: int) -> Event:
    return reading(capture_ms, {}, face_found=False)


def user(time_ms: int, text: str = "I had a rough day", client_time_ms: int | None = None) -> Event:
    return {"kind": "user_message", "time_ms": time_ms, "text": text, "client_time_ms": client_time_ms or time_ms}


def assistant(time_ms: int, turn_id: str = "t1", text: str = "That sounds hard.", unprompted: bool = False) -> Event:
    return {
        "kind": "assistant_message",
        "time_ms": time_ms,
        "text": text,
        "turn_id": turn_id,
        "unprompted": unprompted,
        "model_id": "smollm2-135m",
        "model_arm": "base",
    }


def post_reading(turn_id: str, scores: dict[str, int] | None, delay_s: float = 5.0, at: int = A + 5_000) -> Event:
    return {"kind": "post_response_reading", "time_ms": at, "turn_id": turn_id, "delay_s": delay_s, "scores": scores}


def session(*events: Event) -> list[Event]:
    """Events in recording order, with ids."""
    ordered = sorted(events, key=lambda e: e["time_ms"])
    return [{**e, "event_id": f"{e['time_ms']}-{i}"} for i, e in enumerate(ordered)]


def only(reactions: list[TurnReaction]) -> TurnReaction:
    assert len(reactions) == 1
    return reactions[0]


# Pre window around the user message at T0: [T0 - 500, T0 + 500]; post window [A, A + 1000].
PRE_READINGS = (
    fer(T0 - 501, angry=1.0),  # Just outside.
    fer(T0 - 500, happy=0.2, neutral=0.8),
    fer(T0 + 500, happy=0.4, neutral=0.4, sad=0.2),
    fer(T0 + 501, disgust=1.0),  # Just outside.
)
POST_READINGS = (
    fer(A - 1, fear=1.0),  # Before the reply finished.
    fer(A, happy=0.5, neutral=0.5),
    fer(A + 1_000, happy=0.3, neutral=0.5, surprise=0.2),
    fer(A + 1_001, disgust=1.0),
)


def test_builtin_weight_vectors_match_the_reference() -> None:
    assert dict(zip(EMOTIONS, EMOTION_TUNE_ORIGINAL.weights, strict=True)) == {
        "angry": -2.0,
        "disgust": -5.0,
        "fear": -2.0,
        "happy": 5.0,
        "sad": -2.0,
        "surprise": 1.0,
        "neutral": 1.0,
    }
    assert (EMOTION_TUNE_ORIGINAL.scale, EMOTION_TUNE_ORIGINAL.threshold) == ("percent", 0.0)
    assert not EMOTION_TUNE_ORIGINAL.zscored
    assert VARIANT_2025.weights == (-1.5, -5.0, -1.0, 1.0, -1.0, 0.0, 0.3)
    assert (VARIANT_2025.scale, VARIANT_2025.threshold) == ("unit", 0.1)
    assert not VARIANT_2025.zscored  # The 2025 code flagged on plain normalised scores.
    assert VARIANT_2025_ZSCORED.weights == VARIANT_2025.weights
    assert (VARIANT_2025_ZSCORED.scale, VARIANT_2025_ZSCORED.threshold) == ("unit", 0.1)
    assert VARIANT_2025_ZSCORED.zscore_mean == (0.128, 0.022, 0.061, 0.028, 0.147, 0.006, 0.608)
    assert VARIANT_2025_ZSCORED.zscore_std == (0.068, 0.035, 0.041, 0.08, 0.078, 0.019, 0.174)


def test_original_weights_hand_computed() -> None:
    events = session(user(T0), *PRE_READINGS, assistant(A), *POST_READINGS)
    r = only(flag_turns(events, EMOTION_TUNE_ORIGINAL))
    # Pre mean: happy (20+40)/2 = 30, neutral (80+40)/2 = 60, sad 20/2 = 10 (percent).
    assert r.pre_scores == pytest.approx({**dict.fromkeys(EMOTIONS, 0.0), "happy": 30.0, "neutral": 60.0, "sad": 10.0})
    # Post mean: happy 40, neutral 50, surprise 10.
    assert r.post_scores == pytest.approx(
        {**dict.fromkeys(EMOTIONS, 0.0), "happy": 40.0, "neutral": 50.0, "surprise": 10.0}
    )
    assert r.pre_reaction == pytest.approx(5 * 30 + 60 - 2 * 10)  # 190
    assert r.post_reaction == pytest.approx(5 * 40 + 50 + 10)  # 260
    assert r.delta == pytest.approx(70.0)
    assert (r.flagged, r.reason, r.n_pre, r.n_post) == (True, "flagged", 2, 2)
    assert (r.turn_id, r.user_text, r.assistant_text) == ("t1", "I had a rough day", "That sounds hard.")
    assert (r.model_id, r.model_arm, r.weight_name, r.scale) == (
        "smollm2-135m",
        "base",
        "emotion_tune_original",
        "percent",
    )
    assert (r.pre_anchor, r.post_mode, r.post_source, r.unprompted) == ("user_message", "window", "fer_window", False)


@pytest.mark.parametrize(
    ("post", "flagged", "reason", "delta"),
    [
        ({"neutral": 1.0}, True, "flagged", 0.0),  # 100 - 5*20: exactly the threshold flags (>=).
        ({"neutral": 0.9, "sad": 0.1}, False, "below_threshold", -30.0),  # 90 - 20 - 100
    ],
)
def test_original_threshold_is_inclusive(post: dict[str, float], flagged: bool, reason: str, delta: float) -> None:
    events = session(user(T0), fer(T0, happy=0.2), assistant(A), reading(A + 500, post))
    r = only(flag_turns(events, EMOTION_TUNE_ORIGINAL))
    assert r.pre_reaction == pytest.approx(100.0)
    assert r.delta == pytest.approx(delta, abs=1e-9)
    assert (r.flagged, r.reason) == (flagged, reason)


def test_variant_2025_zscored_zscores_before_weighting() -> None:
    mean = dict(zip(EMOTIONS, POPULATION_MEAN_2025, strict=True))
    after = {**mean, "happy": 0.028 + 0.08, "neutral": 0.608 - 0.08}  # One happy std up, 0.08 taken from neutral.
    events = session(user(T0), reading(T0, mean), assistant(A), reading(A + 200, after))

    r = only(flag_turns(events, VARIANT_2025_ZSCORED))
    assert r.pre_scores == pytest.approx(mean)  # Reported in the vector's 0-1 scale, before z-scoring.
    assert r.pre_reaction == pytest.approx(0.0, abs=1e-12)  # The population mean z-scores to 0.
    # z_happy = +1 (weight 1.0), z_neutral = -0.08 / 0.174 (weight 0.3).
    assert r.post_reaction == pytest.approx(1.0 - 0.3 * 0.08 / 0.174)
    assert r.delta == pytest.approx(0.862069, abs=1e-6)
    assert r.flagged and r.weight_name == "variant_2025_zscored" and r.scale == "unit"

    plain = only(flag_turns(events, VARIANT_2025))
    expected_pre = -1.5 * 0.128 - 5.0 * 0.022 - 1.0 * 0.061 + 0.028 - 0.147 + 0.3 * 0.608
    assert plain.pre_reaction == pytest.approx(expected_pre)
    assert plain.delta == pytest.approx(0.08 - 0.3 * 0.08)  # 0.056 < 0.1 on plain 0-1 scores.
    assert (plain.flagged, plain.reason, plain.weight_name) == (False, "below_threshold", "variant_2025")


def test_variant_threshold_boundary() -> None:
    # Unscaled: a happy rise of exactly 0.1 gives delta 0.1 = the threshold.
    events = session(user(T0), fer(T0, neutral=0.0, sad=0.5), assistant(A), fer(A, happy=0.1, sad=0.5))
    r = only(flag_turns(events, VARIANT_2025))
    assert r.delta == pytest.approx(0.1)
    assert r.flagged


@pytest.mark.parametrize(
    ("offset_ms", "counted"),
    [(-501, 0), (-500, 1), (0, 1), (500, 1), (501, 0)],
)
def test_pre_window_is_closed_half_second_each_side(offset_ms: int, counted: int) -> None:
    events = session(user(T0), fer(T0 + offset_ms, happy=1.0), assistant(A), fer(A, happy=1.0))
    r = only(flag_turns(events, EMOTION_TUNE_ORIGINAL))
    assert r.n_pre == counted
    assert r.flaggable is bool(counted)


@pytest.mark.parametrize(
    ("offset_ms", "counted"),
    [(-1, 0), (0, 1), (999, 1), (1_000, 1), (1_001, 0)],
)
def test_post_window_is_closed_t_to_t_plus_1s(offset_ms: int, counted: int) -> None:
    events = session(user(T0), fer(T0, happy=1.0), assistant(A), fer(A + offset_ms, happy=1.0))
    r = only(flag_turns(events, EMOTION_TUNE_ORIGINAL))
    assert r.n_post == counted
    assert r.reason == ("flagged" if counted else "no_post_readings")


def test_window_settings_are_seconds_applied_to_millisecond_times() -> None:
    windows = WindowSettings(user_before_s=2.0, user_after_s=0.0, post_end_s=1.5)
    events = session(
        user(T0),
        fer(T0 - 2_001, disgust=1.0),
        fer(T0 - 2_000, happy=1.0),
        fer(T0 + 1, disgust=1.0),
        assistant(A),
        fer(A + 1_500, neutral=1.0),
        fer(A + 1_501, disgust=1.0),
    )
    r = only(flag_turns(events, EMOTION_TUNE_ORIGINAL, windows))
    assert (r.n_pre, r.n_post) == (1, 1)
    assert r.pre_reaction == pytest.approx(500.0)
    assert r.post_reaction == pytest.approx(100.0)


@pytest.mark.parametrize("divisor", [1_000, 100])  # Capture times in seconds or deciseconds.
def test_reading_times_not_in_milliseconds_are_rejected(divisor: int) -> None:
    bad = {**fer(T0, happy=1.0), "capture_time_ms": T0 // divisor}
    events = session(user(T0), bad, assistant(A), fer(A, happy=1.0))
    with pytest.raises(ValueError, match="milliseconds"):
        flag_turns(events, EMOTION_TUNE_ORIGINAL)
    unchecked = only(flag_turns(events, EMOTION_TUNE_ORIGINAL, WindowSettings(max_clock_skew_s=None)))
    assert unchecked.reason == "no_pre_readings"  # Read as ms, the reading lands decades before the message.


def test_percent_probabilities_are_rejected() -> None:
    events = session(user(T0), fer(T0, happy=60.0, neutral=40.0), assistant(A))
    with pytest.raises(ValueError, match="0-1"):
        flag_turns(events, EMOTION_TUNE_ORIGINAL)


def test_readings_out_of_capture_order_are_sorted() -> None:
    late_first = {**fer(T0 + 400, happy=1.0), "time_ms": T0 - 600}  # Recorded before an earlier capture.
    events = session(user(T0), late_first, fer(T0 - 400, neutral=1.0), assistant(A), fer(A, happy=1.0))
    r = only(flag_turns(events, EMOTION_TUNE_ORIGINAL))
    assert r.n_pre == 2
    assert r.pre_reaction == pytest.approx((500.0 + 100.0) / 2)


def test_no_face_readings_make_the_turn_unflaggable() -> None:
    events = session(user(T0), no_face(T0), assistant(A), fer(A, happy=1.0))
    r = only(flag_turns(events, EMOTION_TUNE_ORIGINAL))
    assert (r.pre_scores, r.pre_reaction, r.delta) == (None, None, None)
    assert (r.flagged, r.reason, r.n_pre, r.n_post, r.flaggable) == (False, "no_pre_readings", 0, 1, False)
    assert r.post_reaction == pytest.approx(500.0)

    events = session(user(T0), fer(T0, happy=1.0), assistant(A), no_face(A + 100))
    r = only(flag_turns(events, EMOTION_TUNE_ORIGINAL))
    assert (r.post_scores, r.delta, r.flagged, r.reason, r.post_source) == (None, None, False, "no_post_readings", None)


def test_reply_without_a_user_message_is_unflaggable() -> None:
    events = session(fer(A - 200, happy=1.0), assistant(A), fer(A, happy=1.0))
    r = only(flag_turns(events, EMOTION_TUNE_ORIGINAL))
    assert (r.flagged, r.reason, r.user_text, r.delta) == (False, "no_user_message", None, None)


def test_each_turn_uses_its_own_preceding_user_message() -> None:
    u2, a2 = A + 10_000, A + 14_000
    events = session(
        user(T0, "first"),
        fer(T0, neutral=1.0),
        assistant(A, "t1"),
        fer(A, neutral=1.0),
        user(u2, "second"),
        fer(u2, happy=1.0),
        assistant(a2, "t2"),
        fer(a2, neutral=1.0),
    )
    first, second = flag_turns(events, EMOTION_TUNE_ORIGINAL)
    assert (first.turn_id, first.user_text, first.delta, first.flagged) == ("t1", "first", 0.0, True)
    assert (second.turn_id, second.user_text) == ("t2", "second")
    assert second.delta == pytest.approx(100.0 - 500.0)
    assert not second.flagged


def test_client_time_option_uses_the_client_clock() -> None:
    message = user(T0 + 300, client_time_ms=T0)  # Recorded by the server 300 ms after the client sent it.
    events = session(message, fer(T0 - 500, happy=1.0), assistant(A), fer(A, happy=1.0))
    assert only(flag_turns(events, EMOTION_TUNE_ORIGINAL)).n_pre == 0
    assert only(flag_turns(events, EMOTION_TUNE_ORIGINAL, WindowSettings(user_time="client"))).n_pre == 1
    unset = {**user(T0), "client_time_ms": 0}  # Protobuf's unset value: back to the server time.
    events = session(unset, fer(T0 - 500, happy=1.0), assistant(A), fer(A, happy=1.0))
    assert only(flag_turns(events, EMOTION_TUNE_ORIGINAL, WindowSettings(user_time="client"))).n_pre == 1


def delayed_session(*extra: Event) -> list[Event]:
    return session(user(T0), fer(T0, happy=0.3, neutral=0.6, sad=0.1), assistant(A), *extra)


def test_delayed_mode_uses_the_post_response_reading() -> None:
    events = delayed_session(fer(A + 5_000, disgust=1.0), post_reading("t1", {"happy": 60, "neutral": 40}))
    r = only(flag_turns(events, EMOTION_TUNE_ORIGINAL, post="delayed"))
    assert r.pre_reaction == pytest.approx(190.0)
    assert r.post_scores == pytest.approx({**dict.fromkeys(EMOTIONS, 0.0), "happy": 60.0, "neutral": 40.0})
    assert r.post_reaction == pytest.approx(5 * 60 + 40)
    assert r.delta == pytest.approx(150.0)
    assert (r.flagged, r.post_mode, r.post_source, r.n_post) == (True, "delayed", "post_response_reading", 1)

    # The same turn in window mode has no reading in [A, A + 1 s].
    assert only(flag_turns(events, EMOTION_TUNE_ORIGINAL)).reason == "no_post_readings"


def test_delayed_mode_falls_back_to_readings_around_t_plus_5s() -> None:
    around = (
        fer(A + 4_499, disgust=1.0),
        fer(A + 4_500, happy=1.0),
        fer(A + 5_500, neutral=1.0),
        fer(A + 5_501, disgust=1.0),
    )
    for extra in ((), (post_reading("t1", None),), (post_reading("t1", {"disgust": 100}, delay_s=3.0),)):
        r = only(flag_turns(delayed_session(*around, *extra), EMOTION_TUNE_ORIGINAL, post="delayed"))
        assert (r.post_source, r.n_post) == ("fer_window", 2), extra
        assert r.post_reaction == pytest.approx((500.0 + 100.0) / 2)
        assert r.delta == pytest.approx(300.0 - 190.0)
    nothing = only(flag_turns(delayed_session(post_reading("t1", None)), EMOTION_TUNE_ORIGINAL, post="delayed"))
    assert (nothing.reason, nothing.post_source) == ("no_post_readings", None)


def test_delayed_mode_with_the_zscored_2025_variant() -> None:
    mean = dict(zip(EMOTIONS, POPULATION_MEAN_2025, strict=True))
    later = {"angry": 13, "disgust": 2, "fear": 6, "happy": 11, "sad": 15, "surprise": 1, "neutral": 52}
    events = session(user(T0), reading(T0, mean), assistant(A), post_reading("t1", later))
    r = only(flag_turns(events, VARIANT_2025_ZSCORED, post="delayed"))
    # Scores 0-100 become 0-1, then z = (after - mean) / std; the pre reading is the mean (z = 0).
    expected = (
        -1.5 * (0.13 - 0.128) / 0.068
        - 5.0 * (0.02 - 0.022) / 0.035
        - 1.0 * (0.06 - 0.061) / 0.041
        + 1.0 * (0.11 - 0.028) / 0.08
        - 1.0 * (0.15 - 0.147) / 0.078
        + 0.0 * (0.01 - 0.006) / 0.019
        + 0.3 * (0.52 - 0.608) / 0.174
    )
    assert r.delta == pytest.approx(expected)
    assert r.flagged


def test_unprompted_turn_reads_the_second_before_it() -> None:
    b = T0 + 20_000
    events = session(
        user(T0, "hi"),
        fer(T0, disgust=1.0),
        fer(b - 1_001, disgust=1.0),
        fer(b - 1_000, happy=0.1, neutral=0.9),
        fer(b - 1, happy=0.3, neutral=0.7),
        assistant(b, "u1", "You look happier!", unprompted=True),
        fer(b, happy=0.8, neutral=0.2),  # Post only: the pre window [b - 1 s, b) is open at b.
        fer(b + 1_000, happy=0.6, neutral=0.4),
    )
    r = only(flag_turns(events, EMOTION_TUNE_ORIGINAL))
    assert (r.unprompted, r.pre_anchor, r.user_text) == (True, "before_assistant", "hi")
    assert (r.n_pre, r.n_post) == (2, 2)
    assert r.pre_reaction == pytest.approx(5 * 20 + 80)
    assert r.post_reaction == pytest.approx(5 * 70 + 30)
    assert r.delta == pytest.approx(200.0)
    assert r.flagged
    assert flag_turns(events, EMOTION_TUNE_ORIGINAL, WindowSettings(include_unprompted=False)) == []


def test_reaction_is_json_serialisable() -> None:
    events = session(user(T0), *PRE_READINGS, assistant(A), *POST_READINGS)
    data = json.loads(json.dumps(only(flag_turns(events, EMOTION_TUNE_ORIGINAL)).to_dict()))
    assert data["flagged"] is True and data["delta"] == pytest.approx(70.0) and data["turn_id"] == "t1"


def test_weight_vector_validation_and_scoring() -> None:
    with pytest.raises(ValueError, match="7 values"):
        WeightVector("short", (1.0,) * 6)
    with pytest.raises(ValueError, match="positive"):
        WeightVector("bad", (1.0,) * 7, "unit", 0.0, (0.0,) * 7, (1.0,) * 6 + (0.0,))
    with pytest.raises(ValueError, match="together"):
        WeightVector("bad", (1.0,) * 7, "unit", 0.0, (0.0,) * 7, None)
    with pytest.raises(ValueError, match="unknown emotions"):
        WeightVector.from_mapping("bad", {"joy": 1.0})
    with pytest.raises(ValueError, match="post must be"):
        flag_turns([], EMOTION_TUNE_ORIGINAL, post="later")  # type: ignore[arg-type]
    assert VARIANT_2025_ZSCORED.score(np.array(POPULATION_MEAN_2025)) == pytest.approx(0.0, abs=1e-12)
    assert EMOTION_TUNE_ORIGINAL.score(np.array([0, 0, 0, 0.5, 0, 0, 0.5])) == pytest.approx(300.0)


def fer_down(since_ms: int, at: int | None = None) -> Event:
    return {"kind": "fer_unavailable", "time_ms": at or since_ms + 100, "since_ms": since_ms, "error": "UNAVAILABLE"}


def fer_back(restored_ms: int) -> Event:
    return {"kind": "fer_restored", "time_ms": restored_ms + ARRIVAL_MS, "restored_ms": restored_ms, "reconnects": 2}


def test_fer_gaps_pair_unavailable_with_restored() -> None:
    events = session(fer_down(T0), fer_back(T0 + 3_000), fer_down(A, at=A + 50), fer_down(A + 60))
    assert fer_gaps(events) == [(T0, T0 + 3_000), (A, float("inf"))]  # A repeated "down" does not open a new gap.
    assert fer_gaps(session(user(T0))) == []


def test_a_window_in_a_fer_gap_is_unflaggable_not_no_face() -> None:
    # FER went down after the user message and came back 3 s later, before the reply: the pre window is known.
    ok = session(
        user(T0), fer(T0, happy=1.0), fer_down(T0 + 600), fer_back(T0 + 3_000), assistant(A), fer(A, happy=0.5)
    )
    assert only(flag_turns(ok, EMOTION_TUNE_ORIGINAL)).reason == "below_threshold"

    # Down from just before the reply until after its post window: the post window is unknown, not "no face".
    events = session(
        user(T0), fer(T0, happy=1.0), fer_down(A - 200), assistant(A), fer_back(A + 2_000), fer(A + 2_100, happy=0.1)
    )
    r = only(flag_turns(events, EMOTION_TUNE_ORIGINAL))
    assert (r.flagged, r.reason, r.delta, r.flaggable, r.post_scores) == (False, "fer_unavailable", None, False, None)

    # A gap that only partly covers the pre window makes the turn unflaggable even with a reading in the window.
    events = session(fer_down(T0 - 2_000), fer_back(T0 - 100), fer(T0, happy=1.0), user(T0), assistant(A), fer(A))
    assert only(flag_turns(events, EMOTION_TUNE_ORIGINAL)).reason == "fer_unavailable"

    # Never restored: every later window is in the gap; a no-face reading recorded there changes nothing.
    events = session(user(T0), fer(T0, happy=1.0), fer_down(A - 2_000), no_face(A + 10), assistant(A))
    assert only(flag_turns(events, EMOTION_TUNE_ORIGINAL)).reason == "fer_unavailable"


def test_delayed_reading_taken_while_fer_was_down_is_not_used() -> None:
    down = {**post_reading("t1", None), "fer_unavailable": True}
    events = delayed_session(fer_down(A + 3_000), down)
    r = only(flag_turns(events, EMOTION_TUNE_ORIGINAL, post="delayed"))
    assert (r.reason, r.post_source, r.delta) == ("fer_unavailable", None, None)
    # Marked unavailable but with scores (a stale aggregate) is not used either.
    stale = {**post_reading("t1", {"happy": 100}), "fer_unavailable": True}
    r = only(flag_turns(delayed_session(stale), EMOTION_TUNE_ORIGINAL, post="delayed"))
    assert (r.reason, r.post_source) == ("no_post_readings", None)
