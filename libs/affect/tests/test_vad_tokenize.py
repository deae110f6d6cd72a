"""Tokenisation edge cases: empty text, emoji, non-English, contractions, multi-word expressions, case."""

from __future__ import annotations

import numpy as np
import pytest

from emili_affect.vad import DEFAULT_STOPWORDS, Lexicon, LexiconTokenizer, english_lemmas, normalise, raw_tokens
from emili_affect.vad.tokenize import expand_contraction


def lexicon(*terms: str) -> Lexicon:
    return Lexicon("tiny", "memory", "0" * 64, tuple(terms), np.full((len(terms), 3), 0.5))


def terms_of(tokenizer: LexiconTokenizer, text: str) -> list[str]:
    return tokenizer.tokenize(text).terms


def test_empty_and_symbol_only_texts() -> None:
    tokenizer = LexiconTokenizer(lexicon("happy"))
    for text in ["", "   ", "!!! ... ???", "😀😢🎉", "\n\t"]:
        tokens = tokenizer.tokenize(text)
        assert tokens.terms == [] and tokens.rows == [] and tokens.skipped == 0


def test_punctuation_and_emoji_separate_words() -> None:
    tokenizer = LexiconTokenizer(lexicon("happy", "sad"))
    assert terms_of(tokenizer, "happy😀sad!!!") == ["happy", "sad"]
    assert terms_of(tokenizer, "(happy), 'sad'.") == ["happy", "sad"]
    assert raw_tokens("well_known") == ["well", "known"]


def test_case_is_ignored() -> None:
    tokenizer = LexiconTokenizer(lexicon("happy", "altar boy"))
    tokens = tokenizer.tokenize("HAPPY Happy hApPy ALTAR Boy")
    assert tokens.terms == ["happy", "happy", "happy", "altar boy"]
    assert tokens.rows == [0, 0, 0, 1]


def test_non_english_text_does_not_crash() -> None:
    tokenizer = LexiconTokenizer(lexicon("café", "happy"))
    tokens = tokenizer.tokenize("Glücklich 日本語 CAFÉ happy Ωμέγα")
    assert tokens.terms == ["glücklich", "日本語", "café", "happy", "ωμέγα"]
    assert tokens.rows == [-1, -1, 0, 1, -1]
    # NFKC: a full-width word and a ligature match their plain spellings.
    assert terms_of(tokenizer, "ｈａｐｐｙ") == ["happy"]
    assert normalise("ﬁne") == "fine"


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("don't", ("do", "not")),
        ("didn't", ("did", "not")),
        ("won't", ("will", "not")),
        ("can't", ("can", "not")),
        ("i'm", ("i", "am")),
        ("you're", ("you", "are")),
        ("we've", ("we", "have")),
        ("she'll", ("she", "will")),
        ("i'd", ("i", "would")),
        ("john's", ("john",)),
        ("let's", ("let", "us")),
        ("shouldn't've", ("should", "not", "have")),
        ("o'clock", ("o", "clock")),
    ],
)
def test_contraction_table(token: str, expected: tuple[str, ...]) -> None:
    assert expand_contraction(token) == expected


def test_contractions_expand_unless_the_lexicon_has_them() -> None:
    plain = LexiconTokenizer(lexicon("worry"), stopwords=())
    assert terms_of(plain, "Don't worry") == ["do", "not", "worry"]
    # Typographic apostrophe, as phones type it.
    assert terms_of(plain, "don’t worry") == ["do", "not", "worry"]
    kept = LexiconTokenizer(lexicon("don't", "worry"), stopwords=())
    assert terms_of(kept, "DON'T worry") == ["don't", "worry"]


def test_multi_word_expressions_greedy_longest_match() -> None:
    tokenizer = LexiconTokenizer(lexicon("ice", "ice cream", "ice cream cone", "cream", "cone"), stopwords=())
    tokens = tokenizer.tokenize("Ice cream cone, ice cream, ice; cream cone")
    assert tokens.terms == ["ice cream cone", "ice cream", "ice", "cream", "cone"]
    assert tokens.rows == [2, 1, 0, 3, 4]


def test_multi_word_expressions_with_contractions_and_hyphens() -> None:
    tokenizer = LexiconTokenizer(lexicon("can't wait", "a no-brainer", "t-shirt", "alarm clock", "wait"))
    # Matched in normalised form: "can't wait" and "cannot wait" are both "can not wait".
    assert terms_of(tokenizer, "I can't wait") == ["can't wait"]
    assert terms_of(tokenizer, "I cannot wait") == ["can't wait"]
    assert terms_of(tokenizer, "I can not wait") == ["can't wait"]
    assert terms_of(tokenizer, "It's a no-brainer") == ["a no-brainer"]
    assert terms_of(tokenizer, "my T shirt and my t-shirt") == ["t-shirt", "t-shirt"]
    assert terms_of(tokenizer, "the alarm-clock rang") == ["alarm clock", "rang"]
    # Stopwords inside an expression do not break it; alone, they are skipped.
    assert terms_of(tokenizer, "a") == []


def test_hyphenated_words_split_when_unknown() -> None:
    tokenizer = LexiconTokenizer(lexicon("well-being", "known"), stopwords=())
    assert terms_of(tokenizer, "well-being, well-known") == ["well-being", "well", "known"]


def test_stopwords_and_numbers_are_skipped() -> None:
    tokenizer = LexiconTokenizer(lexicon("do", "happy", "911"))
    tokens = tokenizer.tokenize("I do feel happy at 10 or 911")
    # "do" is a stopword even though the lexicon rates it; "10" has no letter; "911" is in the lexicon.
    assert tokens.terms == ["feel", "happy", "911"]
    assert tokens.rows == [-1, 1, 2]
    assert tokens.skipped == 5  # i, do, at, 10, or
    assert "not" not in DEFAULT_STOPWORDS and "no" not in DEFAULT_STOPWORDS
    everything = LexiconTokenizer(lexicon("do"), stopwords=())
    assert everything.tokenize("I do").terms == ["i", "do"]


def test_long_text_is_tokenised() -> None:
    tokenizer = LexiconTokenizer(lexicon("happy"))
    text = "Happy days, don't you think? " * 3_500  # About 100 kB.
    tokens = tokenizer.tokenize(text)
    assert tokens.terms.count("happy") == 3_500


def test_multi_word_expressions_stop_at_clause_punctuation_and_emoji() -> None:
    tokenizer = LexiconTokenizer(lexicon("ice cream", "dr. pepper", "r & b", "soda/pop"), stopwords=())
    assert terms_of(tokenizer, "ice, cream") == ["ice", "cream"]
    assert terms_of(tokenizer, "ice 🍦 cream") == ["ice", "cream"]
    assert terms_of(tokenizer, "(ice) cream") == ["ice", "cream"]
    assert terms_of(tokenizer, "Dr. Pepper, R&B and soda / pop") == ["dr. pepper", "r & b", "and", "soda/pop"]


def test_a_word_the_lexicon_lacks_is_looked_up_by_its_lemma() -> None:
    tokenizer = LexiconTokenizer(lexicon("good", "bad", "feel", "year"), lemmas=english_lemmas)
    tokens = tokenizer.tokenize("I felt better, then worse, for years")
    assert tokens.terms == ["feel", "good", "bad", "year"]
    assert tokens.rows == [2, 0, 1, 3]
    # Without lemmas the same words are out of the lexicon.
    assert LexiconTokenizer(lexicon("good", "bad", "feel", "year")).tokenize("felt better").rows == [-1, -1]


def test_a_word_the_lexicon_has_is_never_replaced_by_its_lemma() -> None:
    tokenizer = LexiconTokenizer(lexicon("better", "good"), lemmas=english_lemmas)
    assert tokenizer.tokenize("better").terms == ["better"]


def test_a_lemma_the_lexicon_lacks_leaves_the_word_unknown() -> None:
    asked: list[str] = []

    def lemmas(word: str) -> tuple[str, ...]:
        asked.append(word)
        return ("missing", "happy") if word == "gladder" else ("nowhere",)

    tokenizer = LexiconTokenizer(lexicon("happy"), lemmas=lemmas)
    tokens = tokenizer.tokenize("gladder zorbly gladder")
    assert tokens.terms == ["happy", "zorbly", "happy"] and tokens.rows == [0, -1, 0]
    assert asked == ["gladder", "zorbly"]  # Each word's lemmas are looked up once.


def test_english_lemmas_prefer_the_adjective_and_exclude_the_word() -> None:
    assert english_lemmas("better")[0] == "good"
    assert english_lemmas("worse")[0] == "bad"
    assert english_lemmas("felt") == ("feel",)
    assert english_lemmas("happy") == ()


def test_a_lemma_that_is_a_stopword_is_skipped_like_the_stopword() -> None:
    tokenizer = LexiconTokenizer(lexicon("do", "happy"), lemmas=english_lemmas)
    tokens = tokenizer.tokenize("done happier")
    assert tokens.terms == ["happy"] and tokens.skipped == 1
