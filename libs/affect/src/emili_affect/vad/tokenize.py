"""Lexicon-aware tokenisation: text to the lexicon terms (or out-of-lexicon words) it contains.

Steps, each chosen so that text and lexicon terms are normalised the same way:

1. Normalise: Unicode NFKC, lowercase, typographic apostrophes and hyphens to ASCII ``'`` and ``-``.
2. Raw tokens: runs of letters or digits in any script, joined by inner apostrophes or hyphens
   (``don't``, ``t-shirt``). Punctuation, emoji and symbols separate tokens and are dropped: none of the
   lexicons rates them and MiniLM's vocabulary maps most emoji to ``[UNK]``.
3. Resolve each raw token: kept whole when the lexicon has it (so a lexicon that rates ``don't`` gets
   ``don't``); otherwise a contraction is expanded (``don't`` -> ``do not``, ``won't`` -> ``will not``,
   ``I'm`` -> ``i am``, ``'d`` -> ``would``; ``'s`` is dropped because it is ambiguous between *is*,
   *has* and the possessive) and a hyphenated word is split into its parts.
4. Multi-word expressions: greedy longest match over the resolved tokens against the lexicon's multi-word
   terms, which are resolved by steps 1-3 too (v2.1's ``can't wait`` matches "can't wait" and "cannot
   wait", both being ``can not wait``; a hyphenated term such as ``t-shirt`` also matches "t shirt").
   A match never spans clause punctuation or emoji (``,;:!?``, brackets, quotes, dashes); ``.``, ``&``
   and ``/`` do not break one, for terms such as "dr. pepper", "r & b" and "soda/pop".
5. Lemmas (when the tokenizer is given a :data:`~emili_affect.vad.lemma.Lemmatizer`): a single word the lexicon
   lacks becomes the first of its lemmas the lexicon has ("better" -> ``good`` in a lemma lexicon); see
   :mod:`.lemma`.
6. Filter single tokens: stopwords (closed-class words: articles, pronouns, auxiliaries, prepositions,
   conjunctions) are skipped even when the lexicon rates them, because their ratings are of another
   sense (NRC v1 rates "do", "have", "will", "can" about 0.7 valence, which would tilt every sentence
   positive); negations are not stopwords. Tokens without a letter (numbers) are skipped unless the
   lexicon has them. Multi-word matches are never skipped.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from emili_affect.vad.lemma import Lemmatizer
from emili_affect.vad.lexicon import Lexicon

__all__ = [
    "DEFAULT_STOPWORDS",
    "LexiconTokenizer",
    "Tokens",
    "expand_contraction",
    "normalise",
    "raw_tokens",
]

# Closed-class English words; negations ("not", "no", "never") are deliberately absent.
_STOPWORD_TEXT: Final = """
    a an the this that these those some any each every either neither both all such
    i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it its itself
    we us our ours ourselves they them their theirs themselves one ones oneself
    who whom whose which what whatever whoever when where why how there here then than
    am is are was were be been being do does did doing have has had having
    will would shall should can could may might must ought
    of in on at to for from by with about into onto upon over under through during before after above below
    between among against within without toward towards across along around out up
    and or but if because as while until unless so nor yet though although whether
    s t d ll m re ve o y
"""
DEFAULT_STOPWORDS: Final = frozenset(_STOPWORD_TEXT.split())

_APOSTROPHES: Final = {ord(c): "'" for c in "\u2018\u2019\u02bc\u02b9\u0060\u00b4\u2032"}
_HYPHENS: Final = {ord(c): "-" for c in "\u2010\u2011"}
_TRANSLATION: Final = {**_APOSTROPHES, **_HYPHENS}

# Letters or digits in any script (``[^\W_]``), joined by single inner apostrophes or hyphens.
_RAW_TOKEN: Final = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")
_HAS_LETTER: Final = re.compile(r"[^\W\d_]")
# A word, or a run of characters that ends a multi-word match (clause punctuation, emoji, symbols).
_PIECE: Final = re.compile(_RAW_TOKEN.pattern + r"|[^\w\s'\-.&/]+")
_BARRIER: Final = "\x00"  # Stands for a barrier run in the word list; no lexicon key contains it.

_IRREGULAR: Final = {
    "won't": ("will", "not"),
    "can't": ("can", "not"),
    "cannot": ("can", "not"),
    "shan't": ("shall", "not"),
    "ain't": ("is", "not"),
    "let's": ("let", "us"),
    "y'all": ("you", "all"),
}
_SUFFIXES: Final = (
    ("n't", ("not",)),
    ("'re", ("are",)),
    ("'m", ("am",)),
    ("'ve", ("have",)),
    ("'ll", ("will",)),
    ("'d", ("would",)),
    ("'s", ()),
)


def normalise(text: str) -> str:
    """NFKC, lowercase, ASCII apostrophes and hyphens: the form both text and lexicon terms are matched in."""
    return unicodedata.normalize("NFKC", text).translate(_TRANSLATION).lower()


def raw_tokens(text: str) -> list[str]:
    """Word-like runs of normalised text; punctuation, emoji and symbols are dropped."""
    return _RAW_TOKEN.findall(normalise(text))


def expand_contraction(token: str) -> tuple[str, ...]:
    """``don't`` -> (do, not), ``i'm`` -> (i, am), ``john's`` -> (john,); other apostrophes split the word."""
    irregular = _IRREGULAR.get(token)
    if irregular is not None:
        return irregular
    for suffix, replacement in _SUFFIXES:
        if token.endswith(suffix) and len(token) > len(suffix):
            stem = token[: -len(suffix)]
            # A stem can carry another clitic ("shouldn't've").
            head = expand_contraction(stem) if "'" in stem else (stem,)
            return (*head, *replacement)
    return tuple(part for part in token.split("'") if part)


@dataclass(frozen=True, slots=True)
class Tokens:
    """A text's scorable units: ``terms[i]`` is a lexicon term when ``rows[i] >= 0``, else an unknown word."""

    terms: list[str]
    rows: list[int]
    skipped: int


class LexiconTokenizer:
    """Tokenises text against one lexicon (contractions, hyphens and multi-word expressions depend on it)."""

    def __init__(
        self, lexicon: Lexicon, stopwords: Iterable[str] = DEFAULT_STOPWORDS, lemmas: Lemmatizer | None = None
    ) -> None:
        self.lexicon = lexicon
        self.stopwords = frozenset(normalise(w) for w in stopwords)
        self.lemmas = lemmas
        self._lemma_term = lru_cache(maxsize=65_536)(self._find_lemma_term)
        # Single-token terms, looked up directly.
        self.single: dict[str, int] = {}
        pending: list[tuple[int, list[str]]] = []
        for row, term in enumerate(lexicon.terms):
            parts = raw_tokens(term)
            if parts == [term]:
                self.single[term] = row
            elif parts:
                pending.append((row, parts))
        self.phrases: dict[tuple[str, ...], int] = {}
        for row, parts in pending:
            key = self._resolve_all(parts)
            if len(key) == 1:
                self.single.setdefault(key[0], row)
            elif key:
                self.phrases.setdefault(key, row)
        for term, row in list(self.single.items()):
            if "-" in term:
                # "t-shirt" also matches "t shirt" and a text's "t-shirt" when the lexicon writes "t shirt".
                self.phrases.setdefault(self._resolve_all(term.split("-")), row)
        self.phrases = {key: row for key, row in self.phrases.items() if len(key) > 1}
        # For each first word, the longest expression starting with it: bounds the greedy search.
        self.longest_from: dict[str, int] = {}
        for key in self.phrases:
            self.longest_from[key[0]] = max(self.longest_from.get(key[0], 0), len(key))

    def _resolve(self, token: str) -> tuple[str, ...]:
        if token in self.single:
            return (token,)
        irregular = _IRREGULAR.get(token)
        if irregular is not None:
            return self._resolve_all(irregular)
        if "'" in token:
            parts: tuple[str, ...] = expand_contraction(token)
        elif "-" in token:
            parts = tuple(p for p in token.split("-") if p)
        else:
            return (token,)
        return self._resolve_all(parts)

    def _find_lemma_term(self, word: str) -> str | None:
        """The first of ``word``'s lemmas that the lexicon rates as a single word; None when there is none."""
        assert self.lemmas is not None
        return next((lemma for lemma in self.lemmas(word) if lemma in self.single), None)

    def _resolve_all(self, tokens: Iterable[str]) -> tuple[str, ...]:
        out: list[str] = []
        for token in tokens:
            out.extend(self._resolve(token))
        return tuple(out)

    def tokenize(self, text: str) -> Tokens:
        """The text's lexicon terms and unknown words, in order, with the count of skipped tokens."""
        single = self.single
        words: list[str] = []
        for token in _PIECE.findall(normalise(text)):
            if not token[0].isalnum():
                words.append(_BARRIER)
            elif token in single or ("'" not in token and "-" not in token and token not in _IRREGULAR):
                words.append(token)
            else:
                words.extend(self._resolve(token))
        terms: list[str] = []
        rows: list[int] = []
        skipped = 0
        longest_from = self.longest_from
        phrases = self.phrases
        stopwords = self.stopwords
        lexicon_terms = self.lexicon.terms
        n = len(words)
        i = 0
        while i < n:
            word = words[i]
            longest = longest_from.get(word)
            if longest is not None:
                matched = False
                for length in range(min(longest, n - i), 1, -1):
                    row = phrases.get(tuple(words[i : i + length]))
                    if row is not None:
                        terms.append(lexicon_terms[row])
                        rows.append(row)
                        i += length
                        matched = True
                        break
                if matched:
                    continue
            i += 1
            if word == _BARRIER:
                continue
            if word in stopwords:
                skipped += 1
                continue
            row = single.get(word, -1)
            if row < 0 and _HAS_LETTER.search(word) is None:
                skipped += 1
                continue
            lemma = self._lemma_term(word) if row < 0 and self.lemmas is not None else None
            if lemma is not None:
                if lemma in stopwords:  # "done" -> "do": a stopword's rating is of another sense.
                    skipped += 1
                    continue
                word, row = lemma, single[lemma]
            terms.append(word)
            rows.append(row)
        return Tokens(terms=terms, rows=rows, skipped=skipped)
