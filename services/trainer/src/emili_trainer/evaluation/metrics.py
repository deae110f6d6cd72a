"""Reply metrics: how a model's replies compare with reference replies, and how varied and specific they are.

Every metric is computed over rows of (context, reply, reference). A context is a plain string (one user
message) or a list of ``{"role", "content"}`` chat messages. Words, wherever a metric counts them, are the
VAD tokenizer's raw tokens (:func:`emili_affect.vad.raw_tokens`): NFKC, lowercased, runs of letters or digits
with inner apostrophes or hyphens; punctuation and emoji are dropped. Undefined values (no rows, no words)
are None rather than 0, so an empty run cannot look like a bad one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import sacrebleu

from emili_affect.vad import DEFAULT_STOPWORDS, Lexicon, VADScorer, raw_tokens
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
    "mean_lengths",
    "nidf",
    "nidf_scores",
    "reference_perplexity",
    "reply_metrics",
    "semantic_similarity",
    "template_of",
    "vad_distance",
    "word_counts",
]

Context = str | Sequence[Mapping[str, str]]
Embed = Callable[[Sequence[str]], npt.NDArray[Any]]
TEMPLATE_TOKENS = 3


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


def word_counts(texts: Iterable[str]) -> Counter[str]:
    """Word frequencies over texts (e.g. every EmpatheticDialogues utterance), the corpus NIDF is relative to."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(raw_tokens(text))
    return counts


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
    """EmPO's specificity: per reply, the mean NIDF over its unique words; then the mean over replies.

    Words the corpus has never seen are skipped (they have no count, and an unseen word is not evidence of
    specificity: it may be a typo); a reply with no seen word is left out. Returns the mean and how many
    replies were scored.
    """
    table = nidf_scores(counts)
    per_reply = []
    for reply in replies:
        values = [table[w] for w in set(raw_tokens(reply)) if w in table]
        if values:
            per_reply.append(float(np.mean(values)))
    return (float(np.mean(per_reply)) if per_reply else None), len(per_reply)


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


def _intensity_of(text: str, lexicon: EmotionIntensity) -> float | None:
    """Mean intensity over the text's rated words (every occurrence counts); None when none is rated."""
    values = [
        score
        for word in raw_tokens(text)
        if word not in DEFAULT_STOPWORDS and (score := lexicon.intensity(word)) is not None
    ]
    return float(np.mean(values)) if values else None


def vad_distance(
    contexts: Sequence[str],
    replies: Sequence[str],
    vad_lexicon: Lexicon | None = None,
    intensity: EmotionIntensity | None = None,
) -> dict[str, Any]:
    """EmPO's word-choice distance: mean |score(context) - score(reply)| per dimension, lower = closer tone.

    A text's valence and arousal are the mean over its words found in the VAD lexicon (the labeler's
    tokeniser: stopwords skipped, multi-word expressions matched); its intensity is the mean of its words'
    strongest NRC emotion intensity. Unknown words are left out, never scored as 0, and a pair is skipped
    when either side has no known word: ``pairs_scored``/``pairs_skipped`` count VAD pairs,
    ``intensity_pairs_scored``/``intensity_pairs_skipped`` intensity pairs. Values are None without the
    lexicon or without a scored pair.
    """
    out: dict[str, Any] = {
        "lexicon": vad_lexicon.name if vad_lexicon is not None else None,
        "valence": None,
        "arousal": None,
        "pairs_scored": 0,
        "pairs_skipped": 0,
        "intensity_lexicon": intensity.name if intensity is not None else None,
        "intensity": None,
        "intensity_pairs_scored": 0,
        "intensity_pairs_skipped": 0,
    }
    if vad_lexicon is not None:
        scorer = VADScorer(vad_lexicon, None, oov=None)
        scored = scorer.score_batch([*contexts, *replies])
        pairs = [
            (c.vad, r.vad)
            for c, r in zip(scored[: len(contexts)], scored[len(contexts) :], strict=True)
            if c.vad is not None and r.vad is not None
        ]
        out["pairs_scored"] = len(pairs)
        out["pairs_skipped"] = len(contexts) - len(pairs)
        if pairs:
            out["valence"] = float(np.mean([abs(c.valence - r.valence) for c, r in pairs]))
            out["arousal"] = float(np.mean([abs(c.arousal - r.arousal) for c, r in pairs]))
    if intensity is not None:
        gaps = []
        for context, reply in zip(contexts, replies, strict=True):
            a, b = _intensity_of(context, intensity), _intensity_of(reply, intensity)
            if a is not None and b is not None:
                gaps.append(abs(a - b))
        out["intensity_pairs_scored"] = len(gaps)
        out["intensity_pairs_skipped"] = len(contexts) - len(gaps)
        if gaps:
            out["intensity"] = float(np.mean(gaps))
    return out


def reply_metrics(
    rows: Sequence[ReplyRow | Sequence[Any] | Mapping[str, Any]],
    *,
    embed: Embed | None = None,
    vad_lexicon: Lexicon | None = None,
    intensity: EmotionIntensity | None = None,
    corpus_counts: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """All reply metrics of one model arm as a JSON-serialisable dict.

    Keys: n, bleu, semantic_similarity (None without ``embed``), distinct_1, distinct_2, mean_length_chars,
    mean_length_words, unique_replies, unique_start_words, unique_templates, nidf, nidf_replies_scored,
    nidf_corpus ("given" or "rows": without ``corpus_counts`` NIDF is relative to the rows' own references
    and contexts), vad_distance (see :func:`vad_distance`).
    """
    parsed = [as_row(r) for r in rows]
    replies = [r.reply for r in parsed]
    references = [r.reference for r in parsed]
    contexts = [context_text(r.context) for r in parsed]
    chars, words = mean_lengths(replies)
    counts = corpus_counts if corpus_counts is not None else word_counts([*references, *contexts])
    specificity, nidf_scored = nidf(replies, counts)
    return {
        "n": len(parsed),
        "bleu": bleu(replies, references),
        "semantic_similarity": semantic_similarity(replies, references, embed) if embed is not None else None,
        "distinct_1": distinct_n(replies, 1),
        "distinct_2": distinct_n(replies, 2),
        "mean_length_chars": chars,
        "mean_length_words": words,
        **diversity(replies),
        "nidf": specificity,
        "nidf_replies_scored": nidf_scored,
        "nidf_corpus": "given" if corpus_counts is not None else "rows",
        "vad_distance": vad_distance(contexts, replies, vad_lexicon, intensity),
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
