"""Reaction flags for assistant turns from the user's FER time series (paper section 2.1).

An assistant turn is flagged when the user's face after the reply scores higher, under a weight vector,
than their face before it: ``delta = w . post - w . pre >= threshold``. Flagged turns become SFT data.

Choices made here (the reference leaves them open), so flags can be interpreted:

* Times. Every event time is Unix milliseconds: a reading's time is its ``capture_time_ms`` (its
  ``time_ms`` when missing), a message's time is its ``time_ms`` (the server clock; the assistant's is when
  the reply finished). :class:`WindowSettings` is in seconds and converted once. A reading whose capture
  time is more than ``max_clock_skew_s`` away from its own event time raises :class:`ValueError`: that is
  what seconds or deciseconds mixed into millisecond fields look like (a bug of the original code).
* Windows are closed intervals: pre ``[u - 0.5 s, u + 0.5 s]`` around the preceding user message,
  post ``[t, t + 1 s]`` after the assistant message, delayed ``[t + 5 s - 0.5 s, t + 5 s + 0.5 s]``.
  Readings without a face are ignored; an empty window makes the turn unflaggable (``flagged=False``,
  ``delta=None`` and a ``reason``).
* Scores are FER probabilities (0-1) averaged over the window, then multiplied by 100 for a
  ``"percent"`` vector (not rounded, unlike the original's integer frame scores).
* ``post="delayed"`` reads the face ``delay_s`` after the reply: the session's ``post_response_reading``
  event for the turn when its ``delay_s`` matches and it saw a face (its scores are the chat engine's
  decayed 0-100 aggregate, counted as one reading), else the mean of the FER readings in the delayed window.
* Unprompted assistant messages (spoken after an emotion change, with no user message to anchor on) are
  included by default: their pre window is the ``unprompted_before_s`` (1 s, as wide as the user window)
  just before the message, ``[t - 1 s, t)``, open at ``t`` so the reading at ``t`` counts only as "post".
  A prompted reply with no earlier user message is unflaggable (``reason="no_user_message"``).
* :data:`VARIANT_2025` is the 2025 code's flag: its weights and 0.1 threshold on plain normalised 0-1 scores,
  ``w . (post - pre)``, no z-scores. That code had population means and stds too, but only to describe the
  face to the model in its prompt. :data:`VARIANT_2025_ZSCORED` is an EMILI extension, not the 2025 code:
  the same weights and threshold on scores z-scored against those population statistics, so the threshold
  applies to ``sum_i w_i (post_i - pre_i) / std_i`` (the means cancel in the delta). The variant was
  described with the +5 s reading: use either with ``post="delayed"``.
* ``flagged`` is ``delta >= threshold`` with a 1e-9 allowance for floating-point rounding.
* A negative reaction (:func:`negative_reaction`, the evaluation gate's ``negative_reaction``) is the flag's
  mirror image on the same delta: the face's score fell by at least the threshold, ``delta <= -threshold``, and
  strictly fell (``delta < 0``), so with a threshold of 0 an unchanged face is neither. It is not stored in the
  label: it is read from the stored delta and the weight vector's threshold.
* FER gaps. Between a ``fer_unavailable`` event (from its ``since_ms``) and the next ``fer_restored`` (its
  ``restored_ms``; the end of time when none follows) the FER service was down: the face is unknown, which is
  not "no face". A turn whose pre or post window overlaps such a gap is unflaggable (``reason=
  "fer_unavailable"``) even when some readings fall in the window, since the mean would be over part of it;
  a ``post_response_reading`` marked ``fer_unavailable`` is never used (the delayed window decides, and it
  lies in the gap). Readings recorded inside a gap (client readings, late replies) are left out of every mean.

Everything is pure (no I/O). Cost: O(n log n) to sort the readings, then each window mean is two binary
searches and a prefix-sum difference.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import numpy as np
import numpy.typing as npt

from emili_session.emotions import EMOTIONS
from emili_session.events import EventKind

__all__ = [
    "EMOTION_TUNE_ORIGINAL",
    "N_EMOTIONS",
    "POPULATION_MEAN_2025",
    "POPULATION_STD_2025",
    "VARIANT_2025",
    "VARIANT_2025_ZSCORED",
    "PostMode",
    "ReadingIndex",
    "Reason",
    "Scale",
    "TurnReaction",
    "WeightVector",
    "WindowSettings",
    "fer_gaps",
    "flag_turns",
    "negative_reaction",
    "seconds_to_ms",
]

N_EMOTIONS: Final = len(EMOTIONS)

Scale = Literal["percent", "unit"]
PostMode = Literal["window", "delayed"]
PostSource = Literal["fer_window", "post_response_reading"]
PreAnchor = Literal["user_message", "before_assistant"]
Reason = Literal[
    "flagged", "below_threshold", "no_user_message", "fer_unavailable", "no_pre_readings", "no_post_readings"
]

_EMOTION_SET: Final = frozenset(EMOTIONS)
_SCALE_FACTOR: Final[Mapping[str, float]] = {"percent": 100.0, "unit": 1.0}
_FLAG_TOLERANCE: Final = 1e-9
_DELAY_MATCH_S: Final = 1e-3
# Probabilities a hair above 1 come from float sums in FER softmax output; percent values are far above.
_UNIT_SLACK: Final = 1e-6

FloatArray = npt.NDArray[np.float64]


def _floats(values: Iterable[float], what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != N_EMOTIONS:
        raise ValueError(f"{what} needs {N_EMOTIONS} values in the order {EMOTIONS}; got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} must be finite; got {out}")
    return out


def seconds_to_ms(seconds: float) -> float:
    """Seconds to milliseconds, rounded to a nanosecond: 1.1 s is 1100 ms, not 1100.0000000000002 (a window edge)."""
    return round(seconds * 1000.0, 6)


@dataclass(frozen=True, slots=True)
class WeightVector:
    """Per-emotion weights (in :data:`EMOTIONS` order) that turn a face's scores into one reaction score.

    ``scale`` is the unit the weights expect: ``"percent"`` (0-100) or ``"unit"`` (0-1). With
    ``zscore_mean``/``zscore_std`` (both in that scale) scores are z-scored before weighting.
    """

    name: str
    weights: tuple[float, ...]
    scale: Scale = "percent"
    threshold: float = 0.0
    zscore_mean: tuple[float, ...] | None = None
    zscore_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.scale not in get_args(Scale):
            raise ValueError(f"scale must be one of {get_args(Scale)}; got {self.scale!r}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite; got {self.threshold}")
        object.__setattr__(self, "weights", _floats(self.weights, "weights"))
        if (self.zscore_mean is None) != (self.zscore_std is None):
            raise ValueError("zscore_mean and zscore_std must be given together")
        if self.zscore_mean is not None and self.zscore_std is not None:
            std = _floats(self.zscore_std, "zscore_std")
            if any(s <= 0.0 for s in std):
                raise ValueError(f"zscore_std must be positive; got {std}")
            object.__setattr__(self, "zscore_mean", _floats(self.zscore_mean, "zscore_mean"))
            object.__setattr__(self, "zscore_std", std)

    @classmethod
    def from_mapping(
        cls,
        name: str,
        weights: Mapping[str, float],
        *,
        scale: Scale = "percent",
        threshold: float = 0.0,
        zscore_mean: Mapping[str, float] | None = None,
        zscore_std: Mapping[str, float] | None = None,
    ) -> WeightVector:
        """Build from ``{emotion: weight}``; emotions left out weigh 0 (z-scoring maps must be complete)."""
        unknown = set(weights) - set(EMOTIONS)
        if unknown:
            raise ValueError(f"unknown emotions {sorted(unknown)}; expected some of {EMOTIONS}")
        return cls(
            name,
            tuple(weights.get(e, 0.0) for e in EMOTIONS),
            scale,
            threshold,
            None if zscore_mean is None else tuple(zscore_mean[e] for e in EMOTIONS),
            None if zscore_std is None else tuple(zscore_std[e] for e in EMOTIONS),
        )

    @property
    def zscored(self) -> bool:
        return self.zscore_mean is not None

    def in_scale(self, unit_scores: FloatArray) -> FloatArray:
        """0-1 scores converted to this vector's scale (not z-scored)."""
        return unit_scores * _SCALE_FACTOR[self.scale]

    def score(self, unit_scores: FloatArray) -> float:
        """The reaction score ``w . s`` of 0-1 scores (in :data:`EMOTIONS` order)."""
        scores = self.in_scale(np.asarray(unit_scores, dtype=np.float64))
        if self.zscore_mean is not None and self.zscore_std is not None:
            scores = (scores - np.asarray(self.zscore_mean)) / np.asarray(self.zscore_std)
        return float(np.dot(np.asarray(self.weights), scores))


EMOTION_TUNE_ORIGINAL: Final = WeightVector.from_mapping(
    "emotion_tune_original",
    {"happy": 5.0, "neutral": 1.0, "sad": -2.0, "surprise": 1.0, "angry": -2.0, "fear": -2.0, "disgust": -5.0},
    scale="percent",
    threshold=0.0,
)
# The reference's population statistics of 0-1 FER scores, in EMOTIONS order.
POPULATION_MEAN_2025: Final = (0.128, 0.022, 0.061, 0.028, 0.147, 0.006, 0.608)
POPULATION_STD_2025: Final = (0.068, 0.035, 0.041, 0.08, 0.078, 0.019, 0.174)
# The 2025 code's flag: plain normalised scores (each emotion over their sum, 0-1), no z-scores.
VARIANT_2025: Final = WeightVector("variant_2025", (-1.5, -5.0, -1.0, 1.0, -1.0, 0.0, 0.3), "unit", 0.1)
# EMILI's extension (not the 2025 code): the same weights and threshold on population z-scores.
VARIANT_2025_ZSCORED: Final = WeightVector(
    "variant_2025_zscored",
    VARIANT_2025.weights,
    scale="unit",
    threshold=VARIANT_2025.threshold,
    zscore_mean=POPULATION_MEAN_2025,
    zscore_std=POPULATION_STD_2025,
)


@dataclass(frozen=True, slots=True)
class WindowSettings:
    """Where the before and after faces are read, in seconds relative to the anchoring message."""

    user_before_s: float = 0.5  # Pre window: [u - user_before_s, u + user_after_s].
    user_after_s: float = 0.5
    post_start_s: float = 0.0  # Post window: [t + post_start_s, t + post_end_s].
    post_end_s: float = 1.0
    delay_s: float = 5.0  # Delayed post: the reading delay_s after t ...
    delayed_half_window_s: float = 0.5  # ... else readings in [t + delay_s -+ this].
    unprompted_before_s: float = 1.0  # Pre window of an unprompted turn: [t - this, t).
    include_unprompted: bool = True
    user_time: Literal["server", "client"] = "server"  # Client: the message's client_time_ms when set.
    max_clock_skew_s: float | None = 3600.0  # None: no units check on reading times.

    def __post_init__(self) -> None:
        for name in ("user_before_s", "user_after_s", "delay_s", "delayed_half_window_s", "unprompted_before_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0; got {value}")
        if not (math.isfinite(self.post_start_s) and math.isfinite(self.post_end_s)):
            raise ValueError("post_start_s and post_end_s must be finite")
        if self.post_end_s < self.post_start_s:
            raise ValueError(f"post_end_s ({self.post_end_s}) is before post_start_s ({self.post_start_s})")
        if self.user_time not in ("server", "client"):
            raise ValueError(f"user_time must be 'server' or 'client'; got {self.user_time!r}")
        if self.max_clock_skew_s is not None and not self.max_clock_skew_s > 0.0:
            raise ValueError(f"max_clock_skew_s must be positive or None; got {self.max_clock_skew_s}")

    def message_time_ms(self, event: Mapping[str, Any]) -> float:
        """A user message's time on the clock these settings use."""
        if self.user_time == "client":
            client = event.get("client_time_ms")
            # 0 is protobuf's "unset": such a message has only the server time.
            if isinstance(client, int | float) and client > 0:
                return float(client)
        return float(event["time_ms"])

    def user_window_ms(self, event: Mapping[str, Any]) -> tuple[float, float]:
        """The closed pre window ``[u - user_before_s, u + user_after_s]`` around a user message, in ms."""
        u = self.message_time_ms(event)
        return u - seconds_to_ms(self.user_before_s), u + seconds_to_ms(self.user_after_s)


def _row(values: Mapping[str, Any], what: str) -> list[float]:
    if not values.keys() <= _EMOTION_SET:
        raise ValueError(f"{what}: unknown emotions {sorted(set(values) - _EMOTION_SET)}")
    # Emotions left out count as 0, as the chat engine's aggregator reads them.
    return [float(values.get(e, 0.0)) for e in EMOTIONS]


def _check_unit(rows: FloatArray, whats: Sequence[str], raw: Sequence[Mapping[str, Any]], limit: str) -> None:
    bad = ~np.all(np.isfinite(rows) & (rows >= 0.0) & (rows <= 1.0 + _UNIT_SLACK), axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{whats[i]}: expected {limit}; got {dict(raw[i])}")


def _unit_vector(values: Mapping[str, Any], what: str, *, divisor: float = 1.0) -> FloatArray:
    vec: FloatArray = np.array(_row(values, what), dtype=np.float64) / divisor
    _check_unit(vec[None, :], [what], [values], "0-1 probabilities" if divisor == 1.0 else f"0-{divisor:g} scores")
    return vec


Gap = tuple[float, float]  # [start_ms, end_ms] while the FER service was unavailable.


def fer_gaps(events: Iterable[Mapping[str, Any]]) -> list[Gap]:
    """The closed intervals, in ms, when FER was unavailable (``fer_unavailable`` to the next ``fer_restored``;
    open-ended when none follows), in order."""
    gaps: list[Gap] = []
    start: float | None = None
    for event in events:
        kind = event.get("kind")
        if kind == EventKind.FER_UNAVAILABLE and start is None:
            since = event.get("since_ms")
            start = float(since) if isinstance(since, int | float) and since > 0 else float(event["time_ms"])
        elif kind == EventKind.FER_RESTORED and start is not None:
            restored = event.get("restored_ms")
            end = float(restored) if isinstance(restored, int | float) and restored > 0 else float(event["time_ms"])
            gaps.append((start, max(start, end)))
            start = None
    if start is not None:
        gaps.append((start, math.inf))
    return gaps


def _overlaps(gaps: Sequence[Gap], lo_ms: float, hi_ms: float) -> bool:
    return any(start <= hi_ms and lo_ms <= end for start, end in gaps)


def _in_gap(gaps: Sequence[Gap], at_ms: float) -> bool:
    return any(start <= at_ms <= end for start, end in gaps)


class ReadingIndex:
    """A session's face-found FER readings sorted by capture time, with O(log n) window means."""

    __slots__ = ("_cumsum", "_times", "_values")

    def __init__(self, times_ms: Sequence[float], values: FloatArray) -> None:
        order = np.argsort(np.asarray(times_ms, dtype=np.float64), kind="stable")
        self._times: list[float] = [float(times_ms[i]) for i in order]
        self._values: FloatArray = np.asarray(values, dtype=np.float64).reshape(-1, N_EMOTIONS)[order]
        self._cumsum: FloatArray = np.vstack([np.zeros((1, N_EMOTIONS)), np.cumsum(self._values, axis=0)])

    @classmethod
    def from_events(
        cls, events: Iterable[Mapping[str, Any]], *, max_clock_skew_s: float | None = 3600.0
    ) -> ReadingIndex:
        """Index the ``fer_reading`` events that found a face (probabilities 0-1)."""
        times: list[float] = []
        rows: list[list[float]] = []
        whats: list[str] = []
        raw: list[Mapping[str, Any]] = []
        events = list(events)
        gaps = fer_gaps(events)
        for event in events:
            if event.get("kind") != EventKind.FER_READING or not event.get("face_found"):
                continue
            event_id = event.get("event_id", "?")
            time_ms = float(event["time_ms"])
            capture = event.get("capture_time_ms")
            at = float(capture) if isinstance(capture, int | float) and capture > 0 else time_ms
            if max_clock_skew_s is not None and abs(at - time_ms) > max_clock_skew_s * 1000.0:
                raise ValueError(
                    f"fer_reading {event_id}: capture_time_ms {at:.0f} is {abs(at - time_ms) / 1000.0:.0f} s from "
                    f"its time_ms {time_ms:.0f}; both must be Unix milliseconds (seconds or deciseconds mixed in?)"
                )
            if _in_gap(gaps, at):
                continue  # FER was down then: whatever this is, it is not part of a continuous face series.
            probabilities = event.get("probabilities") or {}
            times.append(at)
            whats.append(f"fer_reading {event_id}")
            raw.append(probabilities)
            rows.append(_row(probabilities, whats[-1]))
        values = np.array(rows, dtype=np.float64).reshape(-1, N_EMOTIONS)
        _check_unit(values, whats, raw, "0-1 probabilities")
        return cls(times, values)

    def __len__(self) -> int:
        return len(self._times)

    @property
    def first_time_ms(self) -> float | None:
        return self._times[0] if self._times else None

    def _bounds(self, lo_ms: float, hi_ms: float, include_hi: bool) -> tuple[int, int]:
        start = bisect_left(self._times, lo_ms)
        stop = bisect_right(self._times, hi_ms) if include_hi else bisect_left(self._times, hi_ms)
        return start, max(start, stop)

    def mean(self, lo_ms: float, hi_ms: float, *, include_hi: bool = True) -> tuple[FloatArray | None, int]:
        """Mean 0-1 scores of the readings in ``[lo, hi]`` (``[lo, hi)`` without ``include_hi``), and their count."""
        start, stop = self._bounds(lo_ms, hi_ms, include_hi)
        count = stop - start
        if count == 0:
            return None, 0
        return (self._cumsum[stop] - self._cumsum[start]) / count, count

    def values(self, lo_ms: float, hi_ms: float, *, include_hi: bool = True) -> FloatArray:
        """The readings' 0-1 scores in the window, one row each, in time order."""
        start, stop = self._bounds(lo_ms, hi_ms, include_hi)
        return self._values[start:stop].copy()


@dataclass(frozen=True, slots=True)
class TurnReaction:
    """One assistant turn's reaction. Scores are per-emotion window means in the weight vector's scale."""

    event_id: str
    turn_id: str | None
    time_ms: int
    unprompted: bool
    assistant_text: str
    user_text: str | None  # The latest earlier user message (context only for unprompted turns).
    model_id: str | None
    model_arm: str | None
    pre_anchor: PreAnchor
    pre_scores: dict[str, float] | None
    post_scores: dict[str, float] | None
    pre_reaction: float | None
    post_reaction: float | None
    delta: float | None
    flagged: bool
    reason: Reason
    weight_name: str
    scale: Scale
    post_mode: PostMode
    post_source: PostSource | None
    n_pre: int
    n_post: int

    @property
    def flaggable(self) -> bool:
        return self.delta is not None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def negative_reaction(delta: float | None, threshold: float) -> bool | None:
    """Whether the user's reaction to a reply was negative (see the module's notes); None when the delta is
    unknown (an unflaggable turn: no reaction was read)."""
    if delta is None:
        return None
    return delta < 0.0 and delta <= -threshold + _FLAG_TOLERANCE


def _scores_dict(weights: WeightVector, unit: FloatArray | None) -> dict[str, float] | None:
    if unit is None:
        return None
    return {e: float(v) for e, v in zip(EMOTIONS, weights.in_scale(unit), strict=True)}


def _delayed_readings(events: Sequence[Mapping[str, Any]], delay_s: float) -> dict[str, FloatArray]:
    found: dict[str, FloatArray] = {}
    for event in events:
        if event.get("kind") != EventKind.POST_RESPONSE_READING:
            continue
        scores, turn_id = event.get("scores"), event.get("turn_id")
        delay = event.get("delay_s")
        # A reading taken at another delay is not the one asked for; None scores mean no face was visible;
        # one taken while FER was unavailable knows nothing of the face.
        if turn_id is None or scores is None or not isinstance(delay, int | float) or event.get("fer_unavailable"):
            continue
        if abs(float(delay) - delay_s) > _DELAY_MATCH_S:
            continue
        found.setdefault(
            str(turn_id), _unit_vector(scores, f"post_response_reading {event.get('event_id', '?')}", divisor=100.0)
        )
    return found


def flag_turns(
    events: Iterable[Mapping[str, Any]],
    weights: WeightVector,
    windows: WindowSettings = WindowSettings(),
    post: PostMode = "window",
) -> list[TurnReaction]:
    """One :class:`TurnReaction` per assistant message of one session's events (in event order)."""
    if post not in get_args(PostMode):
        raise ValueError(f"post must be one of {get_args(PostMode)}; got {post!r}")
    events = list(events)
    index = ReadingIndex.from_events(events, max_clock_skew_s=windows.max_clock_skew_s)
    gaps = fer_gaps(events)
    delayed = _delayed_readings(events, windows.delay_s) if post == "delayed" else {}
    out: list[TurnReaction] = []
    last_user: Mapping[str, Any] | None = None
    for event in events:
        kind = event.get("kind")
        if kind == EventKind.USER_MESSAGE:
            last_user = event
        elif kind == EventKind.ASSISTANT_MESSAGE:
            unprompted = bool(event.get("unprompted", False))
            if unprompted and not windows.include_unprompted:
                continue
            out.append(_turn(event, last_user, unprompted, index, delayed, weights, windows, post, gaps))
    return out


def _turn(
    event: Mapping[str, Any],
    last_user: Mapping[str, Any] | None,
    unprompted: bool,
    index: ReadingIndex,
    delayed: Mapping[str, FloatArray],
    weights: WeightVector,
    windows: WindowSettings,
    post: PostMode,
    gaps: Sequence[Gap] = (),
) -> TurnReaction:
    t = float(event["time_ms"])
    turn_id = event.get("turn_id")
    pre: FloatArray | None
    in_gap = False
    if unprompted:
        lo = t - seconds_to_ms(windows.unprompted_before_s)
        pre, n_pre = index.mean(lo, t, include_hi=False)
        in_gap = _overlaps(gaps, lo, t)
    elif last_user is not None:
        pre, n_pre = index.mean(*windows.user_window_ms(last_user))
        in_gap = _overlaps(gaps, *windows.user_window_ms(last_user))
    else:
        pre, n_pre = None, 0

    after: FloatArray | None
    source: PostSource | None = "fer_window"
    if post == "delayed" and turn_id is not None and str(turn_id) in delayed:
        after, n_post, source = delayed[str(turn_id)], 1, "post_response_reading"
    elif post == "delayed":
        at = t + seconds_to_ms(windows.delay_s)
        half = seconds_to_ms(windows.delayed_half_window_s)
        after, n_post = index.mean(at - half, at + half)
        in_gap = in_gap or _overlaps(gaps, at - half, at + half)
    else:
        lo, hi = t + seconds_to_ms(windows.post_start_s), t + seconds_to_ms(windows.post_end_s)
        after, n_post = index.mean(lo, hi)
        in_gap = in_gap or _overlaps(gaps, lo, hi)
    if in_gap:  # Part of a window is unknown: no reaction is read from it (see the module's notes).
        pre = after = None
    if after is None:
        source = None

    pre_reaction = None if pre is None else weights.score(pre)
    post_reaction = None if after is None else weights.score(after)
    delta = None if pre_reaction is None or post_reaction is None else post_reaction - pre_reaction
    reason: Reason
    if not unprompted and last_user is None:
        reason = "no_user_message"
    elif in_gap:
        reason = "fer_unavailable"
    elif pre_reaction is None:
        reason = "no_pre_readings"
    elif delta is None:
        reason = "no_post_readings"
    else:
        reason = "flagged" if delta >= weights.threshold - _FLAG_TOLERANCE else "below_threshold"
    model_id, model_arm = event.get("model_id"), event.get("model_arm")
    return TurnReaction(
        event_id=str(event.get("event_id", "")),
        turn_id=None if turn_id is None else str(turn_id),
        time_ms=int(event["time_ms"]),
        unprompted=unprompted,
        assistant_text=str(event.get("text", "")),
        user_text=None if last_user is None else str(last_user.get("text", "")),
        model_id=None if model_id is None else str(model_id),
        model_arm=None if model_arm is None else str(model_arm),
        pre_anchor="before_assistant" if unprompted else "user_message",
        pre_scores=_scores_dict(weights, pre),
        post_scores=_scores_dict(weights, after),
        pre_reaction=pre_reaction,
        post_reaction=post_reaction,
        delta=delta,
        flagged=reason == "flagged",
        reason=reason,
        weight_name=weights.name,
        scale=weights.scale,
        post_mode=post,
        post_source=source,
        n_pre=n_pre,
        n_post=n_post,
    )
