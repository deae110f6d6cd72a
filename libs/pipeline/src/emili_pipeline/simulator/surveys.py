"""Surveys and ratings filled in from the simulated state.

Pre- and post-chat surveys (the research group's form): ``current_feelings`` is the form's feeling
nearest the state in VAD space (:data:`FEELING_VAD`), plus the second nearest half the time when it is
almost as near; ``desired_feelings`` 1-2 of the form's 12, calm ones for a negative state and lively
ones for a positive one; the free text (the source of the VAD gold labels) is:

* pre: the persona's own pre-chat text, or else its situation and a sentence naming the nearest feeling
  with an intensity word ("a little", "quite", "really");
* post: a sentence naming the valence change over the chat ("better", "about the same", "worse"), one
  naming the final feeling, and the persona's own post-chat text only when valence rose (those texts are
  written for a chat that helped).

Ratings (1-5, the paper's Likert scale), with dv = valence change and q the mean reply quality::

    empathy   = 3 + 4 dv + 1.5 q + N(0, 0.5)
    relevance = 3 + 2 reflection + q + N(0, 0.5)      reflection: mean reply reflection component
    fluency   = 4.3 - 2 length - 2 empty + N(0, 0.4)  length, empty: mean length penalty, share of empty replies

each rounded and clipped to 1..5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emili_pipeline.simulator.personas import Persona
from emili_pipeline.simulator.state import EmotionState, HiddenState

FEELING_VAD: dict[str, tuple[float, float, float]] = {
    "Angry": (-0.6, 0.6, 0.3),
    "Tired": (-0.2, -0.6, -0.3),
    "Anxious": (-0.5, 0.6, -0.5),
    "Happy": (0.7, 0.4, 0.4),
    "Sad": (-0.7, -0.4, -0.4),
    "Surprised": (0.3, 0.8, 0.0),
    "Neutral": (0.0, 0.0, 0.0),
}
CALM_WISHES = ("Peaceful", "Hopeful", "Content", "Confident", "Caring", "Determined")
LIVELY_WISHES = ("Surprised", "Excited", "Proud", "Grateful", "Impressed", "Joyful")
_WORDS = {
    "Angry": "angry",
    "Tired": "tired",
    "Anxious": "anxious",
    "Happy": "happy",
    "Sad": "sad",
    "Surprised": "surprised",
    "Neutral": "calm",
}

_COMMENTS = {
    1: "It did not feel like it listened.",
    2: "Not very understanding.",
    3: "It was okay.",
    4: "It felt understanding.",
    5: "It really listened to me.",
}


@dataclass(frozen=True)
class SurveyAnswers:
    current_feelings: list[str]
    desired_feelings: list[str]
    text: str


@dataclass(frozen=True)
class Ratings:
    empathy: int
    relevance: int
    fluency: int
    comment: str


def nearest_feelings(state: EmotionState, rng: np.random.Generator) -> list[str]:
    point = state.vector()
    ranked = sorted(FEELING_VAD, key=lambda f: float(np.linalg.norm(point - np.array(FEELING_VAD[f]))))
    first, second = ranked[0], ranked[1]
    d1 = float(np.linalg.norm(point - np.array(FEELING_VAD[first])))
    d2 = float(np.linalg.norm(point - np.array(FEELING_VAD[second])))
    return [first, second] if d2 < 1.3 * d1 + 0.05 and rng.random() < 0.5 else [first]


def feeling_sentence(state: EmotionState, rng: np.random.Generator) -> str:
    feeling = nearest_feelings(state, rng)[0]
    strength = state.intensity()
    adverb = "really" if strength > 0.9 else "quite" if strength > 0.5 else "a little"
    return f"I feel {adverb} {_WORDS[feeling]} right now."


def change_sentence(valence_change: float) -> str:
    if valence_change > 0.15:
        return "I feel better than before the chat."
    if valence_change > 0.05:
        return "I feel a bit better."
    if valence_change > -0.05:
        return "I feel about the same as before."
    if valence_change > -0.15:
        return "I feel a bit worse."
    return "I feel worse than before the chat."


def _wishes(state: EmotionState, rng: np.random.Generator) -> list[str]:
    pool = CALM_WISHES if state.valence < 0 else LIVELY_WISHES
    count = int(rng.integers(1, 3))
    return [str(w) for w in rng.choice(pool, size=count, replace=False)]


def pre_survey(persona: Persona, state: EmotionState, rng: np.random.Generator) -> SurveyAnswers:
    text = persona.pre_text or f"{persona.situation} {feeling_sentence(state, rng)}"
    return SurveyAnswers(nearest_feelings(state, rng), _wishes(state, rng), text)


def post_survey(persona: Persona, hidden: HiddenState, rng: np.random.Generator) -> SurveyAnswers:
    change = hidden.valence_change
    parts = [change_sentence(change), feeling_sentence(hidden.current, rng)]
    if persona.post_text and change > 0.05:
        parts.append(persona.post_text)
    return SurveyAnswers(nearest_feelings(hidden.current, rng), _wishes(hidden.current, rng), " ".join(parts))


def _likert(value: float) -> int:
    return int(min(5, max(1, round(value))))


def ratings(hidden: HiddenState, rng: np.random.Generator) -> Ratings:
    qualities = hidden.qualities
    mean_q = float(np.mean([q.score for q in qualities])) if qualities else 0.0

    def component(name: str) -> float:
        return float(np.mean([q.components.get(name, 0.0) for q in qualities])) if qualities else 0.0

    empathy = _likert(3 + 4 * hidden.valence_change + 1.5 * mean_q + rng.normal(0, 0.5))
    relevance = _likert(3 + 2 * component("reflection") + mean_q + rng.normal(0, 0.5))
    fluency = _likert(4.3 - 2 * component("length") - 2 * component("empty") + rng.normal(0, 0.4))
    return Ratings(empathy, relevance, fluency, _COMMENTS[empathy])
