"""What the loop had to learn from: the simulator's hidden reply quality of each iteration's training data (SYNTHETIC).

The simulator scores every reply with a known function (:func:`emili_pipeline.simulator.reply_quality`), so of a
simulation study's datasets one can ask what no study with people can: do the replies the loop prefers score higher
on the users' real preference?

* **DPO pairs** (``dpo_feedback``): per pair, quality(chosen) - quality(rejected), each scored against the pair's last
  user message, as the simulated user scored it when it heard the reply; the interval resamples contexts, since a
  context's pairs share replies.
* **SFT turns** (``sft``): quality of the assistant turns SFT trains on (weight 1: flagged, and among the largest
  reactions when the pipeline sets ``sft_delta_share``) against the rest (weight 0) in the same examples.

Under the feedback condition both gaps should be above 0; under noise (decoy faces where the loop learns) about 0.
A gap about 0 under feedback means the flags carried no preference, so no trainer could have learned one.

Both also record reply lengths in words (chosen against rejected, trained against the rest): the simulated users
prefer shorter replies, so a length gap under noise is a preference that entered the data without feedback (run M
in BENCHMARKS.md found one in how cut-off replies were treated).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from emili_pipeline.simulator.state import ReplyScorer, reply_quality, word_count


def _records(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def last_user_message(messages: Iterable[Mapping[str, Any]]) -> str:
    return next((str(m["content"]) for m in reversed(list(messages)) if m.get("role") == "user"), "")


def pair_gaps(pairs: Iterable[Mapping[str, Any]], scorer: ReplyScorer = reply_quality) -> dict[str, list[float]]:
    """quality(chosen) - quality(rejected) per preference pair, grouped by the pair's context (a context's pairs
    share replies, so they are not independent)."""
    gaps: dict[str, list[float]] = {}
    for pair in pairs:
        user = last_user_message(pair["prompt"])
        gap = scorer(str(pair["chosen"]), user).score - scorer(str(pair["rejected"]), user).score
        gaps.setdefault(str(pair.get("context") or pair.get("id") or len(gaps)), []).append(gap)
    return gaps


# Fewer groups than this give no interval: resampling 2 contexts, say, can only pick between their two means.
MIN_GROUPS = 5


def cluster_interval(groups: Sequence[Sequence[float]], seed: int = 0) -> dict[str, Any]:
    """n, mean and a 95% bootstrap interval of the mean over every value, resampling whole groups (no interval
    with fewer than :data:`MIN_GROUPS` groups)."""
    from emili_pipeline.study_sim import LEVEL, SAMPLES

    values = [v for g in groups for v in g]
    if not values:
        return {"n": 0, "groups": 0, "mean": None, "ci95": None}
    mean = round(float(np.mean(values)), 4)
    if len(groups) < MIN_GROUPS:
        return {"n": len(values), "groups": len(groups), "mean": mean, "ci95": None}
    sums, counts = np.array([sum(g) for g in groups]), np.array([len(g) for g in groups])
    picks = np.random.default_rng(seed).integers(0, len(groups), size=(SAMPLES, len(groups)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1.0 - LEVEL) / 2.0
    low, high = (round(float(q), 4) for q in np.quantile(means, [tail, 1.0 - tail]))
    return {"n": len(values), "groups": len(groups), "mean": mean, "ci95": [low, high]}


def _mean_words(texts: Sequence[str]) -> float | None:
    return round(float(np.mean([word_count(t) for t in texts])), 1) if texts else None


def pair_lengths(pairs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean words of the chosen and the rejected replies, and the share of pairs whose chosen reply is shorter."""
    shorter = [word_count(str(p["chosen"])) < word_count(str(p["rejected"])) for p in pairs]
    return {
        "chosen_words": _mean_words([str(p["chosen"]) for p in pairs]),
        "rejected_words": _mean_words([str(p["rejected"]) for p in pairs]),
        "chosen_shorter": round(sum(shorter) / len(shorter), 4) if shorter else None,
    }


def turn_lengths(examples: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean words of the assistant turns SFT trains on (weight 1) and of the rest (weight 0)."""
    texts: dict[int, list[str]] = {0: [], 1: []}
    for example in examples:
        for message in example["messages"]:
            if message.get("role") == "assistant" and message.get("weight") in (0, 1):
                texts[int(message["weight"])].append(str(message["content"]))
    return {"trained_words": _mean_words(texts[1]), "other_words": _mean_words(texts[0])}


def turn_qualities(
    examples: Iterable[Mapping[str, Any]], scorer: ReplyScorer = reply_quality
) -> tuple[list[float], list[float]]:
    """Hidden quality of the flagged (weight 1) and of the unflagged (weight 0) assistant turns of SFT examples,
    each scored against the user message before it."""
    flagged: list[float] = []
    unflagged: list[float] = []
    for example in examples:
        user = ""
        for message in example["messages"]:
            if message.get("role") == "user":
                user = str(message["content"])
            elif message.get("role") == "assistant" and message.get("weight") in (0, 1):
                (flagged if message["weight"] == 1 else unflagged).append(scorer(str(message["content"]), user).score)
    return flagged, unflagged


def training_signal(
    store: Any, datasets: Mapping[str, Any], scorer: ReplyScorer = reply_quality, seed: int = 0
) -> dict[str, Any]:
    """The gaps of one pipeline's datasets (its ``datasets`` step's outputs), with 95% bootstrap intervals."""
    from emili_core.objectstore import Bucket
    from emili_pipeline.study_sim import difference

    signal: dict[str, Any] = {}
    dpo = datasets.get("dpo") or {}
    if dpo.get("kind") == "dpo_feedback" and dpo.get("key"):
        pairs = _records(store.get_bytes(Bucket.DATASETS, dpo["key"]))
        groups = list(pair_gaps(pairs, scorer).values())
        gaps = [g for group in groups for g in group]
        signal["pairs"] = cluster_interval(groups, seed)
        signal["pairs"]["chosen_better"] = round(sum(g > 0 for g in gaps) / len(gaps), 4) if gaps else None
        signal["pairs"].update(pair_lengths(pairs))
    sft = datasets.get("sft") or {}
    if sft.get("kind") == "sft" and sft.get("key"):
        examples = _records(store.get_bytes(Bucket.DATASETS, sft["key"]))
        flagged, unflagged = turn_qualities(examples, scorer)
        signal["turns"] = {**difference(flagged, unflagged, seed), **turn_lengths(examples)}
    return signal


def _plain(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def signal_table(conditions: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """The report's table: one row per iteration that recorded a training signal (none: no table)."""
    from emili_pipeline.study_sim import _ci, _fmt

    rows = []
    for condition, iterations in conditions.items():
        for it in iterations:
            signal = it.get("training_signal")
            if not signal:
                continue
            pairs, turns = signal.get("pairs") or {}, signal.get("turns") or {}
            pair_gap = f"{_fmt(pairs['mean'])} {_ci(pairs['ci95'])}" if pairs.get("n") else "–"
            turn_gap = f"{_fmt(turns.get('difference'))} {_ci(turns.get('ci95'))}" if turns else "–"
            # Reports written before lengths were recorded show a dash there.
            pair_words = (
                f"{_plain(pairs.get('chosen_words'), 0)} / {_plain(pairs.get('rejected_words'), 0)} "
                f"({_plain(pairs.get('chosen_shorter'), 2)})"
            )
            turn_words = f"{_plain(turns.get('trained_words'), 0)} / {_plain(turns.get('other_words'), 0)}"
            rows.append(
                f"| {condition} | {it['iteration']} | {pairs.get('n', 0)} ({pairs.get('groups', 0)}) | {pair_gap} | "
                f"{_fmt(pairs.get('chosen_better'))} | {pair_words} | "
                f"{turns.get('n_candidate', 0)} / {turns.get('n_baseline', 0)} | {turn_gap} | {turn_words} |"
            )
    if not rows:
        return []
    return [
        "### What the loop learned from: the hidden quality of its training data (SYNTHETIC: simulated users)",
        "",
        "The simulator's reply quality (its users' known preference), scored as the user heard each reply. Pairs: "
        "quality(chosen) - quality(rejected) per DPO feedback pair, and the share of pairs whose chosen reply scores "
        "higher. Turns: the assistant turns SFT trains on (weight 1: flagged, among the largest reactions when the "
        "pipeline sets sft_delta_share; a reply cut off at the token limit only as its cut_replies rule allows) minus "
        "the rest of the SFT examples' turns. Above 0 under feedback means the flags carried the preference; about 0 "
        "under noise is the control. A context's pairs share replies, so the pairs' interval resamples contexts (in "
        "brackets after the pairs; none with fewer than 5). Words: mean reply length, chosen / rejected (the share "
        "of pairs whose chosen reply is shorter) and trained / not; the simulated users prefer shorter replies, so "
        "under noise a length gap is a preference that entered without feedback.",
        "",
        "| condition | iteration | DPO pairs (contexts) | chosen - rejected [95% CI] | chosen better (share) | "
        "words, chosen / rejected (chosen shorter) | turns, trained / not | trained - not [95% CI] | "
        "words, trained / not |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def paired_quality(
    arm: Mapping[str, Sequence[float]], baseline: Mapping[str, Sequence[float]], seed: int = 0
) -> dict[str, Any]:
    """An arm's hidden reply quality against a baseline's on the same contexts: per context and sample draw,
    arm - baseline (the same draw is the same sampling seed, so the two replies share their randomness), with a
    95% interval that resamples contexts. Contexts or draws only one side has are left out."""
    groups = []
    for context, scores in baseline.items():
        other = arm.get(context)
        if other:
            groups.append([a - b for a, b in zip(other, scores, strict=False)])
    return cluster_interval([g for g in groups if g], seed)
