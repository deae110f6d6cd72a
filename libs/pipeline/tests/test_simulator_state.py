"""The hidden state model: reproducible with a seed, moved by reply quality, shown on the face by expressiveness."""

from __future__ import annotations

import numpy as np
import pytest

from emili_pipeline.simulator.faces import FaceModelSettings, expression_mean, sample_reading
from emili_pipeline.simulator.personas import builtin_personas
from emili_pipeline.simulator.state import (
    EMOTION_VAD,
    EmotionState,
    HiddenState,
    StateModelSettings,
    UserTraits,
    reply_quality,
)
from emili_pipeline.simulator.user import SimulatedUser
from emili_session.emotions import EMOTIONS

USER = "My dog passed away on Sunday. The house is so quiet without him."
GOOD = "I'm so sorry, that sounds really hard. The quiet house must be tough. What was he like?"
DISMISSIVE = "Whatever, calm down, it's not a big deal. You should just get a new dog anyway."
RAMBLING = " ".join(["Dogs are mammals and there are many breeds of them in the world today."] * 8)


def test_every_emotion_label_has_a_state_in_range() -> None:
    assert len(EMOTION_VAD) == 32
    assert all(-1 <= x <= 1 for point in EMOTION_VAD.values() for x in point)


def test_reply_quality_orders_replies() -> None:
    good, dismissive = reply_quality(GOOD, USER), reply_quality(DISMISSIVE, USER)
    assert good.score > 0.3 > -0.3 > dismissive.score
    assert reply_quality("", USER).score == -1.0
    assert reply_quality(RAMBLING, USER).components["length"] > 0.5
    assert reply_quality(GOOD, USER).components["reflection"] > 0  # Repeats "quiet", "house".
    assert all(-1.0 <= reply_quality(text, USER).score <= 1.0 for text in (GOOD, DISMISSIVE, RAMBLING, "ok"))


def test_same_seed_same_trajectory_and_faces() -> None:
    persona = builtin_personas()[1]

    def run(seed: int) -> tuple[list[EmotionState], list[dict[str, float]]]:
        user = SimulatedUser(persona, seed)
        states, readings = [], []
        for turn, reply in enumerate((GOOD, DISMISSIVE, GOOD)):
            user.message(turn)
            states.append(user.hear(reply)[1])
            readings.append(user.reading().probabilities)
        return states, readings

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_state_does_not_depend_on_how_many_readings_were_sent() -> None:
    persona = builtin_personas()[0]
    quiet, chatty = SimulatedUser(persona, 3), SimulatedUser(persona, 3)
    for _ in range(25):
        chatty.reading()
    assert quiet.hear(GOOD)[1] == chatty.hear(GOOD)[1]


def test_good_replies_raise_valence_more_than_dismissive_ones() -> None:
    params = StateModelSettings()
    good_q, bad_q = reply_quality(GOOD, USER), reply_quality(DISMISSIVE, USER)
    rises: dict[str, list[float]] = {"good": [], "bad": []}
    for seed in range(200):
        for name, quality in (("good", good_q), ("bad", bad_q)):
            rng = np.random.default_rng(seed)
            traits = UserTraits.draw(rng, params)
            state = HiddenState("sad", traits, params, rng)
            for _ in range(3):
                state.react(quality)
            rises[name].append(state.valence_change)
    assert np.mean(rises["good"]) > 0.1 > -0.1 > np.mean(rises["bad"])
    assert np.mean(np.array(rises["good"]) > np.array(rises["bad"])) > 0.95


def test_state_stays_in_range_under_extreme_replies() -> None:
    params = StateModelSettings(rate=2.0, noise=0.5)
    state = HiddenState("furious", UserTraits(1.8, 1.4, (0.0,) * 7), params, np.random.default_rng(0))
    for i in range(50):
        current = state.react(reply_quality(GOOD if i % 2 else DISMISSIVE, USER))
        assert all(-1 <= x <= 1 for x in (current.valence, current.arousal, current.dominance))


@pytest.mark.parametrize("emotion", ["sad", "joyful", "angry", "afraid"])
def test_expressiveness_scales_face_intensity(emotion: str) -> None:
    state, params = EmotionState(*EMOTION_VAD[emotion]), FaceModelSettings()

    def intensity(gain: float) -> float:
        mean = expression_mean(state, UserTraits(gain, 1.0, (0.0,) * 7), params)
        return 1.0 - float(mean[EMOTIONS.index("neutral")])

    assert intensity(0.3) < intensity(0.7) < intensity(1.2)


@pytest.mark.parametrize(("emotion", "expected"), [("joyful", "happy"), ("sad", "sad"), ("afraid", "fear")])
def test_expressive_face_shows_the_emotion(emotion: str, expected: str) -> None:
    mean = expression_mean(EmotionState(*EMOTION_VAD[emotion]), UserTraits(1.0, 1.0, (0.0,) * 7), FaceModelSettings())
    assert EMOTIONS[int(np.argmax(mean))] == expected


def test_readings_are_valid_distributions() -> None:
    rng = np.random.default_rng(1)
    params = FaceModelSettings(missing_rate=0.1)
    traits = UserTraits.draw(rng, StateModelSettings())
    readings = [sample_reading(EmotionState(*EMOTION_VAD["anxious"]), traits, params, rng) for _ in range(500)]
    found = [r for r in readings if r.face_found]
    assert 0.8 < len(found) / len(readings) < 0.97
    assert all(r.probabilities == {} for r in readings if not r.face_found)
    for reading in found:
        assert list(reading.probabilities) == list(EMOTIONS)
        assert all(0.0 < p <= 1.0 for p in reading.probabilities.values())
        assert sum(reading.probabilities.values()) == pytest.approx(1.0, abs=1e-6)


def test_readings_average_to_the_expression_mean() -> None:
    rng = np.random.default_rng(2)
    params = FaceModelSettings(missing_rate=0.0)
    traits, state = UserTraits(1.0, 1.0, (0.0,) * 7), EmotionState(*EMOTION_VAD["joyful"])
    drawn = np.array([list(sample_reading(state, traits, params, rng).probabilities.values()) for _ in range(2000)])
    np.testing.assert_allclose(drawn.mean(axis=0), expression_mean(state, traits, params), atol=0.02)
