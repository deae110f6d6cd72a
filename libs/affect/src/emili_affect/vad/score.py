"""Text -> valence, arousal, dominance with one lexicon and one out-of-lexicon method.

What a text's VAD is (the choices, so labels can be interpreted):

* the mean over the text's scored tokens, every occurrence counted (a repeated word weighs more);
* scored tokens are lexicon terms (single words, multi-word expressions and, given ``lemmas``, the lemma of a
  word the lexicon lacks; see :mod:`.tokenize`) and
  out-of-lexicon words, which count with the estimate of the scorer's OOV method (default ``softmax``,
  the paper's). With ``oov=None`` (or ``"none"``) unknown words are left out of the mean (never scored as 0) and listed
  in :attr:`TextVAD.unknown`;
* stopwords and tokens without a letter are skipped (not scored, not in coverage);
* coverage = lexicon tokens / (lexicon tokens + out-of-lexicon tokens);
* a text with no scored token (empty, only punctuation, emoji or stopwords) has ``vad`` and ``coverage``
  None, not an exception; a text longer than ``max_chars`` raises :class:`ValueError`.

Scoring is batched: a batch's unknown words are deduplicated, looked up in an LRU of earlier estimates,
and the rest are embedded in one call. The scorer is thread-safe.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from emili_affect.vad.affect import AffectTable
from emili_affect.vad.embed import Embedder, EmbeddingCache, lexicon_embeddings
from emili_affect.vad.fusion import FusionEstimator, WordFeaturizer, lexicon_text_features
from emili_affect.vad.lemma import Lemmatizer
from emili_affect.vad.lexicon import Lexicon
from emili_affect.vad.oov import OOV_METHODS, OOVEstimator, OOVMethod, make_estimator
from emili_affect.vad.tokenize import DEFAULT_STOPWORDS, LexiconTokenizer

__all__ = ["DEFAULT_MAX_CHARS", "LEXICON_SOURCE", "VAD", "TextVAD", "VADScorer"]

DEFAULT_MAX_CHARS = 100_000
LEXICON_SOURCE = "lexicon"


class VAD(NamedTuple):
    valence: float
    arousal: float
    dominance: float


@dataclass(frozen=True, slots=True)
class TextVAD:
    """One text's result: its mean VAD, coverage, and the tokens behind them with their sources."""

    lexicon: str
    vad: VAD | None
    coverage: float | None
    tokens: tuple[str, ...]
    sources: tuple[str, ...]  # Per token: "lexicon" or the OOV method that estimated it.
    token_vad: npt.NDArray[np.float64]  # (len(tokens), 3), read-only.
    unknown: tuple[str, ...] = ()  # Out-of-lexicon words left unscored (only when the scorer has no OOV method).
    skipped: int = 0  # Stopwords and non-word tokens.

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form."""
        return {
            "lexicon": self.lexicon,
            "vad": None if self.vad is None else self.vad._asdict(),
            "coverage": self.coverage,
            "tokens": [
                {"token": t, "source": s, "vad": v}
                for t, s, v in zip(self.tokens, self.sources, self.token_vad.tolist(), strict=True)
            ],
            "unknown": list(self.unknown),
            "skipped": self.skipped,
        }


class VADScorer:
    """Scores texts against one lexicon; unknown words are estimated with one OOV method.

    The lexicon's embedding matrix is built on first need (or by :meth:`warm`) from ``cache`` when it holds
    it. Estimates for unknown words are kept in an LRU of ``oov_cache_size`` words. ``affect_tables`` are
    the independent lexicons the ``fusion`` method reads (one made from the scorer's own lexicon file is dropped).
    """

    def __init__(
        self,
        lexicon: Lexicon,
        embedder: Embedder | None = None,
        *,
        oov: OOVMethod | Literal["none"] | None = "softmax",
        cache: EmbeddingCache | None = None,
        beta: float = 10.0,
        k: int = 10,
        alpha: float = 1.0,
        stopwords: Iterable[str] = DEFAULT_STOPWORDS,
        max_chars: int = DEFAULT_MAX_CHARS,
        oov_cache_size: int = 100_000,
        affect_tables: Sequence[AffectTable] = (),
        lemmas: Lemmatizer | None = None,
    ) -> None:
        if oov == "none":  # The settings' spelling of "no OOV method".
            oov = None
        if oov is not None and oov not in OOV_METHODS:
            raise ValueError(f"unknown OOV method {oov!r}; choose one of {OOV_METHODS} or None")
        if oov is not None and embedder is None:
            raise ValueError(f"OOV method {oov!r} needs an embedder (or pass oov=None)")
        if max_chars < 1 or oov_cache_size < 0:
            raise ValueError("max_chars must be >= 1 and oov_cache_size >= 0")
        # Checked now: the estimator itself is only built when the first unknown word arrives.
        if not (math.isfinite(beta) and k >= 1 and alpha >= 0):
            raise ValueError(f"need a finite beta, k >= 1 and alpha >= 0; got beta={beta}, k={k}, alpha={alpha}")
        self.lexicon = lexicon
        self.embedder = embedder
        self.oov: OOVMethod | None = oov
        self.cache = cache
        self.beta, self.k, self.alpha = beta, k, alpha
        self.max_chars = max_chars
        self.oov_cache_size = oov_cache_size
        self.tokenizer = LexiconTokenizer(lexicon, stopwords, lemmas)
        tables = [t for t in affect_tables if t.sha256 != lexicon.sha256]
        self.featurizer = WordFeaturizer(embedder, tables) if oov == "fusion" and embedder is not None else None
        self._estimator: OOVEstimator | FusionEstimator | None = None
        self._lru: OrderedDict[str, tuple[float, float, float]] = OrderedDict()
        self._lock = threading.Lock()  # Guards the LRU and the counters.
        self._build_lock = threading.Lock()  # Held while the lexicon is embedded: other threads wait for it.
        self.oov_hits = 0
        self.oov_misses = 0

    def warm(self) -> None:
        """Build the OOV estimator now (embeds the lexicon unless the cache has it); a no-op without one."""
        if self.oov is not None:
            self._get_estimator()

    def _get_estimator(self) -> OOVEstimator | FusionEstimator:
        with self._build_lock:
            if self._estimator is None:
                assert self.oov is not None and self.embedder is not None
                if self.featurizer is not None:
                    matrix = lexicon_text_features(self.lexicon, self.featurizer, self.cache)
                else:
                    matrix = lexicon_embeddings(self.lexicon, self.embedder, self.cache)
                self._estimator = make_estimator(
                    self.oov,
                    matrix,
                    self.lexicon.values,
                    beta=self.beta,
                    k=self.k,
                    alpha=self.alpha,
                    terms=self.lexicon.terms,
                    featurizer=self.featurizer,
                )
            return self._estimator

    def _estimate_unknown(self, words: list[str]) -> npt.NDArray[np.float64]:
        """VAD estimates for distinct unknown words: from the LRU, the rest embedded in one call."""
        out = np.empty((len(words), 3), dtype=np.float64)
        missing: list[int] = []
        with self._lock:
            lru = self._lru
            for i, word in enumerate(words):
                hit = lru.get(word)
                if hit is None:
                    missing.append(i)
                else:
                    lru.move_to_end(word)
                    out[i] = hit
            self.oov_hits += len(words) - len(missing)
            self.oov_misses += len(missing)
        if missing:
            assert self.embedder is not None
            estimator = self._get_estimator()
            new_words = [words[i] for i in missing]
            if isinstance(estimator, FusionEstimator):
                estimates = estimator.estimate_words(new_words)
            else:
                estimates = estimator.estimate(self.embedder.embed(new_words))
            out[missing] = estimates
            if self.oov_cache_size:
                with self._lock:
                    for i, row in zip(missing, estimates.tolist(), strict=True):
                        self._lru[words[i]] = (row[0], row[1], row[2])
                    while len(self._lru) > self.oov_cache_size:
                        self._lru.popitem(last=False)
        return out

    def _check_length(self, texts: Sequence[str]) -> None:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, not str")
            if len(text) > self.max_chars:
                raise ValueError(
                    f"text {i} has {len(text):,} characters, over the limit of {self.max_chars:,} (max_chars); "
                    "split it into smaller texts"
                )

    def score(self, text: str) -> TextVAD:
        return self.score_batch([text])[0]

    def score_batch(self, texts: Sequence[str]) -> list[TextVAD]:
        """Score many texts at once (one embedding call for all their new unknown words)."""
        self._check_length(texts)
        tokenize = self.tokenizer.tokenize
        tokenized = [tokenize(text) for text in texts]

        # Distinct unknown words of the whole batch, numbered after the lexicon's rows.
        n_lex = len(self.lexicon)
        local: dict[str, int] = {}
        for tokens in tokenized:
            for term, row in zip(tokens.terms, tokens.rows, strict=True):
                if row < 0 and term not in local:
                    local[term] = n_lex + len(local)
        if local and self.oov is not None:
            table = np.concatenate([self.lexicon.values, self._estimate_unknown(list(local))])
        else:
            table = self.lexicon.values
        estimated = self.oov is not None

        flat: list[int] = []
        bounds = [0]
        for tokens in tokenized:
            if estimated:
                flat.extend(
                    [row if row >= 0 else local[term] for term, row in zip(tokens.terms, tokens.rows, strict=True)]
                )
            else:
                flat.extend([row for row in tokens.rows if row >= 0])
            bounds.append(len(flat))
        values = table[np.asarray(flat, dtype=np.intp)]
        values.setflags(write=False)
        sums = np.concatenate([np.zeros((1, 3)), np.cumsum(values, axis=0)])
        ends = np.asarray(bounds)
        counts = np.diff(ends)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = ((sums[ends[1:]] - sums[ends[:-1]]) / counts[:, None]).tolist()

        name = self.lexicon.name
        method = self.oov or ""
        results: list[TextVAD] = []
        for i, tokens in enumerate(tokenized):
            rows = tokens.rows
            n_found = sum(1 for r in rows if r >= 0)
            n_tokens = len(rows)
            if estimated:
                used = tuple(tokens.terms)
                sources = tuple(LEXICON_SOURCE if r >= 0 else method for r in rows)
                unknown: tuple[str, ...] = ()
            else:
                used = tuple(t for t, r in zip(tokens.terms, rows, strict=True) if r >= 0)
                sources = (LEXICON_SOURCE,) * len(used)
                unknown = tuple(t for t, r in zip(tokens.terms, rows, strict=True) if r < 0)
            results.append(
                TextVAD(
                    lexicon=name,
                    vad=VAD(*means[i]) if counts[i] else None,
                    coverage=n_found / n_tokens if n_tokens else None,
                    tokens=used,
                    sources=sources,
                    token_vad=values[bounds[i] : bounds[i + 1]],
                    unknown=unknown,
                    skipped=tokens.skipped,
                )
            )
        return results
