"""Lemmas of inflected English words, for lexicons that rate lemmas only.

Warriner et al.'s norms (the default lexicon) rate 13,915 lemmas: "good" and "bad" but not "better" and "worse",
"feel" but not "felt". Without lemmas such words are out of the lexicon, and the out-of-lexicon estimate (a
similarity-weighted mean over the whole lexicon) puts them near the lexicon's average valence: "I feel better" and
"I feel worse" then score almost alike, which is the very change a post-chat survey reports. A word the lexicon
has is always kept as it is (NRC VAD rates many inflected forms); only a missing one is looked up by its lemma.

Lemmas come from LemmInflect's dictionary (shipped in its wheel), no part-of-speech tagging: a word's lemmas are
tried adjective first, then verb, noun and adverb ("better" -> good, "felt" -> feel, "years" -> year).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["POS_ORDER", "Lemmatizer", "english_lemmas"]

Lemmatizer = Callable[[str], Sequence[str]]
POS_ORDER = ("ADJ", "VERB", "NOUN", "ADV")


def english_lemmas(word: str) -> tuple[str, ...]:
    """The lemmas of a lowercase English word other than itself, most likely first; () when it has none. Not cached
    here: the tokenizer caches what it found for each word."""
    from lemminflect import getAllLemmas

    found = getAllLemmas(word)
    lemmas: list[str] = []
    for pos in POS_ORDER:
        for lemma in found.get(pos, ()):
            lemma = lemma.lower()
            if lemma != word and lemma not in lemmas:
                lemmas.append(lemma)
    return tuple(lemmas)
