"""Readouts against reference EMILI.md section 3: salience table, line and message format, aggregation, trigger."""

from __future__ import annotations

import math
import re

import pytest

from emili_chat.readout import (
    SALIENCE_TABLE,
    SHORT_MESSAGE_CHARS,
    Aggregator,
    ChangeTrigger,
    change_is_large,
    format_line,
    readout_message,
    salience_level,
    salience_word,
    short_message_reminder,
    to_scores,
)
from emili_session.emotions import EMOTIONS

# The reference table, typed out again here (not read from the module) so that a typo there fails a test.
REFERENCE_TABLE: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
    "angry": ((5, 30, 40, 60, 80), ("Annoyed", "Pissed", "Angry", "Furious", "Enraged")),
    "disgust": ((1, 5, 15, 40, 60), ("Unsatisfied", "Displeased", "Disgusted", "Revolted", "Totally grossed out")),
    "fear": ((8, 20, 30, 50, 70), ("Uneasy", "Worried", "Anxious", "Fearful", "Terrified")),
    "happy": ((10, 30, 40, 70, 90), ("Contented", "Pleased", "Happy", "Elated", "Ecstatic")),
    "sad": ((5, 20, 30, 60, 80), ("Down", "Melancholy", "Sad", "Despondent", "Anguished")),
    "surprise": ((3, 20, 35, 50, 70), ("Mildly surprised", "Surprised", "Taken aback", "Astonished", "Flabbergasted")),
    "neutral": ((10, 50, 60, 75, 88), ("Neutral", "Calm", "Relaxed", "Serene", "Totally Zen")),
}

BOUNDARIES = [
    (emotion, level, threshold, word)
    for emotion, (thresholds, words) in REFERENCE_TABLE.items()
    for level, (threshold, word) in enumerate(zip(thresholds, words, strict=True), start=1)
]

FACTOR = 2**-0.5  # 0.5 ** (0.5 s / 1 s): the per-tick decay.


# --- salience table -------------------------------------------------------------------------------------------


def test_emotions_are_in_fer2013_order() -> None:
    assert EMOTIONS == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def test_table_matches_the_reference() -> None:
    assert set(SALIENCE_TABLE) == set(REFERENCE_TABLE)
    for emotion, (thresholds, words) in REFERENCE_TABLE.items():
        assert SALIENCE_TABLE[emotion].thresholds == thresholds
        assert SALIENCE_TABLE[emotion].words == words


@pytest.mark.parametrize(("emotion", "level", "threshold", "word"), BOUNDARIES)
def test_threshold_must_be_strictly_exceeded(emotion: str, level: int, threshold: int, word: str) -> None:
    # Equal to the threshold: still the level below.
    assert salience_level(emotion, threshold) == level - 1
    below_word = None if level == 1 else REFERENCE_TABLE[emotion][1][level - 2]
    assert salience_word(emotion, threshold) == below_word
    # One point above (and a fraction above): this level and its word.
    assert salience_level(emotion, threshold + 1) == level
    assert salience_word(emotion, threshold + 1) == word
    assert salience_level(emotion, threshold + 0.01) == level


@pytest.mark.parametrize("emotion", EMOTIONS)
def test_zero_and_hundred(emotion: str) -> None:
    assert salience_level(emotion, 0) == 0
    assert salience_word(emotion, 0) is None
    assert salience_level(emotion, 100) == 5
    assert salience_word(emotion, 100) == REFERENCE_TABLE[emotion][1][4]


def test_unknown_emotion_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown emotion"):
        salience_level("contempt", 50)
    with pytest.raises(ValueError, match="unknown emotion"):
        format_line({"Happy": 50})  # Case matters: the keys are FER class names.


# --- line -------------------------------------------------------------------------------------------------------


def test_reference_example_line() -> None:
    assert format_line({"happy": 46, "neutral": 28}) == "HAPPY (46) Neutral (28)"


def test_only_the_top_word_is_upper_case() -> None:
    assert format_line({"neutral": 28, "happy": 46}) == "HAPPY (46) Neutral (28)"
    assert format_line({"happy": 15, "neutral": 90}) == "TOTALLY ZEN (90) Contented (15)"
    assert format_line({"disgust": 70, "surprise": 10}) == "TOTALLY GROSSED OUT (70) Mildly surprised (10)"


def test_sorted_by_score_descending_and_non_salient_omitted() -> None:
    scores = {"angry": 5, "disgust": 2, "fear": 8, "happy": 0, "sad": 25, "surprise": 10, "neutral": 50}
    # angry 5 and fear 8 equal their first thresholds, happy 0 is below: all three are left out.
    assert format_line(scores) == "NEUTRAL (50) Melancholy (25) Mildly surprised (10) Unsatisfied (2)"


def test_ties_keep_fer_order_not_insertion_order() -> None:
    assert format_line({"sad": 30, "happy": 30, "neutral": 40}) == "NEUTRAL (40) Contented (30) Melancholy (30)"
    # A tie at the top: the earlier FER class is the upper-cased one.
    assert format_line({"surprise": 40, "fear": 40}) == "ANXIOUS (40) Taken aback (40)"


def test_nothing_salient_gives_an_empty_line() -> None:
    assert format_line({"angry": 5, "neutral": 10}) == ""


# --- message ----------------------------------------------------------------------------------------------------

NOW = {"angry": 2, "disgust": 0, "fear": 3, "happy": 46, "sad": 4, "surprise": 1, "neutral": 28}
BEFORE = {"happy": 15, "neutral": 80}


def test_message_right_now() -> None:
    # surprise 1 and sad 4 / fear 3 / angry 2 are under their first thresholds; disgust 0 too.
    assert readout_message(NOW) == "Right now, user looks HAPPY (46) Neutral (28)"


def test_message_not_visible() -> None:
    assert readout_message(None) == "User is not visible right now."
    assert readout_message(None, BEFORE, change_detected=True) == "User is not visible right now."


def test_message_after_a_change() -> None:
    assert readout_message(NOW, BEFORE, change_detected=True) == (
        "Previously, user looked SERENE (80) Contented (15)\n"
        "Change in emotions detected!\n"
        "Right now, user looks HAPPY (46) Neutral (28)"
    )


def test_change_wording_needs_both_the_flag_and_a_previous_readout() -> None:
    assert readout_message(NOW, BEFORE) == "Right now, user looks HAPPY (46) Neutral (28)"
    assert readout_message(NOW, None, change_detected=True) == "Right now, user looks HAPPY (46) Neutral (28)"


def test_message_with_nothing_salient_does_not_end_in_a_dangling_looks() -> None:
    assert readout_message({"neutral": 5}) == "Right now, user shows no salient emotion."


# --- scores -----------------------------------------------------------------------------------------------------


def test_to_scores_truncates_and_fills_all_seven() -> None:
    probabilities = {"angry": 0.129, "happy": 0.625, "sad": 0.1, "neutral": 0.146}
    # The original divides and floors: 12.9 -> 12, 62.5 -> 62, 14.6 -> 14; missing emotions score 0.
    assert to_scores(probabilities) == {
        "angry": 12,
        "disgust": 0,
        "fear": 0,
        "happy": 62,
        "sad": 10,
        "surprise": 0,
        "neutral": 14,
    }
    assert list(to_scores(probabilities)) == list(EMOTIONS)


def test_to_scores_does_not_lose_a_point_to_float_error() -> None:
    # 0.29 * 100 is 28.999999999999996 in binary floating point; the score is still 29.
    assert 0.29 * 100.0 < 29.0
    assert to_scores({"happy": 0.29})["happy"] == 29
    assert to_scores({"happy": 0.57})["happy"] == 57


def test_a_score_just_over_a_threshold_is_truncated_onto_it_and_left_out() -> None:
    # 10.6 happy shows as 10, which does not exceed happy's first threshold (10): no "Contented (11)".
    scores = to_scores({"happy": 0.106, "neutral": 0.894})
    assert (scores["happy"], scores["neutral"]) == (10, 89)
    assert readout_message(scores) == "Right now, user looks TOTALLY ZEN (89)"
    # 11.0 is over the threshold and shows.
    assert format_line(to_scores({"happy": 0.11, "neutral": 0.89})) == "TOTALLY ZEN (89) Contented (11)"


def test_to_scores_clamps_float_error_and_rejects_non_probabilities() -> None:
    assert to_scores({"happy": 1.0000001, "sad": -1e-9})["happy"] == 100
    assert to_scores({"happy": 1.0000001, "sad": -1e-9})["sad"] == 0
    with pytest.raises(ValueError):
        to_scores({"happy": 46.0})  # Already x 100.
    with pytest.raises(ValueError):
        to_scores({"happy": math.nan})
    with pytest.raises(ValueError):
        to_scores({"joy": 0.5})


# --- aggregator -------------------------------------------------------------------------------------------------


def only(emotion: str, score: int) -> dict[str, int]:
    return {e: (score if e == emotion else 0) for e in EMOTIONS}


def test_per_tick_factor_is_half_to_the_half() -> None:
    assert Aggregator().per_tick_factor == pytest.approx(0.7071067811865476, abs=1e-15)
    assert Aggregator(tick_seconds=0.25, half_life_seconds=1.0).per_tick_factor == pytest.approx(0.5**0.25)


def test_single_frame_decays_by_half_each_second_until_not_visible() -> None:
    agg = Aggregator()  # epsilon 0.1
    agg.add({"happy": 80}, 0.0)
    expected_weights = [1.0, 0.70710678, 0.5, 0.35355339, 0.25, 0.17677670, 0.125]
    for i, weight in enumerate(expected_weights):
        assert agg.tick(i * 0.5) == only("happy", 80)  # Decay shrinks the weight, never the mean.
        assert agg.weight == pytest.approx(weight, abs=1e-8)
    # 3.5 s: 0.0884 < 0.1 -> not visible.
    assert agg.tick(3.5) is None
    assert agg.weight == pytest.approx(0.08838835, abs=1e-8)
    assert agg.current() is None


def test_epsilon_is_configurable() -> None:
    agg = Aggregator(visibility_epsilon=0.2)
    agg.add({"happy": 80}, 0.0)
    agg.tick(0.0)
    assert agg.tick(2.0) == only("happy", 80)  # 0.25
    assert agg.tick(2.5) is None  # 0.177 < 0.2


def test_weighted_mean_of_two_frames() -> None:
    agg = Aggregator()
    agg.add({"happy": 80}, 0.0)
    agg.tick(0.0)
    agg.tick(0.5)
    agg.add({"happy": 20, "neutral": 80}, 0.9)
    # Tick 1.0: old frame weight 0.5 (sum happy 40), new frame weight 1.
    # happy (40 + 20) / 1.5 = 40, neutral 80 / 1.5 = 53.33 -> 53 (truncated).
    result = agg.tick(1.0)
    assert agg.weight == pytest.approx(1.5)
    assert result == {"angry": 0, "disgust": 0, "fear": 0, "happy": 40, "sad": 0, "surprise": 0, "neutral": 53}
    # Two more ticks: both weights shrink together, the mean stays.
    assert agg.tick(2.0) == result
    assert agg.weight == pytest.approx(0.75)


def test_aggregate_truncates_the_decayed_mean() -> None:
    agg = Aggregator()
    agg.add({"happy": 10.6, "neutral": 89.4}, 0.0)
    # A lone frame's mean is the frame: 10.6 -> 10 (rounding would give 11), 89.4 -> 89.
    assert agg.tick(0.0) == {"angry": 0, "disgust": 0, "fear": 0, "happy": 10, "sad": 0, "surprise": 0, "neutral": 89}
    current = agg.current()
    assert current is not None
    assert readout_message(current) == "Right now, user looks TOTALLY ZEN (89)"  # No "Contented (11)".
    agg.add({"happy": 30.0, "neutral": 70.0}, 0.4)
    # Tick 0.5: weights 0.7071 and 1; happy (7.4953 + 30) / 1.7071 = 21.96 -> 21, neutral 78.03 -> 78.
    assert agg.tick(0.5) == {"angry": 0, "disgust": 0, "fear": 0, "happy": 21, "sad": 0, "surprise": 0, "neutral": 78}


def test_frame_between_ticks_joins_the_next_tick_undecayed() -> None:
    agg = Aggregator()
    assert agg.tick(0.0) is None  # No frame yet.
    agg.add({"sad": 60}, 0.2)
    assert agg.tick(0.3) is None  # Not a tick yet: nothing changes.
    assert agg.tick(0.5) == only("sad", 60)
    assert agg.weight == pytest.approx(1.0)


def test_frames_after_now_wait_for_their_tick() -> None:
    agg = Aggregator()
    agg.add({"sad": 60}, 0.7)
    assert agg.tick(0.5) is None
    assert agg.tick(1.0) == only("sad", 60)
    assert agg.weight == pytest.approx(1.0)


def test_frame_delivered_after_its_tick_joins_the_next_tick() -> None:
    agg = Aggregator()
    agg.tick(0.0)
    agg.tick(0.5)
    agg.add({"fear": 40}, 0.3)  # Stamped before tick 0.5, delivered after it: counted at 1.0 with weight 1.
    assert agg.tick(1.0) == only("fear", 40)
    assert agg.weight == pytest.approx(1.0)


def test_no_face_frames_add_nothing_but_are_recorded() -> None:
    agg = Aggregator()
    agg.add({"happy": 80}, 0.0)
    agg.tick(0.0)
    for t in (0.5, 1.0, 1.5):
        agg.add_no_face(t)
        agg.tick(t)
    assert agg.weight == pytest.approx(FACTOR**3)
    assert agg.last_reading_s == 1.5
    assert agg.last_face_s == 0.0
    only_no_face = Aggregator()
    only_no_face.add_no_face(0.0)
    assert only_no_face.tick(0.0) is None
    assert only_no_face.last_reading_s == 0.0


FRAMES = [
    (0.0, {"happy": 80, "neutral": 20}),
    (0.4, {"happy": 70, "neutral": 30}),
    (1.1, {"sad": 50, "neutral": 50}),
    (1.5, {"sad": 70, "neutral": 30}),
    (2.2, {"surprise": 90, "neutral": 10}),
]


def run_aggregator(tick_times: list[float]) -> tuple[dict[str, int] | None, float]:
    agg = Aggregator()
    for t, scores in FRAMES:
        agg.add(scores, t)
    result = None
    for t in tick_times:
        result = agg.tick(t)
    return result, agg.weight


def test_late_ticks_equal_regular_ticks() -> None:
    regular, regular_weight = run_aggregator([i * 0.5 for i in range(7)])  # 0.0 ... 3.0
    # By hand: tick 0.0 f1; 0.5 f2; 1.5 f3+f4; 2.5 f5. Weights at 3.0: f1 F^6, f2 F^5, f3/f4 F^3, f5 F.
    weights = [FACTOR**6, FACTOR**5, FACTOR**3, FACTOR**3, FACTOR]
    assert regular_weight == pytest.approx(sum(weights))
    for emotion in ("happy", "sad", "surprise", "neutral"):
        mean = sum(w * s.get(emotion, 0) for w, (_, s) in zip(weights, FRAMES, strict=True)) / sum(weights)
        assert regular is not None
        assert regular[emotion] == math.floor(mean + 1e-6)  # Truncated, as the original shows scores.
    for late in ([0.0, 3.0], [0.0, 0.7, 2.9, 3.1], [0.0, 1.26, 1.4, 3.2], [0.0, 0.5, 0.5, 2.6, 3.0]):
        result, weight = run_aggregator(late)
        assert result == regular, late
        assert weight == pytest.approx(regular_weight, rel=1e-12), late


def test_a_very_late_tick_is_not_visible() -> None:
    agg = Aggregator()
    agg.add({"happy": 80}, 0.0)
    agg.tick(0.0)
    assert agg.tick(3600.0) is None
    agg.add({"fear": 40}, 3600.2)
    assert agg.tick(3600.5) == only("fear", 40)


def test_add_rejects_bad_scores() -> None:
    agg = Aggregator()
    with pytest.raises(ValueError):
        agg.add({"happy": 180.0}, 0.0)
    with pytest.raises(ValueError):
        agg.add({"joy": 10.0}, 0.0)
    with pytest.raises(ValueError):
        Aggregator(tick_seconds=0)


# --- change trigger ---------------------------------------------------------------------------------------------

CALM = {"happy": 60, "neutral": 40}
NEAR_CALM = {"happy": 42, "neutral": 64}  # 3-4-5: distance exactly 30 from CALM.
SHOCKED = {"surprise": 80, "fear": 20}


def test_threshold_starts_at_41_and_decays_five_percent_per_second() -> None:
    trigger = ChangeTrigger()
    assert trigger.threshold(0.0) == 41.0
    trigger.update(CALM, 0.0)
    assert trigger.threshold(0.0) == pytest.approx(41.0)
    assert trigger.threshold(1.0) == pytest.approx(38.95)
    assert trigger.threshold(2.0) == pytest.approx(37.0025)
    assert trigger.threshold(10.0) == pytest.approx(41.0 * 0.95**10)
    assert trigger.threshold(10.0) == pytest.approx(24.5482, abs=1e-4)


def test_first_update_never_fires() -> None:
    trigger = ChangeTrigger()
    assert trigger.update(SHOCKED, 0.0) is False
    assert trigger.last_distance is None


def test_fires_on_a_big_jump_and_resets_the_threshold() -> None:
    trigger = ChangeTrigger()
    trigger.update(CALM, 0.0)
    trigger.update(CALM, 2.0)
    assert trigger.last_distance == 0.0
    assert trigger.update(SHOCKED, 2.5) is True
    assert trigger.last_distance == pytest.approx(math.sqrt(60**2 + 40**2 + 80**2 + 20**2))
    assert trigger.threshold(2.5) == pytest.approx(41.0)  # Reset at the trigger...
    assert trigger.threshold(3.5) == pytest.approx(38.95)  # ...and decaying from there.


def test_does_not_fire_on_a_small_change() -> None:
    trigger = ChangeTrigger()
    trigger.update(CALM, 0.0)
    assert trigger.update(NEAR_CALM, 0.5) is False
    assert trigger.last_distance == pytest.approx(30.0)


def test_refractory_five_seconds_between_triggers() -> None:
    trigger = ChangeTrigger()
    trigger.update(CALM, 0.0)
    assert trigger.update(SHOCKED, 0.5) is True
    assert trigger.update(CALM, 1.0) is False  # Big jump, but 0.5 s after the trigger.
    assert trigger.update(SHOCKED, 5.0) is False  # 4.5 s after.
    assert trigger.update(CALM, 5.5) is True  # Exactly 5 s after: allowed.
    assert trigger.last_trigger_s == 5.5


def test_moderate_change_fires_once_the_threshold_has_decayed_below_it() -> None:
    # Distance 30 beats 41 * 0.95^t once t > ln(30/41) / ln(0.95) = 6.09 s.
    trigger = ChangeTrigger()
    trigger.update(CALM, 0.0)
    trigger.update(CALM, 5.5)
    assert trigger.threshold(6.0) == pytest.approx(30.13, abs=0.01)
    assert trigger.update(NEAR_CALM, 6.0) is False
    assert trigger.threshold(6.5) == pytest.approx(29.37, abs=0.01)
    assert trigger.update(CALM, 6.5) is True


def test_distance_equal_to_threshold_does_not_fire() -> None:
    trigger = ChangeTrigger(start_threshold=30.0, decay_per_second=0.0)
    trigger.update(CALM, 0.0)
    assert trigger.update(NEAR_CALM, 0.5) is False
    trigger = ChangeTrigger(start_threshold=29.9, decay_per_second=0.0)
    trigger.update(CALM, 0.0)
    assert trigger.update(NEAR_CALM, 0.5) is True


def test_not_visible_never_fires_and_forgets_the_previous_aggregate() -> None:
    trigger = ChangeTrigger()
    trigger.update(CALM, 0.0)
    assert trigger.update(None, 10.0) is False
    assert trigger.last_distance is None
    # Reappearing with a very different face: nothing to compare with, so no trigger.
    assert trigger.update(SHOCKED, 10.5) is False
    assert trigger.last_distance is None
    # Comparisons resume from the reappeared face.
    assert trigger.update(CALM, 11.0) is True


def test_change_is_large_at_half_the_starting_threshold() -> None:
    assert change_is_large(CALM, NEAR_CALM) is True  # 30 > 20.5
    assert change_is_large(CALM, {"happy": 48, "neutral": 56}) is False  # 3-4-5 x 4: 20 <= 20.5
    assert change_is_large(CALM, {"happy": 39, "neutral": 40}) is True  # 21
    assert change_is_large(CALM, {"happy": 48, "neutral": 56}, start_threshold=40.0) is False  # 20 == 20: not above
    assert change_is_large(CALM, {"happy": 48, "neutral": 56}, start_threshold=39.0) is True


# --- short messages ---------------------------------------------------------------------------------------------


def test_short_message_reminder() -> None:
    assert SHORT_MESSAGE_CHARS == 10
    reminder = short_message_reminder("hi")
    assert reminder is not None
    # The original's point: EMILI may ask the user to act out a specific emotion (it is a nudge, not a task).
    assert re.search(r"\bask the user to act out an? (specific|particular) emotion\b", reminder)
    assert short_message_reminder("") == reminder
    assert short_message_reminder("123456789") == reminder  # 9 characters: under 10.
    assert short_message_reminder("1234567890") is None  # 10: not under.
    assert short_message_reminder("I feel great today") is None
    assert short_message_reminder("   ok      \n") == reminder  # Padding does not count.
