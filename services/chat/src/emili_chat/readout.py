"""Facial-expression readouts exactly as the original EMILI formats them (reference EMILI.md, section 3).

Pure functions and two small stateful helpers, no I/O:

* scores: FER softmax x 100 as integers 0-100, truncated as the original does (:func:`to_scores`);
* salience: per-emotion thresholds map a score to a level 0-5 and a word (:data:`SALIENCE_TABLE`);
* the readout line and the readout system message (:func:`format_line`, :func:`readout_message`);
* the 500 ms exponentially decayed aggregate of frame scores (:class:`Aggregator`);
* the emotion-change trigger that lets EMILI speak unprompted (:class:`ChangeTrigger`, :func:`change_is_large`);
* the reminder added right after a very short user message (:func:`short_message_reminder`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import numpy as np
import numpy.typing as npt

from emili_session.emotions import EMOTIONS

__all__ = [
    "NOT_VISIBLE_MESSAGE",
    "SALIENCE_TABLE",
    "SHORT_MESSAGE_CHARS",
    "Aggregator",
    "ChangeTrigger",
    "Salience",
    "change_is_large",
    "format_line",
    "l2_distance",
    "readout_message",
    "salience_level",
    "salience_word",
    "short_message_reminder",
    "to_scores",
]

# Vectors use the FER model's output order.
_INDEX: Final[Mapping[str, int]] = MappingProxyType({name: i for i, name in enumerate(EMOTIONS)})

NOT_VISIBLE_MESSAGE: Final = "User is not visible right now."
CHANGE_DETECTED_LINE: Final = "Change in emotions detected!"
# Not in the reference: only reachable when no score passes its first threshold, which softmax scores
# summing to ~100 cannot do (the largest of 7 is >= 15 and no level-1 threshold is above 10).
_NO_SALIENT_NOW: Final = "Right now, user shows no salient emotion."
_NO_SALIENT_BEFORE: Final = "Previously, user showed no salient emotion."

SHORT_MESSAGE_CHARS: Final = 10
# The original's meaning, in the project's words: a bare nudge that EMILI may ask for an emotion to be acted out.
_SHORT_MESSAGE_REMINDER: Final = "Reminder: you can ask the user to act out a particular emotion!"

# Tolerance on timestamps so that float error never moves a frame or a tick across a 500 ms boundary.
_TIME_TOL_S: Final = 1e-6
# Tolerance on 0-100 scores before truncating, so that float error (0.29 * 100 = 28.999999999999996) does
# not cost a point the value really has; far below anything a FER model resolves.
_SCORE_TOL: Final = 1e-6


@dataclass(frozen=True, slots=True)
class Salience:
    """Thresholds for levels 1..5 (a score must strictly exceed one to reach its level) and their words."""

    thresholds: tuple[int, int, int, int, int]
    words: tuple[str, str, str, str, str]


# Verbatim from the reference table; the order of the thresholds is the order of the levels.
SALIENCE_TABLE: Final[Mapping[str, Salience]] = MappingProxyType(
    {
        "angry": Salience((5, 30, 40, 60, 80), ("Annoyed", "Pissed", "Angry", "Furious", "Enraged")),
        "disgust": Salience(
            (1, 5, 15, 40, 60), ("Unsatisfied", "Displeased", "Disgusted", "Revolted", "Totally grossed out")
        ),
        "fear": Salience((8, 20, 30, 50, 70), ("Uneasy", "Worried", "Anxious", "Fearful", "Terrified")),
        "happy": Salience((10, 30, 40, 70, 90), ("Contented", "Pleased", "Happy", "Elated", "Ecstatic")),
        "sad": Salience((5, 20, 30, 60, 80), ("Down", "Melancholy", "Sad", "Despondent", "Anguished")),
        "surprise": Salience(
            (3, 20, 35, 50, 70), ("Mildly surprised", "Surprised", "Taken aback", "Astonished", "Flabbergasted")
        ),
        "neutral": Salience((10, 50, 60, 75, 88), ("Neutral", "Calm", "Relaxed", "Serene", "Totally Zen")),
    }
)


def _truncate(value: float) -> int:
    """A 0-100 score as the original shows it: the integer part (it divides and floors), clamped to 0-100.

    Truncating, not rounding, matters at the salience thresholds: 10.6 happy is 10, which does not exceed
    happy's first threshold (10), so the original leaves it out where rounding would show ``Contented (11)``.
    """
    return min(100, max(0, math.floor(value + _SCORE_TOL)))


def _check_emotion(emotion: str) -> None:
    if emotion not in _INDEX:
        raise ValueError(f"unknown emotion {emotion!r}; expected one of {EMOTIONS}")


def _vector(scores: Mapping[str, float]) -> npt.NDArray[np.float64]:
    """Scores as a 7-vector in FER order; a missing emotion counts as 0, an unknown or non-finite one is an error."""
    vec = np.zeros(len(EMOTIONS), dtype=np.float64)
    for emotion, score in scores.items():
        _check_emotion(emotion)
        value = float(score)
        if not math.isfinite(value):
            raise ValueError(f"score for {emotion!r} is not finite: {score!r}")
        vec[_INDEX[emotion]] = value
    return vec


def salience_level(emotion: str, score: float) -> int:
    """How many of ``emotion``'s five thresholds ``score`` strictly exceeds (0-5)."""
    _check_emotion(emotion)
    return sum(1 for threshold in SALIENCE_TABLE[emotion].thresholds if score > threshold)


def salience_word(emotion: str, score: float) -> str | None:
    """The word for ``emotion`` at ``score``, or None when the score reaches no level (the emotion is omitted)."""
    level = salience_level(emotion, score)
    return SALIENCE_TABLE[emotion].words[level - 1] if level else None


def format_line(scores: Mapping[str, int]) -> str:
    """``Word (score)`` for each salient emotion, highest score first, the top word upper-cased.

    Example: ``HAPPY (46) Neutral (28)``. Ties keep FER order (a stable sort on the FER-ordered items).
    Returns ``""`` when no emotion is salient.
    """
    for emotion in scores:
        _check_emotion(emotion)
    salient = [(e, scores[e]) for e in EMOTIONS if e in scores and salience_level(e, scores[e]) >= 1]
    salient.sort(key=lambda item: -item[1])  # sort() is stable, so equal scores stay in FER order.
    parts: list[str] = []
    for rank, (emotion, score) in enumerate(salient):
        word = salience_word(emotion, score)
        assert word is not None  # Filtered to level >= 1 above.
        parts.append(f"{word.upper() if rank == 0 else word} ({score})")
    return " ".join(parts)


def readout_message(
    current: Mapping[str, int] | None,
    previous: Mapping[str, int] | None = None,
    change_detected: bool = False,
) -> str:
    """A readout system message.

    Before a user message the original always sends the one-line form (it asks for the three-line form only
    when the change trigger fires); the caller decides by passing ``change_detected``.

    * ``current`` None (no face recently): ``User is not visible right now.`` - whatever ``previous`` is,
      since the reference has no wording for "changed to not visible".
    * ``change_detected`` with a ``previous`` aggregate: three lines, ``Previously, user looked <line>`` /
      ``Change in emotions detected!`` / ``Right now, user looks <line>``.
    * otherwise: ``Right now, user looks <line>``.
    """
    if current is None:
        return NOT_VISIBLE_MESSAGE
    line = format_line(current)
    now = f"Right now, user looks {line}" if line else _NO_SALIENT_NOW
    if not (change_detected and previous is not None):
        return now
    before_line = format_line(previous)
    before = f"Previously, user looked {before_line}" if before_line else _NO_SALIENT_BEFORE
    return "\n".join((before, CHANGE_DETECTED_LINE, now))


def to_scores(probabilities: Mapping[str, float]) -> dict[str, int]:
    """FER softmax probabilities (0-1) as integer salience scores 0-100 (truncated), all seven in FER order.

    A missing emotion scores 0. Probabilities a hair outside [0, 1] (float error) are clamped; anything
    further out means the caller passed something other than a softmax and is rejected.
    """
    vec = _vector(probabilities)
    if np.any(vec < -1e-6) or np.any(vec > 1.0 + 1e-6):
        raise ValueError(f"probabilities must lie in [0, 1], got {dict(probabilities)!r}")
    return {e: _truncate(float(p) * 100.0) for e, p in zip(EMOTIONS, vec, strict=True)}


def l2_distance(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Euclidean distance between two score mappings over the seven emotions (0-100 scale; missing = 0)."""
    return float(np.linalg.norm(_vector(a) - _vector(b)))


class Aggregator:
    """EMILI's readout aggregate: an exponentially decayed mean of frame scores, updated on a fixed tick.

    Every tick multiplies the running weighted sum and total weight by ``0.5 ** (tick_seconds /
    half_life_seconds)`` and then adds the frames stamped since the previous tick with weight 1 each. Ticks
    lie on a grid anchored at the first :meth:`tick` call; a late call applies every elapsed grid tick in
    turn (each frame joins at the tick it belongs to), so the result depends on time, not on how often or how
    punctually ``tick`` is called. A call before the next grid tick changes nothing. The aggregate's scores are
    the decayed means truncated to integers, as the original shows them.
    """

    def __init__(
        self,
        tick_seconds: float = 0.5,
        half_life_seconds: float = 1.0,
        # 0.1: a lone frame stays visible 3 s (weight 0.125) and is dropped at 3.5 s (0.088); at the ~1 frame/s
        # FER rate the steady weight peaks near 2, so a face that leaves reads "not visible" after ~4.5 s. That
        # rides out the few missed Haar detections a real webcam produces while saying so within seconds when
        # the user walks away, and keeps the mean from resting on a single stale frame's last few percent.
        visibility_epsilon: float = 0.1,
    ) -> None:
        if not (tick_seconds > 0 and math.isfinite(tick_seconds)):
            raise ValueError(f"tick_seconds must be positive, got {tick_seconds!r}")
        if not (half_life_seconds > 0 and math.isfinite(half_life_seconds)):
            raise ValueError(f"half_life_seconds must be positive, got {half_life_seconds!r}")
        if not (visibility_epsilon >= 0 and math.isfinite(visibility_epsilon)):
            raise ValueError(f"visibility_epsilon must be >= 0, got {visibility_epsilon!r}")
        self.tick_seconds: Final = float(tick_seconds)
        self.half_life_seconds: Final = float(half_life_seconds)
        self.visibility_epsilon: Final = float(visibility_epsilon)
        self.per_tick_factor: Final = math.pow(0.5, self.tick_seconds / self.half_life_seconds)
        self._sum = np.zeros(len(EMOTIONS), dtype=np.float64)
        self._weight = 0.0
        self._pending: list[tuple[float, npt.NDArray[np.float64]]] = []
        self._anchor_s: float | None = None  # Time of grid tick 0 (the first tick call).
        self._ticks_done = 0  # Index of the last grid tick applied.
        self._current: dict[str, int] | None = None
        self.last_reading_s: float | None = None  # Latest frame of either kind: the camera is still sending.
        self.last_face_s: float | None = None

    @property
    def weight(self) -> float:
        """The decayed total weight after the last tick (below ``visibility_epsilon`` means not visible)."""
        return self._weight

    def add(self, scores: Mapping[str, float], timestamp_s: float) -> None:
        """Record a frame with a face; ``scores`` on the 0-100 scale (floats allowed, missing emotions 0)."""
        vec = _vector(scores)
        if np.any(vec < 0) or np.any(vec > 100):
            raise ValueError(f"scores must lie in [0, 100], got {dict(scores)!r}")
        self._pending.append((float(timestamp_s), vec))
        self._note_reading(timestamp_s)
        self.last_face_s = timestamp_s if self.last_face_s is None else max(self.last_face_s, timestamp_s)

    def add_no_face(self, timestamp_s: float) -> None:
        """Record a frame in which no face was found: it adds no weight, only that a reading arrived."""
        self._note_reading(timestamp_s)

    def _note_reading(self, timestamp_s: float) -> None:
        if not math.isfinite(timestamp_s):
            raise ValueError(f"timestamp must be finite, got {timestamp_s!r}")
        self.last_reading_s = timestamp_s if self.last_reading_s is None else max(self.last_reading_s, timestamp_s)

    def tick(self, now_s: float) -> dict[str, int] | None:
        """Apply every grid tick up to ``now_s`` and return the aggregate, or None when not visible."""
        if not math.isfinite(now_s):
            raise ValueError(f"now_s must be finite, got {now_s!r}")
        if self._anchor_s is None:
            # First tick: there is nothing to decay yet; it takes in every frame stamped up to now.
            self._anchor_s = now_s
            keep: list[tuple[float, npt.NDArray[np.float64]]] = []
            for ts, vec in self._pending:
                if ts <= now_s + _TIME_TOL_S:
                    self._add_frame(vec)
                else:
                    keep.append((ts, vec))
            self._pending = keep
            return self._refresh()
        anchor = self._anchor_s
        target = math.floor((now_s - anchor + _TIME_TOL_S) / self.tick_seconds)
        if target <= self._ticks_done:
            return self.current()  # Early or out-of-order call: no grid tick has elapsed.

        # Group pending frames by the grid tick they belong to: the first tick at or after their stamp (and
        # not before the next tick to apply, for frames that arrived after their own tick had passed).
        groups: dict[int, list[npt.NDArray[np.float64]]] = {}
        later: list[tuple[float, npt.NDArray[np.float64]]] = []
        for ts, vec in self._pending:
            k = max(self._ticks_done + 1, math.ceil((ts - anchor - _TIME_TOL_S) / self.tick_seconds))
            if k <= target:
                groups.setdefault(k, []).append(vec)
            else:
                later.append((ts, vec))
        self._pending = later

        # Between frame-carrying ticks only decay happens, so a run of m empty ticks is one factor**m: a call
        # hours late costs no more than a punctual one.
        done = self._ticks_done
        for k in sorted(groups):
            self._decay(k - done)
            for vec in groups[k]:
                self._add_frame(vec)
            done = k
        self._decay(target - done)
        self._ticks_done = target
        return self._refresh()

    def current(self) -> dict[str, int] | None:
        """The aggregate computed by the last :meth:`tick` (None before the first tick or when not visible)."""
        return None if self._current is None else dict(self._current)

    def _add_frame(self, vec: npt.NDArray[np.float64]) -> None:
        self._sum += vec
        self._weight += 1.0  # Every face frame counts once, at the tick it arrives in.

    def _decay(self, ticks: int) -> None:
        if ticks <= 0:
            return
        factor = math.pow(self.per_tick_factor, ticks)
        self._sum *= factor
        self._weight *= factor

    def _refresh(self) -> dict[str, int] | None:
        if self._weight <= 0.0 or self._weight < self.visibility_epsilon:
            self._current = None
        else:
            mean = self._sum / self._weight
            self._current = {e: _truncate(float(v)) for e, v in zip(EMOTIONS, mean, strict=True)}
        return self.current()


class ChangeTrigger:
    """EMILI's emotion-change trigger: lets the assistant speak unprompted after a marked change of expression.

    Fires when the L2 distance between this aggregate and the previous one passed to :meth:`update` is
    strictly above the current threshold and at least ``refractory_seconds`` have passed since the last
    trigger. The threshold is ``start_threshold * (1 - decay_per_second) ** seconds_since_reset``: it relaxes
    over a calm stretch so that a moderate change eventually counts, and resets after each trigger. The decay
    clock starts at the first update.
    """

    def __init__(
        self,
        start_threshold: float = 41.0,
        decay_per_second: float = 0.05,
        refractory_seconds: float = 5.0,
    ) -> None:
        if not (start_threshold >= 0 and math.isfinite(start_threshold)):
            raise ValueError(f"start_threshold must be >= 0, got {start_threshold!r}")
        if not 0.0 <= decay_per_second < 1.0:
            raise ValueError(f"decay_per_second must be in [0, 1), got {decay_per_second!r}")
        if not (refractory_seconds >= 0 and math.isfinite(refractory_seconds)):
            raise ValueError(f"refractory_seconds must be >= 0, got {refractory_seconds!r}")
        self.start_threshold: Final = float(start_threshold)
        self.decay_per_second: Final = float(decay_per_second)
        self.refractory_seconds: Final = float(refractory_seconds)
        self._previous: npt.NDArray[np.float64] | None = None
        self._reset_s: float | None = None
        self._last_trigger_s: float | None = None
        self.last_distance: float | None = None  # Distance computed by the last update; None when there was none.

    @property
    def last_trigger_s(self) -> float | None:
        return self._last_trigger_s

    def threshold(self, now_s: float) -> float:
        """The threshold a change must exceed at ``now_s``."""
        if self._reset_s is None:
            return self.start_threshold
        elapsed = max(0.0, now_s - self._reset_s)  # A clock stepping back must not raise the bar above start.
        return self.start_threshold * math.pow(1.0 - self.decay_per_second, elapsed)

    def update(self, aggregate: Mapping[str, int] | None, now_s: float) -> bool:
        """Feed the latest aggregate; True when the change since the previous one should trigger."""
        if self._reset_s is None:
            self._reset_s = now_s
        if aggregate is None:
            # Not visible: nothing to compare, and the next face is compared with nothing either, so that
            # (re)appearing in front of the camera does not count as a change of expression.
            self._previous = None
            self.last_distance = None
            return False
        vec = _vector(aggregate)
        previous, self._previous = self._previous, vec
        if previous is None:
            self.last_distance = None
            return False
        distance = float(np.linalg.norm(vec - previous))
        self.last_distance = distance
        if self._last_trigger_s is not None and now_s - self._last_trigger_s < self.refractory_seconds:
            return False
        if distance <= self.threshold(now_s):
            return False
        self._last_trigger_s = now_s
        self._reset_s = now_s
        return True


def change_is_large(previous: Mapping[str, int], current: Mapping[str, int], start_threshold: float = 41.0) -> bool:
    """Whether the change earns the "Change in emotions detected!" wording: L2 distance above half the start."""
    return l2_distance(previous, current) > start_threshold / 2.0


def short_message_reminder(text: str) -> str | None:
    """A system reminder for user messages under :data:`SHORT_MESSAGE_CHARS` characters, else None.

    The caller sends it right after the user message, where the original puts it. Length is counted after
    stripping surrounding whitespace, so padding does not hide a one-word reply.
    """
    if len(text.strip()) < SHORT_MESSAGE_CHARS:
        return _SHORT_MESSAGE_REMINDER
    return None
