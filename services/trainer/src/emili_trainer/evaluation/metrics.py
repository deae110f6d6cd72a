"""Reply metrics: how a model's replies compare with reference replies, and how varied and specific they are.

Every metric is computed over rows of (context, reply, reference). A context is a plain string (one user
message) or a list of ``{"role", "content"}`` chat messages. Words, wherever a metric counts them, are the
VAD tokenizer's raw tokens (:func:`emili_affect.vad.raw_tokens`): NFKC, lowercased, runs of letters or digits
with inner apostrophes or hyphens; punctuation and emoji are dropped. NIDF is the exception: it uses the
tokens its corpus counts were made with (:func:`ed_tokens`). Undefined values (no rows, no words) are None
rather than 0, so an empty run cannot look like a bad one. The metrics EmPO reports (NIDF, word-choice
distances, DIFF-EPITOME) follow its definitions; where EMILI departs from them the function's docstring says so.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import sacrebleu

from emili_affect.vad import DEFAULT_STOPWORDS, Lexicon, LexiconTokenizer, raw_tokens
from emili_trainer.evaluation.bertscore import BertScorer
from emili_trainer.evaluation.epitome import EpitomeClassifiers, diff_epitome, unavailable
from emili_trainer.evaluation.intensity import EmotionIntensity

__all__ = [
    "Context",
    "Embed",
    "ReplyRow",
    "as_row",
    "bleu",
    "context_messages",
    "context_text",
    "distinct_n",
    "diversity",
    "ed_tokens",
    "last_user_utterance",
    "load_corpus_counts",
    "mean_lengths",
    "memoised",
    "nidf",
    "nidf_scores",
    "reference_perplexity",
    "reply_metrics",
    "response_tries",
    "semantic_similarity",
    "template_of",
    "vad_distance",
    "word_counts",
]

Context = str | Sequence[Mapping[str, str]]
Embed = Callable[[Sequence[str]], npt.NDArray[Any]]
TEMPLATE_TOKENS = 3
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class ReplyRow(NamedTuple):
    context: Context
    reply: str
    reference: str


def as_row(row: ReplyRow | Sequence[Any] | Mapping[str, Any]) -> ReplyRow:
    """A row from a (context, reply, reference) tuple or a mapping with those keys."""
    if isinstance(row, Mapping):
        return ReplyRow(row["context"], str(row["reply"]), str(row["reference"]))
    context, reply, reference = row
    return ReplyRow(context, str(reply), str(reference))


def context_messages(context: Context) -> list[dict[str, str]]:
    """The context as chat messages: a plain string is one user message."""
    if isinstance(context, str):
        return [{"role": "user", "content": context}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in context]


def context_text(context: Context) -> str:
    """The conversation's words: user and assistant turns joined; system messages (prompts, readouts) left out."""
    return "\n".join(m["content"] for m in context_messages(context) if m["role"] != "system")


def ed_tokens(text: str) -> list[str]:
    """EmPO's NIDF tokens: nltk's ``word_tokenize`` as the ED counts were made (case kept, punctuation tokens).

    ``word_tokenize`` needs the punkt model, which is not installed (nothing is downloaded at run time), so
    sentences are split at ``.``/``!``/``?`` followed by whitespace and each is tokenised with nltk's Treebank
    tokenizer, the second half of ``word_tokenize``; punkt also knows abbreviations ("Mr."), which this does not.
    """
    from nltk.tokenize import NLTKWordTokenizer

    tokenizer = NLTKWordTokenizer()
    return [token for sentence in _SENTENCE_END.split(text.strip()) for token in tokenizer.tokenize(sentence)]


def word_counts(texts: Iterable[str]) -> Counter[str]:
    """Document frequencies of :func:`ed_tokens` over texts (each token counted once per text), as EmPO counts."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(set(ed_tokens(text)))
    return counts


def load_corpus_counts(path: str | Path) -> dict[str, int]:
    """The ``word_counts`` map of an EmPO counts file (``{"word_counts": {token: n}, ...}``, e.g. ED train+valid)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    counts = data.get("word_counts") if isinstance(data, Mapping) else None
    if not isinstance(counts, Mapping) or not counts:
        raise ValueError(f"{path}: expected a JSON object with a non-empty word_counts map")
    return {str(token): int(n) for token, n in counts.items()}


def bleu(replies: Sequence[str], references: Sequence[str]) -> float | None:
    """sacrebleu's corpus BLEU (0-100, default 13a tokenisation) of the replies against one reference each."""
    if not replies:
        return None
    return float(sacrebleu.corpus_bleu(list(replies), [list(references)]).score)


def semantic_similarity(replies: Sequence[str], references: Sequence[str], embed: Embed) -> float | None:
    """Mean cosine similarity between each reply's embedding and its reference's (MiniLM in practice)."""
    if not replies:
        return None
    a = np.asarray(embed(list(replies)), dtype=np.float64)
    b = np.asarray(embed(list(references)), dtype=np.float64)
    # Normalised here too: an embedder need not return unit rows; a zero row counts as similarity 0.
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    cosines = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return float(cosines.mean())


def distinct_n(replies: Sequence[str], n: int) -> float | None:
    """Distinct-n: unique n-grams / total n-grams, pooled over all replies (n-grams never cross replies)."""
    total = 0
    unique: set[tuple[str, ...]] = set()
    for reply in replies:
        tokens = raw_tokens(reply)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else None


def mean_lengths(replies: Sequence[str]) -> tuple[float | None, float | None]:
    """Mean reply length in characters (surrounding whitespace stripped) and in words."""
    if not replies:
        return None, None
    chars = float(np.mean([len(r.strip()) for r in replies]))
    words = float(np.mean([len(raw_tokens(r)) for r in replies]))
    return chars, words


def nidf_scores(counts: Mapping[str, int]) -> dict[str, float]:
    """NIDF(w) = (log max_c - log c_w) / (log max_c - log min_c) for every word with a positive count.

    1 for the corpus's rarest words, 0 for its most frequent. Empty when the corpus has fewer than two
    distinct counts (the denominator would be 0).
    """
    positive = {w: c for w, c in counts.items() if c > 0}
    if not positive:
        return {}
    log_max = math.log(max(positive.values()))
    log_min = math.log(min(positive.values()))
    if log_max == log_min:
        return {}
    return {w: (log_max - math.log(c)) / (log_max - log_min) for w, c in positive.items()}


def nidf(replies: Sequence[str], counts: Mapping[str, int]) -> tuple[float | None, int]:
    """EmPO's specificity: per reply, the mean NIDF over its distinct :func:`ed_tokens`; then the mean over replies.

    As in EmPO (Lee et al.'s ``specificity.py``), a token the corpus has never seen scores 1 (rarer than the
    rarest counted word). A reply without a token is left out. Returns the mean and how many replies were scored;
    None when no reply was scored or the counts cannot define NIDF (fewer than two distinct counts).
    """
    table = nidf_scores(counts)
    if not table:
        return None, 0
    per_reply = []
    for reply in replies:
        tokens = set(ed_tokens(reply))
        if tokens:
            per_reply.append(float(np.mean([table.get(t, 1.0) for t in tokens])))
    return (float(np.mean(per_reply)) if per_reply else None), len(per_reply)


def response_tries(replies: Sequence[str]) -> dict[str, Any]:
    """Lee et al.'s response tries: the replies' words in a prefix trie, compared with one chain per reply.

    ``compression`` = trie nodes / unfolded nodes, both counting the root (as in Lee et al.'s ``tree.py``).
    Replies that open the same way share their prefix nodes, so a model repeating a few openings gets a low
    ratio; 1 means no two replies share a first word. Words are the raw tokens (lowercased); None without words.
    """
    root: dict[str, Any] = {}
    trie_nodes = 1
    words = 0
    for reply in replies:
        node = root
        for token in raw_tokens(reply):
            words += 1
            if token not in node:
                node[token] = {}
                trie_nodes += 1
            node = node[token]
    return {
        "trie_nodes": trie_nodes,
        "unfolded_nodes": words + 1,
        "compression": trie_nodes / (words + 1) if words else None,
    }


def template_of(reply: str) -> tuple[str, ...]:
    """A reply's template: its first three words, lowercased ("i'm sorry to ...", "that sounds like ...").

    Replies generated from one pattern share their opening, so counting distinct openings measures how
    many patterns a model uses; content words later in the reply do not make a new template.
    """
    return tuple(raw_tokens(reply)[:TEMPLATE_TOKENS])


def diversity(replies: Sequence[str]) -> dict[str, int]:
    """Counts of distinct replies (case and whitespace folded), first words and templates (see :func:`template_of`).

    Replies without a word count for unique_replies only.
    """
    folded = {" ".join(r.lower().split()) for r in replies}
    tokenized = [raw_tokens(r) for r in replies]
    starts = {tokens[0] for tokens in tokenized if tokens}
    templates = {template_of(r) for r, tokens in zip(replies, tokenized, strict=True) if tokens}
    return {"unique_replies": len(folded), "unique_start_words": len(starts), "unique_templates": len(templates)}


def last_user_utterance(context: Context) -> str:
    """The context's last user message (EmPO's "prevs": what the reply answers); "" when there is none."""
    users = [m["content"] for m in context_messages(context) if m["role"] == "user"]
    return users[-1] if users else ""


def _max_vad(text: str, tokenizer: LexiconTokenizer) -> npt.NDArray[np.float64] | None:
    """Per dimension, the maximum over the text's lexicon terms; None when no term is in the lexicon."""
    rows = [row for row in tokenizer.tokenize(text).rows if row >= 0]
    return tokenizer.lexicon.values[rows].max(axis=0) if rows else None


def _max_intensity(text: str, lexicon: EmotionIntensity) -> float | None:
    """The strongest intensity among the text's rated words (stopwords skipped); None when none is rated."""
    values = [
        score
        for word in raw_tokens(text)
        if word not in DEFAULT_STOPWORDS and (score := lexicon.intensity(word)) is not None
    ]
    return max(values) if values else None


def _pair_differences(contexts: Sequence[str], replies: Sequence[str], score: Callable[[str], Any]) -> list[Any]:
    """score(context) - score(reply) for each pair in which both texts have a score (skipped pairs are absent)."""
    diffs = []
    for context, reply in zip(contexts, replies, strict=True):
        a, b = score(context), score(reply)
        if a is not None and b is not None:
            diffs.append(a - b)
    return diffs


def vad_distance(
    contexts: Sequence[str],
    replies: Sequence[str],
    vad_lexicon: Lexicon | None = None,
    intensity: EmotionIntensity | None = None,
) -> dict[str, Any]:
    """EmPO's word-choice distances: per pair, |max(context) - max(reply)| per dimension, averaged over pairs.

    As in EmPO (Lee et al.'s ``vad.py``) a text's valence, arousal and dominance are each the maximum over its
    words, not the mean, and the context is the last user utterance (the caller passes it). Words are the
    lexicon's terms as written (stopwords skipped, multi-word expressions matched; no lemma lookup, as in EmPO's
    exact-word match, unlike the labeler's gold labels); a text's intensity is the
    strongest NRC emotion intensity among its words. Lower = closer tone. EmPO scores an unknown word 0 and
    averages the signed difference; here unknown words are left out, a pair is skipped when either side has
    no known word, and ``signed`` holds the mean of context - reply for comparison with EmPO's tables.
    ``pairs_scored``/``pairs_skipped`` count VAD pairs, ``intensity_pairs_*`` intensity pairs. Values are
    None without the lexicon or without a scored pair.
    """
    out: dict[str, Any] = {
        "lexicon": vad_lexicon.name if vad_lexicon is not None else None,
        "aggregate": "max",
        "valence": None,
        "arousal": None,
        "dominance": None,
        "pairs_scored": 0,
        "pairs_skipped": 0,
        "intensity_lexicon": intensity.name if intensity is not None else None,
        "intensity": None,
        "intensity_pairs_scored": 0,
        "intensity_pairs_skipped": 0,
        "signed": {"valence": None, "arousal": None, "dominance": None, "intensity": None},
    }
    if vad_lexicon is not None:
        tokenizer = LexiconTokenizer(vad_lexicon)
        diffs = _pair_differences(contexts, replies, lambda text: _max_vad(text, tokenizer))
        out["pairs_scored"] = len(diffs)
        out["pairs_skipped"] = len(contexts) - len(diffs)
        if diffs:
            matrix = np.asarray(diffs)
            for i, dimension in enumerate(("valence", "arousal", "dominance")):
                out[dimension] = float(np.abs(matrix[:, i]).mean())
                out["signed"][dimension] = float(matrix[:, i].mean())
    if intensity is not None:
        gaps = _pair_differences(contexts, replies, lambda text: _max_intensity(text, intensity))
        out["intensity_pairs_scored"] = len(gaps)
        out["intensity_pairs_skipped"] = len(contexts) - len(gaps)
        if gaps:
            out["intensity"] = float(np.abs(gaps).mean())
            out["signed"]["intensity"] = float(np.mean(gaps))
    return out


def memoised(embed: Embed) -> Embed:
    """``embed`` computing each distinct text once: the metrics embed the same replies, references and contexts."""
    cache: dict[str, npt.NDArray[Any]] = {}

    def cached(texts: Sequence[str]) -> npt.NDArray[Any]:
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            cache.update(zip(missing, np.asarray(embed(missing)), strict=True))
        return np.stack([cache[t] for t in texts]) if texts else np.zeros((0, 0))

    return cached


def reply_metrics(
    rows: Sequence[ReplyRow | Sequence[Any] | Mapping[str, Any]],
    *,
    embed: Embed | None = None,
    vad_lexicon: Lexicon | None = None,
    intensity: EmotionIntensity | None = None,
    corpus_counts: Mapping[str, int] | None = None,
    bert_scorer: BertScorer | None = None,
    epitome: EpitomeClassifiers | None = None,
) -> dict[str, Any]:
    """All reply metrics of one model arm as a JSON-serialisable dict.

    Keys: n, bleu, semantic_similarity (None without ``embed``), bertscore_f1 and bertscore (None without
    ``bert_scorer``), distinct_1, distinct_2, mean_length_chars, mean_length_words, unique_replies,
    unique_start_words, unique_templates, response_tries (see :func:`response_tries`), nidf (EmPO's
    definition: only with ``corpus_counts``, e.g. ED train+valid; else None), nidf_rows (without
    ``corpus_counts``: the same formula over the rows' own references and contexts, which is not EmPO's NIDF and
    is named apart), nidf_replies_scored, nidf_corpus ("given" or "rows"), vad_distance (see :func:`vad_distance`; the
    context is the last user utterance), intensity_distance (its intensity, repeated at the top level), and
    diff_epitome (see :func:`~emili_trainer.evaluation.epitome.diff_epitome`; "unavailable" with the command
    that trains the classifiers when ``epitome`` or ``embed`` is missing).
    """
    parsed = [as_row(r) for r in rows]
    replies = [r.reply for r in parsed]
    references = [r.reference for r in parsed]
    contexts = [context_text(r.context) for r in parsed]
    last_turns = [last_user_utterance(r.context) for r in parsed]
    embed = memoised(embed) if embed is not None else None
    chars, words = mean_lengths(replies)
    counts = corpus_counts if corpus_counts is not None else word_counts([*references, *contexts])
    specificity, nidf_scored = nidf(replies, counts)
    distances = vad_distance(last_turns, replies, vad_lexicon, intensity)
    bertscore = bert_scorer.score(replies, references) if bert_scorer is not None else None
    if epitome is None:
        empathy = unavailable("no EPITOME classifiers found (`emili eval train-epitome --data DIR` trains them)")
    elif embed is None:
        empathy = unavailable("the classifiers need the MiniLM embedder, which was not found")
    else:
        empathy = diff_epitome(last_turns, replies, references, epitome, embed)
    return {
        "n": len(parsed),
        "bleu": bleu(replies, references),
        "semantic_similarity": semantic_similarity(replies, references, embed) if embed is not None else None,
        "bertscore_f1": bertscore["f1"] if bertscore is not None else None,
        "bertscore": bertscore,
        "distinct_1": distinct_n(replies, 1),
        "distinct_2": distinct_n(replies, 2),
        "mean_length_chars": chars,
        "mean_length_words": words,
        **diversity(replies),
        "response_tries": response_tries(replies),
        "nidf": specificity if corpus_counts is not None else None,
        "nidf_rows": specificity if corpus_counts is None else None,
        "nidf_replies_scored": nidf_scored,
        "nidf_corpus": "given" if corpus_counts is not None else "rows",
        "vad_distance": distances,
        "intensity_distance": distances["intensity"],
        "diff_epitome": empathy,
    }


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    # The template writes the special tokens (BOS included) itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reference_perplexity(model: Any, tokenizer: Any, rows: Sequence[Any], max_length: int = 1024) -> float:
    """Perplexity of the reference replies given their contexts: exp(total NLL / reference tokens), pooled.

    Each row is rendered with the tokenizer's chat template, once as context + generation prompt and once
    with the reference as the assistant's turn; only tokens after the shared prefix (the reference and its
    end-of-turn tokens) carry loss. Sequences longer than ``max_length`` keep their last ``max_length``
    tokens, so the context is cut before the reference is. Batch size 1; runs on the model's device.
    """
    import torch

    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    was_training = model.training
    model.eval()
    try:
        for row in rows:
            parsed = as_row(row)
            messages = context_messages(parsed.context)
            prompt = _chat_ids(tokenizer, messages, generation_prompt=True)
            full = _chat_ids(tokenizer, [*messages, {"role": "assistant", "content": parsed.reference}], False)
            # Templates may tokenise the boundary differently: the loss starts where the two first differ.
            start = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(prompt))
            labels = [-100] * start + full[start:]
            ids, labels = full[-max_length:], labels[-max_length:]
            input_ids = torch.tensor([ids], device=device)
            target = torch.tensor([labels[1:]], device=device)
            if not (target != -100).any():
                continue
            with torch.inference_mode():
                logits = model(input_ids=input_ids).logits[:, :-1, :].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += int((target != -100).sum())
    finally:
        model.train(was_training)
    if not total_tokens:
        raise ValueError("no reference token to score (no rows, or every reference was truncated away)")
    return math.exp(total_nll / total_tokens)
