"""Estimating VAD for words that are not in the lexicon, from their embedding.

Three methods, each built from a lexicon's embedding matrix E (N x d, unit rows) and values V (N x 3):

* ``softmax`` (the paper's): v_w = sum_i softmax_i(beta * cos(e(w), e(m_i))) v_i over the WHOLE lexicon
  (the original code searched a 1% sample);
* ``topk`` (the emotion-tune variant): the k most similar lexicon terms, weighted by their cosine
  similarity, weights normalised to sum 1 (negative similarities weigh 0);
* ``ridge`` (supervised): a linear map from embedding to VAD, fitted on the lexicon in closed form,
  W = (Xc^T Xc + alpha I)^-1 Xc^T Yc with centred X, Y and an unpenalised intercept.

A fourth, ``fusion`` (:mod:`.fusion`), stacks text embeddings and independent affect lexicons; it needs the
words themselves, not only their embeddings, so it is built with ``terms`` and a ``featurizer``.

Queries are processed in chunks so memory stays bounded (chunk x N similarities at a time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from emili_affect.vad.fusion import FusionEstimator, WordFeaturizer

__all__ = [
    "OOV_METHODS",
    "OOVEstimator",
    "OOVMethod",
    "RidgeEstimator",
    "SoftmaxEstimator",
    "TopKEstimator",
    "make_estimator",
]

OOVMethod = Literal["softmax", "topk", "ridge", "fusion"]
OOV_METHODS: Final[tuple[OOVMethod, ...]] = ("softmax", "topk", "ridge", "fusion")

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@runtime_checkable
class OOVEstimator(Protocol):
    @property
    def name(self) -> str: ...

    def estimate(self, queries: F32) -> F64:
        """(m, d) unit-length query embeddings -> (m, 3) VAD estimates."""
        ...


def _check(embeddings: npt.ArrayLike, values: npt.ArrayLike) -> tuple[F32, F64]:
    matrix = np.ascontiguousarray(embeddings, dtype=np.float32)
    targets = np.ascontiguousarray(values, dtype=np.float64)
    if matrix.ndim != 2 or targets.shape != (matrix.shape[0], 3) or matrix.shape[0] == 0:
        raise ValueError(f"need (N, d) embeddings and (N, 3) values with N > 0, got {matrix.shape}, {targets.shape}")
    return matrix, targets


def _queries(queries: npt.ArrayLike, dim: int) -> F32:
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must have shape (m, {dim}), got {q.shape}")
    return q


class SoftmaxEstimator:
    """The paper's softmax over cosine similarity to every lexicon term."""

    name: Final = "softmax"

    def __init__(self, embeddings: npt.ArrayLike, values: npt.ArrayLike, beta: float = 10.0, chunk: int = 512) -> None:
        if not np.isfinite(beta):
            raise ValueError("beta must be finite")
        self.embeddings, self.values = _check(embeddings, values)
        self._values32 = self.values.astype(np.float32)
        self.beta = float(beta)
        self.chunk = chunk

    def weights(self, queries: npt.ArrayLike) -> F64:
        """softmax(beta * cos) over the lexicon, (m, N); for inspection and tests."""
        sims = _queries(queries, self.embeddings.shape[1]).astype(np.float64) @ self.embeddings.T.astype(np.float64)
        logits = self.beta * sims
        logits -= logits.max(axis=1, keepdims=True)
        w = np.exp(logits)
        return w / w.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]

    def estimate(self, queries: npt.ArrayLike) -> F64:
        q = _queries(queries, self.embeddings.shape[1])
        out = np.empty((q.shape[0], 3), dtype=np.float64)
        for start in range(0, q.shape[0], self.chunk):
            logits = q[start : start + self.chunk] @ self.embeddings.T
            logits *= np.float32(self.beta)
            # Subtracting the row maximum keeps exp() finite for any beta; the softmax is unchanged.
            logits -= logits.max(axis=1, keepdims=True)
            np.exp(logits, out=logits)
            totals = logits.sum(axis=1, dtype=np.float64)
            out[start : start + self.chunk] = (logits @ self._values32).astype(np.float64) / totals[:, None]
        return out


class TopKEstimator:
    """Cosine-weighted mean of the k nearest lexicon terms (emotion-tune's method)."""

    name: Final = "topk"

    def __init__(self, embeddings: npt.ArrayLike, values: npt.ArrayLike, k: int = 10, chunk: int = 512) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.embeddings, self.values = _check(embeddings, values)
        self.k = min(k, self.embeddings.shape[0])
        self.chunk = chunk

    def neighbours(self, queries: npt.ArrayLike) -> tuple[npt.NDArray[np.intp], F32]:
        """Row indices and cosine similarities of the k nearest terms, (m, k) each, most similar first."""
        q = _queries(queries, self.embeddings.shape[1])
        n = self.embeddings.shape[0]
        rows = np.empty((q.shape[0], self.k), dtype=np.intp)
        sims = np.empty((q.shape[0], self.k), dtype=np.float32)
        for start in range(0, q.shape[0], self.chunk):
            s = q[start : start + self.chunk] @ self.embeddings.T
            top = (
                np.argpartition(-s, self.k - 1, axis=1)[:, : self.k]
                if self.k < n
                else np.tile(np.arange(n), (len(s), 1))
            )
            top_sims = np.take_along_axis(s, top, axis=1)
            order = np.argsort(-top_sims, axis=1, kind="stable")
            rows[start : start + self.chunk] = np.take_along_axis(top, order, axis=1)
            sims[start : start + self.chunk] = np.take_along_axis(top_sims, order, axis=1)
        return rows, sims

    def estimate(self, queries: npt.ArrayLike) -> F64:
        rows, sims = self.neighbours(queries)
        weights = np.clip(sims.astype(np.float64), 0.0, None)
        totals = weights.sum(axis=1, keepdims=True)
        # No neighbour with a positive similarity: fall back to their plain mean rather than divide by 0.
        weights = np.where(totals > 0, weights, 1.0)
        totals = weights.sum(axis=1, keepdims=True)
        return np.einsum("mk,mkc->mc", weights / totals, self.values[rows])  # type: ignore[no-any-return]


class RidgeEstimator:
    """Ridge regression embedding -> VAD, fitted in closed form; predictions clipped to [0, 1] by default."""

    name: Final = "ridge"

    def __init__(self, embeddings: npt.ArrayLike, values: npt.ArrayLike, alpha: float = 1.0, clip: bool = True) -> None:
        if alpha < 0:
            raise ValueError("alpha must be >= 0")
        x, y = _check(embeddings, values)
        x64 = x.astype(np.float64)
        self.x_mean = x64.mean(axis=0)
        self.y_mean = y.mean(axis=0)
        xc = x64 - self.x_mean
        gram = xc.T @ xc
        gram[np.diag_indices_from(gram)] += alpha
        # lstsq rather than solve: alpha = 0 with fewer terms than dimensions is singular but still well defined.
        self.coef: F64 = np.linalg.lstsq(gram, xc.T @ (y - self.y_mean), rcond=None)[0]
        self.intercept: F64 = self.y_mean - self.x_mean @ self.coef
        self.alpha = float(alpha)
        self.clip = clip
        self.dim = x.shape[1]

    def estimate(self, queries: npt.ArrayLike) -> F64:
        q = _queries(queries, self.dim).astype(np.float64)
        out = q @ self.coef + self.intercept
        return np.clip(out, 0.0, 1.0) if self.clip else out


def make_estimator(
    method: OOVMethod,
    embeddings: npt.ArrayLike,
    values: npt.ArrayLike,
    *,
    beta: float = 10.0,
    k: int = 10,
    alpha: float = 1.0,
    terms: Sequence[str] | None = None,
    featurizer: WordFeaturizer | None = None,
) -> SoftmaxEstimator | TopKEstimator | RidgeEstimator | FusionEstimator:
    """The method built from the lexicon's rows; for ``fusion`` ``embeddings`` are the featurizer's text features."""
    if method == "softmax":
        return SoftmaxEstimator(embeddings, values, beta=beta)
    if method == "topk":
        return TopKEstimator(embeddings, values, k=k)
    if method == "ridge":
        return RidgeEstimator(embeddings, values, alpha=alpha)
    if method == "fusion":
        if terms is None or featurizer is None:
            raise ValueError("the fusion method needs the lexicon's terms and a featurizer")
        text = np.asarray(embeddings, dtype=np.float32)
        return FusionEstimator(
            text,
            featurizer.affect(terms),
            values,
            word_dim=text.shape[1] // len(featurizer.embedders),
            featurizer=featurizer,
            k=k,
        )
    raise ValueError(f"unknown OOV method {method!r}; choose one of {OOV_METHODS}")
