"""The simulated user's hidden emotional state, and how an assistant reply moves it.

A simulation for demos, CI and load tests, written so its behaviour is predictable and testable. It is
not a claim about how people feel or react; labels and models trained on simulated sessions learn the
simulator, not people (which is why every simulated session is marked ``synthetic``).

State
    valence v, arousal a, dominance d, each in [-1, 1]. It starts at the persona's emotion's point in
    :data:`EMOTION_VAD` (hand-set for the 32 EmpatheticDialogues labels, not NRC values) plus Gaussian
    noise of ``start_noise`` per dimension. The start (v0, a0, d0) stays the user's anchor: the
    situation keeps weighing on them whatever is said.

Response quality q in [-1, 1] of a reply r to the user's last message u (:func:`reply_quality`)
    q = 0.45 empathy + 0.25 reflection + 0.15 question - 0.7 dismissive - 0.25 advice - 0.4 length,
    clipped; an empty reply is -1. Components, each in [0, 1]:

    * empathy: acknowledging feelings ("that sounds", "I'm sorry", "must be", "understand", ...), 2 hits = 1;
    * reflection: share of u's content words (4+ letters, not stopwords) that r repeats, doubled, capped;
    * question: r asks something (an invitation to go on);
    * dismissive: brushing the feeling off ("calm down", "get over", "whatever", "as an AI", ...);
    * advice: telling the user what to do ("you should", "try to", ...); EMILI's prompt asks for none;
    * length: words(r) / max(words(u), 8) above 1.5, over 3 more (EMILI's replies are no longer than the user's).

    A different scorer (e.g. the labeler's VAD valence of the reply) can be passed as a
    :data:`ReplyScorer`.

Update after each assistant reply (prompted or not), with s the user's sensitivity and N(0, noise) per
dimension from the user's own generator::

    v += rate * s * q                                   + reversion * (v0 - v) + N
    a += rate * s * (0.6 * max(0, -q) - 0.3 * max(0, q)) + reversion * (a0 - a) + N
    d += rate * s * 0.3 * q                             + reversion * (d0 - d) + N

then clipped to [-1, 1]: good replies lift valence, calm and steady the user a little; dismissive ones
lower valence and agitate. How the state shows on the face (expressiveness, resting face) is in
:mod:`emili_pipeline.simulator.faces`.

Per-user traits (:class:`UserTraits`, drawn once per user from its seed): expressiveness (log-normal
around 1, the gain on how strongly the state shows on the face), sensitivity (how much replies move the
state), and a resting-face bias per FER class (the user's baseline expression).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field

# Hand-set (valence, arousal, dominance) in [-1, 1] for EmpatheticDialogues' 32 emotion labels.
EMOTION_VAD: dict[str, tuple[float, float, float]] = {
    "afraid": (-0.6, 0.6, -0.6),
    "angry": (-0.6, 0.7, 0.3),
    "annoyed": (-0.4, 0.4, 0.1),
    "anticipating": (0.3, 0.4, 0.1),
    "anxious": (-0.5, 0.6, -0.5),
    "apprehensive": (-0.3, 0.3, -0.3),
    "ashamed": (-0.6, 0.1, -0.6),
    "caring": (0.5, 0.0, 0.2),
    "confident": (0.5, 0.3, 0.6),
    "content": (0.6, -0.3, 0.3),
    "devastated": (-0.9, 0.3, -0.6),
    "disappointed": (-0.5, -0.1, -0.3),
    "disgusted": (-0.7, 0.3, 0.2),
    "embarrassed": (-0.4, 0.4, -0.5),
    "excited": (0.7, 0.8, 0.3),
    "faithful": (0.4, -0.1, 0.2),
    "furious": (-0.8, 0.9, 0.4),
    "grateful": (0.7, 0.1, 0.2),
    "guilty": (-0.5, 0.2, -0.4),
    "hopeful": (0.5, 0.2, 0.1),
    "impressed": (0.6, 0.5, 0.0),
    "jealous": (-0.5, 0.5, -0.1),
    "joyful": (0.8, 0.5, 0.4),
    "lonely": (-0.6, -0.4, -0.4),
    "nostalgic": (0.1, -0.3, -0.1),
    "prepared": (0.3, 0.1, 0.5),
    "proud": (0.7, 0.4, 0.6),
    "sad": (-0.7, -0.4, -0.4),
    "sentimental": (0.1, -0.1, -0.1),
    "surprised": (0.2, 0.8, 0.0),
    "terrified": (-0.8, 0.9, -0.8),
    "trusting": (0.5, -0.1, 0.2),
}

_EMPATHY = re.compile(
    r"\b(?:sounds?|(?:i'?m|i am|so) sorry|must (?:be|have)|understand|makes sense|i hear|that'?s (?:hard|tough|"
    r"rough|awful|great|wonderful|amazing|exciting|lovely)|how (?:are|do) you feel|feel(?:ing|s)?|glad|"
    r"proud of you|congratulations|congrats|no wonder|of course you)\b"
)
_DISMISSIVE = re.compile(
    r"\b(?:calm down|get over|whatever|not a big deal|no big deal|don'?t care|who cares|stop (?:complaining|"
    r"worrying)|overreact\w*|it'?s nothing|as an ai|i am an ai|i'?m an ai|language model|anyway|moving on|"
    r"could be worse|at least)\b"
)
_ADVICE = re.compile(r"\b(?:you should|you need to|you have to|try to|have you tried|i suggest|my advice)\b")
_WORD = re.compile(r"[a-z']+")
# Too common to show that a reply listened (reflection counts only words of 4+ letters not in here).
_STOPWORD_TEXT = (
    "about after again also been before being could didn does doing don't from have having here into just "
    "like more most much only other over really same should some such than that that's their them then "
    "there these they this those very what when where which while will with would your you're i'm i've "
    "it's"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


@dataclass(frozen=True)
class ReplyQuality:
    score: float  # In [-1, 1].
    components: dict[str, float] = field(default_factory=dict)


ReplyScorer = Callable[[str, str], ReplyQuality]


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) >= 4 and w not in _STOPWORDS}


def word_count(text: str) -> int:
    """Words as the length term of :func:`reply_quality` counts them."""
    return len(_WORD.findall(text.lower()))


def reply_quality(reply: str, user_message: str) -> ReplyQuality:
    """How well ``reply`` answers ``user_message``, by the heuristic in the module docstring."""
    text = reply.strip().lower()
    if not text:
        return ReplyQuality(-1.0, {"empty": 1.0})
    words = word_count(text)
    user_words = _content_words(user_message)
    overlap = len(user_words & _content_words(text)) / len(user_words) if user_words else 0.0
    ratio = words / max(word_count(user_message), 8)
    components = {
        "empathy": min(1.0, len(_EMPATHY.findall(text)) / 2),
        "reflection": min(1.0, 2 * overlap),
        "question": 1.0 if "?" in text else 0.0,
        "dismissive": min(1.0, float(len(_DISMISSIVE.findall(text)))),
        "advice": min(1.0, float(len(_ADVICE.findall(text)))),
        "length": min(1.0, max(0.0, (ratio - 1.5) / 3)),
    }
    score = (
        0.45 * components["empathy"]
        + 0.25 * components["reflection"]
        + 0.15 * components["question"]
        - 0.7 * components["dismissive"]
        - 0.25 * components["advice"]
        - 0.4 * components["length"]
    )
    return ReplyQuality(max(-1.0, min(1.0, score)), components)


class StateModelSettings(BaseModel):
    """The numbers of the state model (module docstring); ``EMILI_PIPELINE__SIMULATOR__STATE__<FIELD>``."""

    start_noise: float = Field(0.1, ge=0)
    rate: float = Field(0.35, ge=0, le=2)
    reversion: float = Field(0.1, ge=0, le=1)
    noise: float = Field(0.05, ge=0)
    expressiveness_sigma: float = Field(0.35, ge=0)  # Log-normal spread around 1.
    expressiveness_range: tuple[float, float] = (0.3, 1.8)
    sensitivity_range: tuple[float, float] = (0.6, 1.4)
    resting_face_sigma: float = Field(0.3, ge=0)  # Per-class logit bias of the user's resting face.


@dataclass(frozen=True)
class EmotionState:
    valence: float
    arousal: float
    dominance: float

    def vector(self) -> np.ndarray:
        return np.array([self.valence, self.arousal, self.dominance], dtype=np.float64)

    @classmethod
    def from_vector(cls, values: np.ndarray) -> EmotionState:
        v, a, d = (float(x) for x in np.clip(values, -1.0, 1.0))
        return cls(v, a, d)

    def intensity(self) -> float:
        """Distance from a calm, neutral state (0 .. sqrt(3))."""
        return math.sqrt(self.valence**2 + self.arousal**2 + self.dominance**2)


@dataclass(frozen=True)
class UserTraits:
    expressiveness: float
    sensitivity: float
    resting_face: tuple[float, ...]  # Logit bias per FER class, in emili_session.emotions.EMOTIONS order.

    @classmethod
    def draw(cls, rng: np.random.Generator, params: StateModelSettings) -> UserTraits:
        low, high = params.expressiveness_range
        expressiveness = float(np.clip(math.exp(rng.normal(0.0, params.expressiveness_sigma)), low, high))
        sensitivity = float(rng.uniform(*params.sensitivity_range))
        resting = tuple(float(x) for x in rng.normal(0.0, params.resting_face_sigma, size=7))
        return cls(expressiveness, sensitivity, resting)


class HiddenState:
    """One user's state over a session: starts at the persona's emotion, moves with each reply."""

    def __init__(self, emotion: str, traits: UserTraits, params: StateModelSettings, rng: np.random.Generator) -> None:
        self.params = params
        self.traits = traits
        self.rng = rng
        start = np.array(EMOTION_VAD[emotion]) + rng.normal(0.0, params.start_noise, size=3)
        self.start = EmotionState.from_vector(start)
        self.current = self.start
        self.qualities: list[ReplyQuality] = []

    def react(self, quality: ReplyQuality) -> EmotionState:
        """Update after one assistant reply of quality ``quality``; returns the new state."""
        p, q = self.params, quality.score
        gain = p.rate * self.traits.sensitivity
        push = np.array([q, 0.6 * max(0.0, -q) - 0.3 * max(0.0, q), 0.3 * q])
        now, anchor = self.current.vector(), self.start.vector()
        moved = now + gain * push + p.reversion * (anchor - now) + self.rng.normal(0.0, p.noise, size=3)
        self.current = EmotionState.from_vector(moved)
        self.qualities.append(quality)
        return self.current

    @property
    def valence_change(self) -> float:
        return self.current.valence - self.start.valence
