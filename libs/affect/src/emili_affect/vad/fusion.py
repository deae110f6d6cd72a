"""The ``fusion`` OOV method: text embeddings and independent affect lexicons, stacked.

Features of a word w:

* text: e(w) and e(t(w)) for a few template sentences t ("I feel {}.", "That is {}."), all from the same
  sentence encoder (MiniLM);
* affect: an indicator and the values of each independent sentiment resource listing w (:mod:`.affect`).

Stage 1 maps the text features to VAD two ways, ridge regression on all of them and the top-k cosine
neighbours of e(w); stage 2 is a gradient-boosted tree ensemble per dimension on the stage-1 estimates
plus the affect features, so it can learn when to trust a resource's value over the embedding estimate.
Stage 2 is trained on out-of-fold stage-1 estimates (K-fold inside the training words) so it sees the
stage-1 error it will meet on new words; the ridge penalty is chosen by generalised cross-validation on
the training words. Nothing is tuned on held-out words.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from emili_affect.vad.affect import AffectTable, affect_features
from emili_affect.vad.embed import Embedder, EmbeddingCache, Matrix, lexicon_embeddings
from emili_affect.vad.lexicon import Lexicon

__all__ = ["DEFAULT_TEMPLATES", "FusionEstimator", "TemplateEmbedder", "WordFeaturizer", "lexicon_text_features"]

DEFAULT_TEMPLATES: Final = ("I feel {}.", "That is {}.")
RIDGE_ALPHAS: Final = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)

F64 = npt.NDArray[np.float64]


class TemplateEmbedder:
    """Embeds ``template.format(text)``; its own model id, so lexicon caches keep one matrix per template."""

    def __init__(self, embedder: Embedder, template: str) -> None:
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}', got {template!r}")
        self.embedder = embedder
        self.template = template

    @property
    def model_id(self) -> str:
        return f"{self.embedder.model_id}|template={self.template}"

    def embed(self, texts: Sequence[str]) -> Matrix:
        return self.embedder.embed([self.template.format(t) for t in texts])


class WordFeaturizer:
    """Word -> (text features, affect features) for the fusion method."""

    def __init__(
        self,
        embedder: Embedder,
        tables: Sequence[AffectTable] = (),
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ) -> None:
        self.embedder = embedder
        self.tables = tuple(tables)
        self.template_embedders = tuple(TemplateEmbedder(embedder, t) for t in templates)

    @property
    def embedders(self) -> tuple[Embedder, ...]:
        """The word embedder first, then one per template: text features are their outputs side by side."""
        return (self.embedder, *self.template_embedders)

    def text(self, words: Sequence[str]) -> Matrix:
        return np.hstack([e.embed(words) for e in self.embedders]).astype(np.float32)

    def affect(self, words: Sequence[str]) -> F64:
        return affect_features(words, self.tables)


def lexicon_text_features(lexicon: Lexicon, featurizer: WordFeaturizer, cache: EmbeddingCache | None = None) -> Matrix:
    """The featurizer's text features for every lexicon term, one cached matrix per embedder (and template)."""
    return np.hstack([lexicon_embeddings(lexicon, e, cache) for e in featurizer.embedders]).astype(np.float32)


def _topk(train: Matrix, values: F64, queries: Matrix, k: int) -> F64:
    """Cosine-weighted mean of the k nearest training words (as :class:`TopKEstimator`)."""
    k = min(k, train.shape[0])
    sims = queries @ train.T
    rows = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < train.shape[0] else np.tile(np.arange(k), (len(sims), 1))
    weights = np.clip(np.take_along_axis(sims, rows, axis=1).astype(np.float64), 0.0, None) + 1e-9
    return np.einsum("mk,mkc->mc", weights / weights.sum(axis=1, keepdims=True), values[rows])  # type: ignore[no-any-return]


class FusionEstimator:
    """Stacked ridge + top-k on text embeddings, then boosted trees with the affect features.

    ``text`` (N, D) holds the text features of the training words with e(w) in the first ``word_dim``
    columns; ``affect`` (N, F) their affect features; ``values`` (N, 3) their VAD. Predictions are clipped
    to [0, 1].
    """

    name: Final = "fusion"

    def __init__(
        self,
        text: npt.ArrayLike,
        affect: npt.ArrayLike,
        values: npt.ArrayLike,
        *,
        word_dim: int,
        featurizer: WordFeaturizer | None = None,
        k: int = 10,
        folds: int = 5,
        trees: int = 300,
        learning_rate: float = 0.05,
        seed: int = 0,
    ) -> None:
        from sklearn.ensemble import HistGradientBoostingRegressor
        from sklearn.linear_model import Ridge, RidgeCV
        from sklearn.model_selection import KFold

        x = np.ascontiguousarray(text, dtype=np.float32)
        a = np.ascontiguousarray(affect, dtype=np.float64)
        y = np.ascontiguousarray(values, dtype=np.float64)
        n = x.shape[0]
        if x.ndim != 2 or a.ndim != 2 or a.shape[0] != n or y.shape != (n, 3) or not 0 < word_dim <= x.shape[1]:
            raise ValueError(f"need (N, D) text, (N, F) affect, (N, 3) values, got {x.shape}, {a.shape}, {y.shape}")
        if n < 2 * folds or folds < 2:
            raise ValueError(f"need folds >= 2 and at least {2 * folds} training words, got {folds} and {n}")
        self.featurizer = featurizer
        self.word_dim, self.k = word_dim, k
        self.dims = (x.shape[1], a.shape[1])
        # Generalised cross-validation (leave-one-out, closed form) on the training words only.
        self.alpha = float(RidgeCV(alphas=RIDGE_ALPHAS).fit(x, y).alpha_)
        out_of_fold = np.empty((n, 6), dtype=np.float64)
        for fit_rows, pred_rows in KFold(folds, shuffle=True, random_state=seed).split(x):
            ridge = Ridge(alpha=self.alpha).fit(x[fit_rows], y[fit_rows])
            out_of_fold[pred_rows] = self._stage1(ridge.predict(x[pred_rows]), x[fit_rows], y[fit_rows], x[pred_rows])
        self._ridge = Ridge(alpha=self.alpha).fit(x, y)
        self._words, self._values = np.ascontiguousarray(x[:, :word_dim]), y
        stacked = np.hstack([out_of_fold, a])
        self._boosters = [
            HistGradientBoostingRegressor(max_iter=trees, learning_rate=learning_rate, random_state=seed).fit(
                stacked, y[:, j]
            )
            for j in range(3)
        ]

    def _stage1(self, linear: npt.ArrayLike, train_x: Matrix, train_y: F64, queries: Matrix) -> F64:
        return np.hstack(
            [
                np.asarray(linear, dtype=np.float64),
                _topk(train_x[:, : self.word_dim], train_y, queries[:, : self.word_dim], self.k),
            ]
        )

    def predict(self, text: npt.ArrayLike, affect: npt.ArrayLike) -> F64:
        """(m, D) text and (m, F) affect features -> (m, 3) VAD in [0, 1]."""
        x = np.ascontiguousarray(text, dtype=np.float32)
        a = np.ascontiguousarray(affect, dtype=np.float64)
        if x.ndim != 2 or a.ndim != 2 or (x.shape[1], a.shape[1]) != self.dims or x.shape[0] != a.shape[0]:
            raise ValueError(f"need (m, {self.dims[0]}) text and (m, {self.dims[1]}) affect, got {x.shape}, {a.shape}")
        if x.shape[0] == 0:
            return np.empty((0, 3), dtype=np.float64)
        stacked = np.hstack([self._stage1(self._ridge.predict(x), self._words, self._values, x), a])
        out = np.column_stack([b.predict(stacked) for b in self._boosters]).astype(np.float64)
        return np.clip(out, 0.0, 1.0, out=out)

    def estimate_words(self, words: Sequence[str]) -> F64:
        """VAD of words, featurised by the estimator's featurizer (what the scorer calls)."""
        if self.featurizer is None:
            raise ValueError("this FusionEstimator has no featurizer; call predict() with features")
        return self.predict(self.featurizer.text(words), self.featurizer.affect(words))
