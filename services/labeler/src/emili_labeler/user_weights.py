"""Per-user emotion weights learned by linear regression (paper section 2.2).

Users show the same feeling with different faces, so each user gets weights ``w`` (and an intercept) with
``target ~ b + w . z``, where ``z`` are the user's FER scores z-scored against their own neutral baseline.
The fitted weights become a :class:`~emili_labeler.reactions.WeightVector` for :func:`flag_turns`.

Z-scoring is this project's extension, not the research group's code: their 2025 variant flagged turns on
plain normalised scores (:data:`~emili_labeler.reactions.VARIANT_2025`) and used its population means and stds
only to describe the face in the model's prompt. Learned weights with :data:`REFERENCE_POPULATION_BASELINE`
therefore flag like :data:`~emili_labeler.reactions.VARIANT_2025_ZSCORED`, not like the 2025 variant.

Choices made here, so the weights can be interpreted:

* A :class:`Sample` is ``(user_id, scores, target)``: 0-1 FER scores in :data:`EMOTIONS` order (percent
  scores are rejected, not rescaled) and a number, e.g. the valence of the user's self-report or of their
  next message; computing targets is the caller's business. :func:`samples_from_session` pairs targets
  keyed by ``user_message`` event id with the face around that message (the reaction pre window).
* Baseline (the user's neutral period): the face readings in the first ``seconds`` of each session's face
  data, or those before the user's first message (:class:`BaselineWindow`), pooled over the user's
  sessions. ``z = (x - mean) / std`` with the sample std (ddof 1) floored at ``min_std`` (0.01, one point
  out of 100). With fewer than ``min_readings`` readings, the population baseline is used instead: by
  default the 2025 code's population means/stds (:data:`REFERENCE_POPULATION_BASELINE`).
* Population weights are fitted first on all users' pooled, per-user z-scored samples (ridge toward 0 with
  a small ``ridge_lambda`` for stability). A user's weights minimise
  ``||y - b - Z w||^2 + lambda ||w - w_pop||^2``; the intercept ``b`` is not penalised (the data are
  centred, so ``w = (Zc'Zc + lambda I)^-1 (Zc'yc + lambda w_pop)``). ``lambda`` counts roughly like that
  many samples whose z-features vary with unit variance: users with little data stay near the population.
  ``lambda = 0`` is the limit lambda -> 0+: the least-squares solution closest to ``w_pop``.
* A user with fewer than ``min_samples`` samples keeps the population weights (``fell_back``); only the
  intercept is refitted to their mean target.
* FER probabilities sum to 1, so within one user ``sum_i std_i z_i`` is constant: the weights are only
  determined up to adding ``c * std``. The ridge prior settles that direction, and it does not matter for
  reactions: ``(z_post - z_pre) . std = sum(post - pre) = 0``.
* Fit statistics are in-sample: R^2 (None when the targets do not vary or n < 2) and the residual RMS
  (``residual_std``, ddof 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from emili_labeler.reactions import (
    N_EMOTIONS,
    POPULATION_MEAN_2025,
    POPULATION_STD_2025,
    ReadingIndex,
    WeightVector,
    WindowSettings,
    seconds_to_ms,
)
from emili_session.emotions import EMOTIONS
from emili_session.events import EventKind

__all__ = [
    "DEFAULT_MIN_STD",
    "REFERENCE_POPULATION_BASELINE",
    "Baseline",
    "BaselineWindow",
    "PopulationWeights",
    "Sample",
    "UserWeights",
    "baseline_readings",
    "baseline_stats",
    "fit_population_weights",
    "fit_user_weights",
    "fit_users",
    "samples_from_session",
    "to_weight_vector",
    "user_baseline",
]

FloatArray = npt.NDArray[np.float64]
BaselineSource = Literal["user", "population"]

DEFAULT_MIN_STD: Final = 0.01
_DEFAULT_WINDOWS: Final = WindowSettings()
_UNIT_SLACK: Final = 1e-6


class Sample(NamedTuple):
    user_id: str
    scores: Sequence[float] | FloatArray  # 0-1 FER scores in EMOTIONS order.
    target: float


def _vector(values: Iterable[float], what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != N_EMOTIONS or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} needs {N_EMOTIONS} finite values in the order {EMOTIONS}; got {out}")
    return out


def _by_emotion(values: Sequence[float]) -> dict[str, float]:
    return dict(zip(EMOTIONS, values, strict=True))


def _from_emotion(values: Mapping[str, Any], what: str) -> tuple[float, ...]:
    if set(values) != set(EMOTIONS):
        raise ValueError(f"{what} needs exactly the emotions {EMOTIONS}; got {sorted(values)}")
    return _vector((values[e] for e in EMOTIONS), what)


def _unit_rows(readings: Sequence[Sequence[float]] | FloatArray, what: str) -> FloatArray:
    rows = np.asarray(readings, dtype=np.float64)
    if rows.size == 0:
        return np.zeros((0, N_EMOTIONS))
    if rows.ndim != 2 or rows.shape[1] != N_EMOTIONS:
        raise ValueError(f"{what} must be rows of {N_EMOTIONS} scores; got shape {rows.shape}")
    if not np.all(np.isfinite(rows)) or np.any(rows < 0.0) or np.any(rows > 1.0 + _UNIT_SLACK):
        raise ValueError(f"{what} must be 0-1 FER probabilities (percent scores? divide by 100)")
    return rows


# --- baselines ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Baseline:
    """Per-emotion mean and std (0-1 units) that a user's scores are z-scored against."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    n_readings: int
    source: BaselineSource

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _vector(self.mean, "baseline mean"))
        object.__setattr__(self, "std", _vector(self.std, "baseline std"))
        if any(s <= 0.0 for s in self.std):
            raise ValueError(f"baseline std must be positive; got {self.std}")
        if self.source not in ("user", "population"):
            raise ValueError(f"baseline source must be 'user' or 'population'; got {self.source!r}")

    def zscore(self, scores: FloatArray) -> FloatArray:
        z: FloatArray = (np.asarray(scores, dtype=np.float64) - np.asarray(self.mean)) / np.asarray(self.std)
        return z

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": _by_emotion(self.mean),
            "std": _by_emotion(self.std),
            "n_readings": self.n_readings,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Baseline:
        return cls(
            _from_emotion(data["mean"], "baseline mean"),
            _from_emotion(data["std"], "baseline std"),
            int(data["n_readings"]),
            data["source"],
        )


REFERENCE_POPULATION_BASELINE: Final = Baseline(POPULATION_MEAN_2025, POPULATION_STD_2025, 0, "population")


@dataclass(frozen=True, slots=True)
class BaselineWindow:
    """Which of a session's readings count as the user's neutral period."""

    mode: Literal["first_seconds", "before_first_message"] = "first_seconds"
    seconds: float = 30.0  # first_seconds: [first face reading, + seconds].

    def __post_init__(self) -> None:
        if self.mode not in ("first_seconds", "before_first_message"):
            raise ValueError(f"mode must be 'first_seconds' or 'before_first_message'; got {self.mode!r}")
        if not (math.isfinite(self.seconds) and self.seconds > 0.0):
            raise ValueError(f"seconds must be positive; got {self.seconds}")


def baseline_readings(
    events: Iterable[Mapping[str, Any]],
    window: BaselineWindow = BaselineWindow(),
    windows: WindowSettings = _DEFAULT_WINDOWS,
) -> FloatArray:
    """One session's baseline readings (face found, 0-1), one row each; ``windows`` gives the clock and units check.

    ``first_seconds``: readings within ``seconds`` of the session's first face reading (inclusive).
    ``before_first_message``: readings strictly before the first user message (all of them without one).
    """
    events = list(events)
    index = ReadingIndex.from_events(events, max_clock_skew_s=windows.max_clock_skew_s)
    first = index.first_time_ms
    if first is None:
        return np.zeros((0, N_EMOTIONS))
    if window.mode == "first_seconds":
        return index.values(first, first + seconds_to_ms(window.seconds))
    message = next((e for e in events if e.get("kind") == EventKind.USER_MESSAGE), None)
    end = math.inf if message is None else windows.message_time_ms(message)
    return index.values(first, end, include_hi=False)


def baseline_stats(
    readings: Sequence[Sequence[float]] | FloatArray, *, min_std: float = DEFAULT_MIN_STD
) -> tuple[FloatArray, FloatArray]:
    """Per-emotion mean and std (ddof 1; 0 for one reading) of 0-1 readings, the std floored at ``min_std``."""
    if not min_std > 0.0:
        raise ValueError(f"min_std must be positive; got {min_std}")
    rows = _unit_rows(readings, "baseline readings")
    if len(rows) == 0:
        raise ValueError("a baseline needs at least one reading")
    std = rows.std(axis=0, ddof=1) if len(rows) > 1 else np.zeros(N_EMOTIONS)
    return rows.mean(axis=0), np.maximum(std, min_std)


def user_baseline(
    readings: Sequence[Sequence[float]] | FloatArray,
    *,
    fallback: Baseline = REFERENCE_POPULATION_BASELINE,
    min_readings: int = 5,
    min_std: float = DEFAULT_MIN_STD,
) -> Baseline:
    """The user's own baseline, or ``fallback`` when they have fewer than ``min_readings`` readings."""
    rows = _unit_rows(readings, "baseline readings")
    if len(rows) < max(1, min_readings):
        return fallback
    mean, std = baseline_stats(rows, min_std=min_std)
    return Baseline(tuple(mean.tolist()), tuple(std.tolist()), len(rows), "user")


# --- fitting -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fit:
    weights: FloatArray
    intercept: float
    r2: float | None
    residual_std: float | None


def _stats(z: FloatArray, y: FloatArray, weights: FloatArray, intercept: float) -> _Fit:
    residual = y - (intercept + z @ weights)
    ss_res = float(residual @ residual)
    centred = y - y.mean()
    ss_tot = float(centred @ centred)
    # Targets that (numerically) do not vary leave R^2 undefined.
    r2 = 1.0 - ss_res / ss_tot if len(y) >= 2 and ss_tot > 1e-12 * max(1.0, float(y @ y)) else None
    return _Fit(weights, intercept, r2, math.sqrt(ss_res / len(y)))


def _ridge_toward(z: FloatArray, y: FloatArray, prior: FloatArray, lam: float) -> _Fit:
    z_mean, y_mean = z.mean(axis=0), float(y.mean())
    zc, yc = z - z_mean, y - y_mean
    if lam > 0.0:
        weights = np.linalg.solve(zc.T @ zc + lam * np.eye(N_EMOTIONS), zc.T @ yc + lam * prior)
    else:
        # lambda -> 0+: least squares, and among its solutions the one nearest the prior.
        step, *_ = np.linalg.lstsq(zc, yc - zc @ prior, rcond=None)
        weights = prior + step
    return _stats(z, y, weights, y_mean - float(z_mean @ weights))


def _design(
    samples: Sequence[Sample], baselines: Mapping[str, Baseline], fallback: Baseline
) -> tuple[FloatArray, FloatArray]:
    if not samples:
        return np.zeros((0, N_EMOTIONS)), np.zeros(0)
    raw = _unit_rows([list(s.scores) for s in samples], "sample scores")
    y = np.array([float(s.target) for s in samples], dtype=np.float64)
    if not np.all(np.isfinite(y)):
        raise ValueError("sample targets must be finite")
    z = np.empty_like(raw)
    for i, sample in enumerate(samples):
        z[i] = baselines.get(sample.user_id, fallback).zscore(raw[i])
    return z, y


def _check_lambda(lam: float) -> None:
    if not (math.isfinite(lam) and lam >= 0.0):
        raise ValueError(f"ridge_lambda must be finite and >= 0; got {lam}")


@dataclass(frozen=True, slots=True)
class PopulationWeights:
    """Weights fitted on every user's pooled samples: the prior and the fallback for each user."""

    weights: tuple[float, ...]
    intercept: float
    n_samples: int
    n_users: int
    r2: float | None
    residual_std: float | None
    ridge_lambda: float
    baseline: Baseline  # Z-scoring for users without a baseline of their own.

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _vector(self.weights, "population weights"))

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": _by_emotion(self.weights),
            "intercept": self.intercept,
            "n_samples": self.n_samples,
            "n_users": self.n_users,
            "r2": self.r2,
            "residual_std": self.residual_std,
            "ridge_lambda": self.ridge_lambda,
            "baseline": self.baseline.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PopulationWeights:
        return cls(
            _from_emotion(data["weights"], "population weights"),
            float(data["intercept"]),
            int(data["n_samples"]),
            int(data["n_users"]),
            None if data["r2"] is None else float(data["r2"]),
            None if data["residual_std"] is None else float(data["residual_std"]),
            float(data["ridge_lambda"]),
            Baseline.from_json(data["baseline"]),
        )


@dataclass(frozen=True, slots=True)
class UserWeights:
    """One user's fitted weights (on baseline z-scores) with the statistics of the fit."""

    user_id: str
    weights: tuple[float, ...]
    intercept: float
    n_samples: int
    r2: float | None
    residual_std: float | None
    ridge_lambda: float
    fell_back: bool  # True: fewer than min_samples samples, the population weights are used.
    baseline: Baseline
    prior_weights: tuple[float, ...]  # What the fit was shrunk toward (the population weights).

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _vector(self.weights, "user weights"))
        object.__setattr__(self, "prior_weights", _vector(self.prior_weights, "prior weights"))

    def predict(self, scores: Sequence[Sequence[float]] | FloatArray) -> FloatArray:
        """Predicted targets for rows of 0-1 scores."""
        z = self.baseline.zscore(_unit_rows(scores, "scores"))
        predicted: FloatArray = self.intercept + z @ np.asarray(self.weights)
        return predicted

    def to_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "weights": _by_emotion(self.weights),
            "intercept": self.intercept,
            "n_samples": self.n_samples,
            "r2": self.r2,
            "residual_std": self.residual_std,
            "ridge_lambda": self.ridge_lambda,
            "fell_back": self.fell_back,
            "baseline": self.baseline.to_json(),
            "prior_weights": _by_emotion(self.prior_weights),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UserWeights:
        return cls(
            str(data["user_id"]),
            _from_emotion(data["weights"], "user weights"),
            float(data["intercept"]),
            int(data["n_samples"]),
            None if data["r2"] is None else float(data["r2"]),
            None if data["residual_std"] is None else float(data["residual_std"]),
            float(data["ridge_lambda"]),
            bool(data["fell_back"]),
            Baseline.from_json(data["baseline"]),
            _from_emotion(data["prior_weights"], "prior weights"),
        )


def fit_population_weights(
    samples: Sequence[Sample],
    *,
    baselines: Mapping[str, Baseline] | None = None,
    fallback_baseline: Baseline = REFERENCE_POPULATION_BASELINE,
    ridge_lambda: float = 1.0,
) -> PopulationWeights:
    """Pooled fit over all users, each user's scores z-scored against their baseline (else ``fallback_baseline``)."""
    _check_lambda(ridge_lambda)
    if not samples:
        raise ValueError("population weights need at least one sample")
    z, y = _design(samples, baselines or {}, fallback_baseline)
    fit = _ridge_toward(z, y, np.zeros(N_EMOTIONS), ridge_lambda)
    return PopulationWeights(
        tuple(fit.weights.tolist()),
        fit.intercept,
        len(samples),
        len({s.user_id for s in samples}),
        fit.r2,
        fit.residual_std,
        ridge_lambda,
        fallback_baseline,
    )


def fit_user_weights(
    samples: Sequence[Sample],
    population: PopulationWeights | None,
    *,
    baseline: Baseline | None = None,
    user_id: str | None = None,
    min_samples: int = 5,
    ridge_lambda: float = 10.0,
) -> UserWeights:
    """Fit one user's weights, shrunk toward ``population`` (toward zero weights when it is None).

    ``samples`` must all belong to one user (``user_id`` names the user when there are none). ``baseline``
    defaults to the population's fallback baseline (the reference population stats without a population).
    """
    _check_lambda(ridge_lambda)
    ids = {s.user_id for s in samples}
    if user_id is not None:
        ids.add(user_id)
    if len(ids) != 1:
        raise ValueError(f"fit_user_weights fits one user; got user ids {sorted(ids)}")
    (uid,) = ids
    if baseline is None:
        baseline = population.baseline if population is not None else REFERENCE_POPULATION_BASELINE
    prior = np.asarray(population.weights) if population is not None else np.zeros(N_EMOTIONS)
    z, y = _design(samples, {uid: baseline}, baseline)
    fell_back = len(samples) < max(1, min_samples)
    if not samples:
        fit = _Fit(prior, population.intercept if population is not None else 0.0, None, None)
    elif fell_back:
        # Too few samples to trust any slope; the intercept is unpenalised, so it still follows the data.
        fit = _stats(z, y, prior, float(y.mean() - z.mean(axis=0) @ prior))
    else:
        fit = _ridge_toward(z, y, prior, ridge_lambda)
    return UserWeights(
        uid,
        tuple(np.asarray(fit.weights).tolist()),
        fit.intercept,
        len(samples),
        fit.r2,
        fit.residual_std,
        ridge_lambda,
        fell_back,
        baseline,
        tuple(prior.tolist()),
    )


def fit_users(
    samples: Sequence[Sample],
    population: PopulationWeights | None = None,
    *,
    baselines: Mapping[str, Baseline] | None = None,
    fallback_baseline: Baseline = REFERENCE_POPULATION_BASELINE,
    min_samples: int = 5,
    ridge_lambda: float = 10.0,
    population_lambda: float = 1.0,
) -> tuple[PopulationWeights, dict[str, UserWeights]]:
    """Fit the population on the pooled samples (unless given), then every user toward it."""
    baselines = baselines or {}
    if population is None:
        population = fit_population_weights(
            samples, baselines=baselines, fallback_baseline=fallback_baseline, ridge_lambda=population_lambda
        )
    by_user: dict[str, list[Sample]] = {}
    for sample in samples:
        by_user.setdefault(sample.user_id, []).append(sample)
    users = {
        uid: fit_user_weights(
            group,
            population,
            baseline=baselines.get(uid, population.baseline),
            min_samples=min_samples,
            ridge_lambda=ridge_lambda,
        )
        for uid, group in by_user.items()
    }
    return population, users


def to_weight_vector(
    fitted: UserWeights | PopulationWeights, *, threshold: float = 0.0, name: str | None = None
) -> WeightVector:
    """The fitted weights as a reaction :class:`WeightVector`: 0-1 scores z-scored against the fit's baseline."""
    if name is None:
        name = f"user:{fitted.user_id}" if isinstance(fitted, UserWeights) else "population"
    return WeightVector(name, fitted.weights, "unit", threshold, fitted.baseline.mean, fitted.baseline.std)


def samples_from_session(
    events: Iterable[Mapping[str, Any]],
    user_id: str,
    targets: Mapping[str, float],
    windows: WindowSettings = _DEFAULT_WINDOWS,
) -> list[Sample]:
    """Samples for the user messages whose event id has a target: the mean face in the reaction pre window.

    Messages without a face reading in ``[u - user_before_s, u + user_after_s]`` give no sample.
    """
    events = list(events)
    index = ReadingIndex.from_events(events, max_clock_skew_s=windows.max_clock_skew_s)
    out: list[Sample] = []
    for event in events:
        if event.get("kind") != EventKind.USER_MESSAGE or event.get("event_id") not in targets:
            continue
        mean, _ = index.mean(*windows.user_window_ms(event))
        if mean is not None:
            out.append(Sample(user_id, tuple(mean.tolist()), float(targets[str(event["event_id"])])))
    return out
