"""The evaluation gate's evidence for a candidate version against the production arm (``emili_pipeline.gate``).

Offline items come from the evaluation run, every arm on the same items, so they are paired:

- ``diff_epitome_mean``: per context, the mean over ER/IP/EX of |level(reply) - level(reference)| (the project's
  classifiers; absent without them);
- ``mmlu_correct``: 0/1 per MMLU question, over the subjects both arms answered (absent when MMLU did not run);
- ``reply_words``: the word count of each reply (the reply metrics' words), the candidate's checked by the gate.

Contexts are those of every source of the run (EmpatheticDialogues test, held-out sessions), in source order;
with several seeds, the first seed's replies, as the reply metrics use.

Online items come from the labelled sessions each arm had (the labeler's ``gate_items``): per session ``delta_v``
(from the surveys), ``reaction`` (the mean change of the face after a reply) and ``negative_reaction_rate`` (the
share of its read replies whose reaction was negative), and ``negative_reaction`` (0/1) per reply whose reaction
was read (kept for older policies; replies of one person are not independent items, so the shipped gate compares
the per-session rate). Real and synthetic (simulated-user) sessions are never pooled: both arms' items are
real sessions when both have some, else synthetic ones, and ``origins`` says which. Synthetic per-session items are
paired by simulated user: the pipeline's arm sessions let the same users (seed, persona, start state, one user id)
meet every arm, and a paired comparison removes their differences from the gate's interval (``emili study power``
measured about 50 users per arm for what needed 190 unpaired). Everything else is compared as independent arms.

A metric that cannot be computed is absent from the evidence (the gate fails its check: never a pass by
default) and ``missing`` says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emili_affect.vad import raw_tokens
from emili_pipeline.gate import Evidence, evidence_to_json
from emili_session.gate_items import METRICS, PER_SESSION_METRICS, users_key

__all__ = [
    "OFFLINE_METRICS",
    "ONLINE_METRICS",
    "ArmItems",
    "GateEvidence",
    "gate_evidence",
    "mmlu_pairs",
    "reply_words",
    "summarize",
]

OFFLINE_METRICS = ("diff_epitome_mean", "mmlu_correct", "reply_words")
ONLINE_METRICS = METRICS
ORIGINS = ("real", "synthetic")  # Preference order: evidence from people first.
# Pair synthetic per-session items by user only when most users are on both arms; else compare independent arms.
PAIRED_MIN_SHARE = 0.5


def reply_words(replies: Sequence[str]) -> list[float]:
    """Each reply's length in words, counted as the reply metrics count them (:func:`raw_tokens`)."""
    return [float(len(raw_tokens(r))) for r in replies]


@dataclass
class ArmItems:
    """One arm's offline items over the run's contexts, appended source by source."""

    reply_words: list[float] = field(default_factory=list)
    diff_epitome: list[float] | None = field(default_factory=list)  # None once a source had no classifier levels.
    diff_epitome_reason: str | None = None

    def add(self, replies: Sequence[str], epitome: Mapping[str, Any] | None) -> None:
        self.reply_words += reply_words(replies)
        rows = (epitome or {}).get("per_row")
        if (epitome or {}).get("status") != "ok" or not isinstance(rows, list):
            self.diff_epitome = None
            self.diff_epitome_reason = str((epitome or {}).get("reason") or "DIFF-EPITOME was not computed")
        elif self.diff_epitome is not None:
            self.diff_epitome += [float(v) for v in rows]


def mmlu_pairs(candidate: Any, baseline: Any) -> tuple[list[float], list[float]] | str:
    """(candidate, baseline) 0/1 per question over the subjects both arms answered with the same questions, in
    subject order; or why there are none."""
    for name, result in (("candidate", candidate), ("baseline", baseline)):
        if not isinstance(result, Mapping):
            return f"MMLU did not run for the {name}"
        if "skipped" in result:
            return f"MMLU was skipped: {result['skipped']}"
        if not isinstance(result.get("correct"), Mapping):
            return f"the {name}'s MMLU result has no per-question correctness (run before it was kept)"
    a, b = candidate["correct"], baseline["correct"]
    shared = sorted(s for s in set(a) & set(b) if len(a[s]) == len(b[s]))
    if not shared:
        return "the candidate and the baseline answered no MMLU subject with the same questions"
    return [float(v) for s in shared for v in a[s]], [float(v) for s in shared for v in b[s]]


def _paired_by_user(metric: str, candidate: Mapping[str, Any], baseline: Mapping[str, Any]) -> Evidence | None:
    """Synthetic per-session items paired by simulated user (the pipeline's arm sessions give every arm the same
    users): the users both arms have, each once per arm; None when the items carry no users or a user repeats in an
    arm."""
    arms = []
    for items in (candidate, baseline):
        values, users = list(items.get(metric) or []), list(items.get(users_key(metric)) or [])
        if len(users) != len(values) or not all(users) or len(set(users)) != len(users):
            return None
        arms.append(dict(zip(users, values, strict=True)))
    common = sorted(set(arms[0]) & set(arms[1]))
    if len(common) < PAIRED_MIN_SHARE * min(len(arms[0]), len(arms[1])):
        return None
    return Evidence([float(arms[0][u]) for u in common], [float(arms[1][u]) for u in common], paired=True)


def _online(metric: str, candidate: Mapping[str, Any], baseline: Mapping[str, Any]) -> tuple[Evidence, str] | str:
    """The metric's items of one origin for both arms (real first), or why there are none. Real sessions are never
    paired: people on two arms are different people."""
    for origin in ORIGINS:
        c = list((candidate.get(origin) or {}).get(metric) or [])
        b = list((baseline.get(origin) or {}).get(metric) or [])
        if c and b:
            if metric in PER_SESSION_METRICS and origin == "synthetic":
                paired = _paired_by_user(metric, candidate[origin], baseline[origin])
                if paired is not None:
                    return paired, origin
            return Evidence(candidate=[float(v) for v in c], baseline=[float(v) for v in b], paired=False), origin
    have = {
        name: [o for o in ORIGINS if (arm.get(o) or {}).get(metric)]
        for name, arm in (("candidate", candidate), ("baseline", baseline))
    }
    return (
        f"no sessions of one origin with {metric} items for both arms (candidate: "
        f"{', '.join(have['candidate']) or 'none'}; baseline: {', '.join(have['baseline']) or 'none'})"
    )


@dataclass(frozen=True)
class GateEvidence:
    candidate: str | None
    baseline: str
    evidence: dict[str, Evidence]
    missing: dict[str, str]
    origins: dict[str, str]  # metric -> "contexts" (offline) or the sessions' origin ("real", "synthetic").

    def to_json(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "baseline": self.baseline,
            "evidence": evidence_to_json(self.evidence),
            "missing": dict(self.missing),
            "origins": dict(self.origins),
        }


def gate_evidence(
    candidate: str | None,
    baseline: str,
    offline: Mapping[str, ArmItems],
    mmlu: Any,
    online: Mapping[str, Any] | None,
) -> GateEvidence:
    """The gate's evidence for ``candidate`` against ``baseline``.

    ``offline``: each evaluated arm's :class:`ArmItems` (the same contexts for all); ``mmlu``: the run's MMLU
    part (``{arm: run_mmlu(...)}`` or ``{"skipped": why}``); ``online``: the labeler's ``gate_items``
    (``{arm: {origin: {"delta_v": [...], "reaction": [...], "negative_reaction": [...], ...}}}``) or None when
    there were none.
    """
    evidence: dict[str, Evidence] = {}
    missing: dict[str, str] = {}
    origins: dict[str, str] = {}
    if candidate is None:
        why = "no candidate: the pipeline trained no version"
        return GateEvidence(None, baseline, {}, dict.fromkeys((*OFFLINE_METRICS, *ONLINE_METRICS), why), {})
    absent = [name for name, arm in (("candidate", candidate), ("baseline", baseline)) if arm not in offline]
    if absent:
        why = f"the evaluation run did not answer its contexts with the {' and '.join(absent)}"
        missing |= {"diff_epitome_mean": why, "reply_words": why}
    else:
        c, b = offline[candidate], offline[baseline]
        evidence["reply_words"] = Evidence(c.reply_words, b.reply_words, paired=True)
        origins["reply_words"] = "contexts"
        if c.diff_epitome is None or b.diff_epitome is None:
            missing["diff_epitome_mean"] = c.diff_epitome_reason or b.diff_epitome_reason or "not computed"
        else:
            evidence["diff_epitome_mean"] = Evidence(c.diff_epitome, b.diff_epitome, paired=True)
            origins["diff_epitome_mean"] = "contexts"
    if not isinstance(mmlu, Mapping) or not mmlu:
        pairs: tuple[list[float], list[float]] | str = "MMLU did not run"
    elif "skipped" in mmlu:
        pairs = f"MMLU was skipped: {mmlu['skipped']}"
    else:
        pairs = mmlu_pairs(mmlu.get(candidate), mmlu.get(baseline))
    if isinstance(pairs, str):
        missing["mmlu_correct"] = pairs
    else:
        evidence["mmlu_correct"] = Evidence(pairs[0], pairs[1], paired=True)
        origins["mmlu_correct"] = "questions"
    for metric in ONLINE_METRICS:
        if not online:
            missing[metric] = "no labelled sessions of the arms (the delta_table step gave no gate items)"
            continue
        found = _online(metric, online.get(candidate) or {}, online.get(baseline) or {})
        if isinstance(found, str):
            missing[metric] = found
        else:
            evidence[metric], origins[metric] = found
    return GateEvidence(candidate, baseline, evidence, missing, origins)


def summarize(gate: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per metric of a :meth:`GateEvidence.to_json`: n and mean of each side, or why it is missing."""
    rows: list[dict[str, Any]] = []
    evidence = gate.get("evidence") or {}
    origins = gate.get("origins") or {}
    for metric, item in evidence.items():
        c, b = list(item.get("candidate") or []), list(item.get("baseline") or [])
        rows.append(
            {
                "metric": metric,
                "paired": bool(item.get("paired")),
                "origin": origins.get(metric),
                "n_candidate": len(c),
                "n_baseline": len(b),
                "mean_candidate": float(np.mean(c)) if c else None,
                "mean_baseline": float(np.mean(b)) if b else None,
            }
        )
    rows += [{"metric": metric, "missing": str(why)} for metric, why in (gate.get("missing") or {}).items()]
    return rows
