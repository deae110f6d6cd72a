"""The loop simulation study (``emili study simulate``): does the loop do what it claims, with SIMULATED users?

Simulated users have known preferences: their hidden valence moves with a known reply-quality function
(:mod:`emili_pipeline.simulator.state`), and their face shows that state. Per condition and iteration:

1. simulated users talk to the production arm; their sessions are recorded as synthetic ones;
2. the real :class:`~emili_pipeline.loop.Loop` with the real :class:`~emili_pipeline.loop_actions.SystemActions`
   (``include_synthetic``, the simulation pipeline and gate) trains a candidate on every session the condition
   recorded so far, gates it and, when it passes, runs the canary;
3. simulated users talk to the base arm and to the candidate; their hidden valence change (Δv, the known
   preference's effect), ratings and reply quality are compared with bootstrap confidence intervals.

Conditions: ``feedback`` (faces show the user's state) and ``noise`` (faces show a decoy state moved by random
"qualities", so reaction flags and DPO pairs carry no information; surveys, ratings and Δv still follow the real
state). A loop that works improves Δv under feedback and never promotes under noise.

Where the noise condition's faces show the decoy (``noise_faces``): ``everywhere`` (the default) in every session of
the condition, the gate's evaluation users and step 3's included, as in a world where faces carry no information;
``training`` only in the sessions the loop learns from (step 1), so the gate and step 3 read the users' real faces.
The second is the stricter control: a candidate trained on noise is judged on what it really does to people's faces
(e.g. shorter replies), not on decoy faces that its gate checks cannot read.

The canary runs offline, not in the gateway: the gateway's sequential canary plans 100 rated sessions per arm at a
share of 0.1 (about a thousand participants through the web app's API, days on this CPU); `make loop-demo` runs it
with simulated participants at a demo's size instead. Here its phase is step 3's users on the candidate and on the
production arm, judged by ``canary_rule``:

- ``gateway`` (the default): the gateway's own rule (:mod:`emili_affect.canary`), planned at
  ``canary_min_sessions`` sessions per arm: looked at after every pair of sessions, rolled back at once on harm to
  the rating, completion, gold Δv or positive-reaction rate (the last two from the labeler's labels of the canary
  sessions, as the gateway reads them), promoted at the planned size when the rating is shown not worse than the
  margin. The gate asks for the gain; the canary, as in the product, for safety.
- ``dv-gain``: the rule of the studies before it (runs A to G): promoted only when the hidden Δv gain over
  production is above 0 with 95% confidence and the rating shows no clear loss; far stricter than the product.

Reports say which next to every canary outcome.

A study on a 2-core CPU takes hours (about 40 minutes per iteration), so it can be stopped and carried on: the
report is rewritten after every iteration, ``<out>/<condition>/progress.json`` keeps the condition's sessions and an
iteration stopped after its collection, and the loop's own state is in the object store (``--resume``). Every
iteration's per-session values are kept, so the report also pools the iterations' candidate-vs-base differences.
Its conditions can also run at the same time, one process each, and be merged into one report
(:mod:`emili_pipeline.study_combine`).

The pure parts (intervals, decisions, the report) are at the top; what needs the local stack is below.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import yaml

from emili_affect.stats import bootstrap_ci
from emili_core.settings import REPO_ROOT

log = logging.getLogger(__name__)

Condition = Literal["feedback", "noise"]
CONDITIONS: tuple[Condition, ...] = ("feedback", "noise")
FEEDBACK: dict[Condition, Literal["state", "noise"]] = {"feedback": "state", "noise": "noise"}
CONFIGS = REPO_ROOT / "libs" / "pipeline" / "configs"
SIMULATION_PIPELINE = CONFIGS / "loop-simulation.yaml"
SIMULATION_GATE = CONFIGS / "gate-simulation.yaml"
OFFLINE_STUDY = "offline-simulation"  # The loop's study id: its canary is :class:`OfflineCanary`, not the gateway.
# Per simulated session: the hidden valence change, the mean of the three ratings, each rating, reply quality, and
# words per reply (the simulator's quality penalises long replies: a candidate may "gain" by being shorter).
METRICS = ("delta_v", "rating", "empathy", "relevance", "fluency", "reply_quality", "reply_words")
PRIMARY = "delta_v"
LEVEL = 0.95
SAMPLES = 2000
NOTE = (
    "SIMULATED users (emili_pipeline.simulator): preferences are the simulator's known reply-quality function. "
    "These numbers say whether the loop's machinery works as designed; they say nothing about people."
)
CanaryRuleName = Literal["gateway", "dv-gain"]
CANARY_RULES: tuple[CanaryRuleName, ...] = ("gateway", "dv-gain")
CANARY_NOTES: dict[str, str] = {
    "gateway": (
        "Canary run OFFLINE with the gateway's rule (emili_affect.canary): simulated users per arm (candidate vs "
        "production), looked at after every pair of sessions; rolled back on harm to the rating, completion, gold Δv "
        "or positive-reaction rate (always-valid mSPRT), promoted at the planned size when the rating is shown not "
        "worse than the margin. Not the gateway's live canary (`make loop-demo` runs that one)."
    ),
    "dv-gain": (
        "Canary run OFFLINE: simulated users per arm (candidate vs production) and a fixed-size test, not the "
        "gateway's sequential canary (`make loop-demo` runs that one); promoted only on a Δv gain (95% interval above "
        "0) with no clear rating loss."
    ),
}
EARLIER_CANARY_RULE: CanaryRuleName = "dv-gain"  # The rule of reports written before canary_rule was an option.


# --- pure: items, intervals, decisions --------------------------------------------------------------------------


def session_values(outcomes: Iterable[Any]) -> dict[str, list[tuple[int, float]]]:
    """Per metric, (simulated user, value) for each completed simulated session (``SessionOutcome``-like: ``seed``,
    ``ok``, ``start_state``, ``end_state``, ``ratings``, ``turns`` with ``quality``); the user is its seed, the same
    on every arm of an iteration. Failed sessions are left out."""
    values: dict[str, list[tuple[int, float]]] = {m: [] for m in METRICS}
    for outcome in outcomes:
        if not outcome.ok:
            continue
        user = int(outcome.seed)
        values["delta_v"].append((user, float(outcome.end_state["valence"] - outcome.start_state["valence"])))
        ratings = outcome.ratings or {}
        if rated(outcome):
            for k in ("empathy", "relevance", "fluency"):
                values[k].append((user, float(ratings[k])))
            values["rating"].append((user, float(np.mean([ratings[k] for k in ("empathy", "relevance", "fluency")]))))
        qualities = [t.quality for t in outcome.turns if t.quality is not None]
        if qualities:
            values["reply_quality"].append((user, float(np.mean(qualities))))
        replies = [t.reply for t in outcome.turns if t.reply]
        if replies:
            values["reply_words"].append((user, float(np.mean([len(r.split()) for r in replies]))))
    return values


def session_items(outcomes: Iterable[Any]) -> dict[str, list[float]]:
    """Per metric, one value per completed simulated session (:func:`session_values` without the users)."""
    return {m: [v for _, v in pairs] for m, pairs in session_values(outcomes).items()}


def session_users(outcomes: Iterable[Any]) -> dict[str, list[int]]:
    """Per metric, the simulated user of each of :func:`session_items`'s values, in the same order."""
    return {m: [u for u, _ in pairs] for m, pairs in session_values(outcomes).items()}


def paired_differences(
    candidate: Sequence[float], candidate_users: Sequence[int], baseline: Sequence[float], baseline_users: Sequence[int]
) -> list[float]:
    """candidate - baseline per simulated user who completed a session on both arms (in the candidate's order)."""
    for users in (candidate_users, baseline_users):
        if len(set(users)) != len(users):
            raise ValueError("a simulated user gave two sessions on one arm: pairs need one session per user and arm")
    base = dict(zip(baseline_users, baseline, strict=True))
    return [c - base[u] for u, c in zip(candidate_users, candidate, strict=True) if u in base]


def paired_interval(differences: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """The mean per-user difference with a 95% bootstrap interval resampling users (:func:`pooled_paired` of one
    iteration)."""
    one = pooled_paired([differences], seed)
    # One pair has no spread: a bootstrap "interval" of it would be a single point, read as certainty.
    ci95 = one["ci95"] if one["n_pairs"] >= 2 else None
    return {"n_pairs": one["n_pairs"], "difference": one["difference"], "ci95": ci95}


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def interval(values: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """n, mean and the 95% percentile-bootstrap interval of the mean (None when there are fewer than 2 values)."""
    if not values:
        return {"n": 0, "mean": None, "ci95": None}
    if len(values) < 2:
        return {"n": 1, "mean": round(float(values[0]), 4), "ci95": None}
    low, high = bootstrap_ci(values, samples=SAMPLES, seed=seed, level=LEVEL)
    return {"n": len(values), "mean": round(float(np.mean(values)), 4), "ci95": [_finite(low), _finite(high)]}


def difference(candidate: Sequence[float], baseline: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """mean(candidate) - mean(baseline), arms independent, with a 95% bootstrap interval (each arm resampled):
    :func:`pooled_difference` of one iteration."""
    if not candidate or not baseline:
        return {"n_candidate": len(candidate), "n_baseline": len(baseline), "difference": None, "ci95": None}
    one = pooled_difference([(candidate, baseline)], seed)
    found = {k: one[k] for k in ("n_candidate", "n_baseline", "difference", "ci95")}
    return found if min(len(candidate), len(baseline)) >= 2 else {**found, "ci95": None}


def compare_arms(
    candidate: Mapping[str, Sequence[float]],
    baseline: Mapping[str, Sequence[float]],
    seed: int = 0,
    users: tuple[Mapping[str, Sequence[int]], Mapping[str, Sequence[int]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per metric: each arm's interval and the difference candidate - baseline, arms independent; with ``users``
    (:func:`session_users` of the candidate's and the baseline's sessions) also the paired difference over the
    users who met both arms, which leaves out how much the users differ from one another."""
    compared: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        c, b = candidate.get(m, []), baseline.get(m, [])
        compared[m] = {
            "candidate": interval(c, seed),
            "baseline": interval(b, seed),
            "difference": difference(c, b, seed),
        }
        if users is not None:
            pairs = paired_differences(c, users[0].get(m, []), b, users[1].get(m, []))
            compared[m]["paired"] = paired_interval(pairs, seed)
    return compared


POOLED_METRICS = ("delta_v", "rating", "reply_quality", "reply_words")


def pooled_difference(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], seed: int = 0) -> dict[str, Any]:
    """Over iterations, the mean of mean(candidate) - mean(base), with a 95% stratified bootstrap interval (each
    iteration's two arms resampled within that iteration): "does the loop's candidate beat base", from every
    iteration's candidate at once. Iterations with an empty arm are left out."""
    pairs = [(c, b) for c, b in pairs if len(c) and len(b)]
    if not pairs:
        return {"iterations": 0, "n_candidate": 0, "n_baseline": 0, "difference": None, "ci95": None}
    rng = np.random.default_rng(seed)
    draws = np.zeros(SAMPLES)
    for candidate, baseline in pairs:
        c, b = np.asarray(candidate, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
        draws += c[rng.integers(0, len(c), size=(SAMPLES, len(c)))].mean(axis=1)
        draws -= b[rng.integers(0, len(b), size=(SAMPLES, len(b)))].mean(axis=1)
    draws /= len(pairs)
    tail = (1.0 - LEVEL) / 2.0
    point = float(np.mean([np.mean(c) - np.mean(b) for c, b in pairs]))
    return {
        "iterations": len(pairs),
        "n_candidate": sum(len(c) for c, _ in pairs),
        "n_baseline": sum(len(b) for _, b in pairs),
        "difference": round(point, 4),
        "ci95": [round(float(np.quantile(draws, tail)), 4), round(float(np.quantile(draws, 1.0 - tail)), 4)],
    }


def pooled_paired(differences: Sequence[Sequence[float]], seed: int = 0) -> dict[str, Any]:
    """Over iterations, the mean of each iteration's mean per-user difference (candidate - base on the same simulated
    users), with a 95% stratified bootstrap interval (each iteration's users resampled within it). Iterations
    without a pair are left out."""
    groups = [np.asarray(d, dtype=np.float64) for d in differences if len(d)]
    if not groups:
        return {"iterations": 0, "n_pairs": 0, "difference": None, "ci95": None}
    rng = np.random.default_rng(seed)
    draws = sum(g[rng.integers(0, len(g), size=(SAMPLES, len(g)))].mean(axis=1) for g in groups) / len(groups)
    tail = (1.0 - LEVEL) / 2.0
    return {
        "iterations": len(groups),
        "n_pairs": sum(len(g) for g in groups),
        "difference": round(float(np.mean([g.mean() for g in groups])), 4),
        "ci95": [round(float(np.quantile(draws, tail)), 4), round(float(np.quantile(draws, 1.0 - tail)), 4)],
    }


def pooled_comparison(iterations: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per metric, every iteration's candidate against base pooled (:func:`pooled_difference`), and paired by user
    over the iterations that recorded their users (:func:`pooled_paired`)."""
    evaluations = [it.get("evaluation") or {} for it in iterations]
    arms = [e.get("items") or {} for e in evaluations]
    arms = [a for a in arms if "candidate" in a and "base" in a]
    paired = [
        (e["items"], e["users"])
        for e in evaluations
        if {"candidate", "base"} <= set(e.get("items") or {}) and {"candidate", "base"} <= set(e.get("users") or {})
    ]
    return {
        m: {
            **pooled_difference([(a["candidate"].get(m, []), a["base"].get(m, [])) for a in arms], seed),
            "paired": pooled_paired(
                [
                    paired_differences(
                        items["candidate"].get(m, []),
                        users["candidate"].get(m, []),
                        items["base"].get(m, []),
                        users["base"].get(m, []),
                    )
                    for items, users in paired
                ],
                seed,
            ),
        }
        for m in POOLED_METRICS
    }


def base_against_base(conditions: Mapping[str, Sequence[Mapping[str, Any]]], seed: int = 0) -> dict[str, Any]:
    """An A/A check: iteration i's base arm meets the same simulated users (the same seeds) in every condition, on
    the same base model, so feedback's base minus noise's base should differ only by chance (the model's sampling
    and the users' reactions). Per metric, each iteration's difference and all of them pooled; {} without both
    conditions."""
    if not {"feedback", "noise"} <= set(conditions):
        return {}

    def bases(name: str) -> dict[int, Mapping[str, Sequence[float]]]:
        found = {}
        for it in conditions[name]:
            items = ((it.get("evaluation") or {}).get("items") or {}).get("base")
            if items:
                found[int(it["iteration"])] = items
        return found

    feedback, noise = bases("feedback"), bases("noise")
    shared = sorted(set(feedback) & set(noise))
    return {
        m: {
            "iterations": {i: difference(feedback[i].get(m, []), noise[i].get(m, []), seed) for i in shared},
            "pooled": pooled_difference([(feedback[i].get(m, []), noise[i].get(m, [])) for i in shared], seed),
        }
        for m in POOLED_METRICS
    }


# Percentile bootstrap intervals on a handful of sessions are far too narrow (the first run saw a noise-trained
# candidate "gain" on 6 users per arm): below this many sessions per arm the offline canary never promotes.
MIN_CANARY_SESSIONS = 20
# The offline canary's planned size by default. At 20 per arm the gateway's rule promotes only about half of
# candidates rated exactly like production; at 60, 84-85%, while still rolling back 99% of those rated 0.3 worse
# (`emili study canary-power`, BENCHMARKS.md run P).
CANARY_PLANNED_SESSIONS = 60


def canary_decision(
    candidate: Mapping[str, Sequence[float]],
    production: Mapping[str, Sequence[float]],
    seed: int = 0,
    min_sessions: int = MIN_CANARY_SESSIONS,
) -> dict[str, Any]:
    """The offline canary: ``promoted`` when Δv's gain over production is above 0 with 95% confidence and the
    mean rating's interval does not lie wholly below 0; else ``rolled_back``. Fewer than ``min_sessions``
    sessions, or rated sessions, on either arm: rolled back."""
    gain = difference(candidate.get(PRIMARY, []), production.get(PRIMARY, []), seed)
    rating = difference(candidate.get("rating", []), production.get("rating", []), seed)
    if gain["ci95"] is None or min(gain["n_candidate"], gain["n_baseline"]) < max(2, min_sessions):
        reason = f"too few simulated sessions to decide (fewer than {min_sessions} on an arm)"
        return {"outcome": "rolled_back", "reason": reason, PRIMARY: gain}
    if rating["ci95"] is None or min(rating["n_candidate"], rating["n_baseline"]) < max(2, min_sessions):
        reason = f"too few rated simulated sessions to decide (fewer than {min_sessions} on an arm)"
        return {"outcome": "rolled_back", "reason": reason, PRIMARY: gain, "rating": rating}
    if rating["ci95"][1] < 0:
        reason = f"rating clearly lower ({rating['difference']:+.3f}, 95% CI {rating['ci95']})"
        return {"outcome": "rolled_back", "reason": reason, PRIMARY: gain, "rating": rating}
    if gain["ci95"][0] > 0:
        reason = f"Δv gain {gain['difference']:+.3f}, 95% CI {gain['ci95']} above 0"
        return {"outcome": "promoted", "reason": reason, PRIMARY: gain, "rating": rating}
    reason = f"no clear Δv gain ({gain['difference']:+.3f}, 95% CI {gain['ci95']} includes 0 or a loss)"
    return {"outcome": "rolled_back", "reason": reason, PRIMARY: gain, "rating": rating}


def rated(session: Any) -> bool:
    """Whether a simulated session completed with all three ratings (the gateway canary's rated session)."""
    ratings = session.ratings or {}
    return bool(session.ok) and all(k in ratings for k in ("empathy", "relevance", "fluency"))


def canary_outcomes(sessions: Iterable[Any], labels: Mapping[str, Mapping[str, Any]]) -> list[dict[str, float | None]]:
    """Per simulated session, in the order the users ran, the gateway canary's outcomes: ``rating`` (the mean of the
    three ratings; None unrated), ``completed`` (1 rated, 0 not: a failed session is an abandoned one), and from its
    label in ``labels`` (by session id; the labeler's, as the gateway reads it) ``delta_v`` (gold, from the surveys)
    and ``positive_reaction`` (the share of replies whose read reaction was flagged)."""
    rows = []
    for session in sessions:
        ratings, complete = session.ratings or {}, rated(session)
        label = labels.get(session.session_id) or {}
        delta = (label.get("gold") or {}).get("delta")
        read = [t for t in label.get("turns") or () if t.get("delta") is not None]
        rows.append(
            {
                "rating": float(np.mean([ratings[k] for k in ("empathy", "relevance", "fluency")]))
                if complete
                else None,
                "completed": 1.0 if complete else 0.0,
                "delta_v": float(delta["valence"]) if delta else None,
                "positive_reaction": sum(bool(t.get("flagged")) for t in read) / len(read) if read else None,
            }
        )
    return rows


def gateway_canary_decision(
    candidate: Sequence[Mapping[str, float | None]],
    production: Sequence[Mapping[str, float | None]],
    planned_sessions: int = MIN_CANARY_SESSIONS,
) -> dict[str, Any]:
    """The offline canary with the gateway's rule (:func:`emili_affect.canary.judge`, its default alpha, margin,
    scales and burn-in), planned at ``planned_sessions`` per arm: looked at after each pair of sessions (the k-th of
    each arm, in the order they ran), as the gateway's monitor looks after each session; the p-values' running
    minimum carries over. Still undecided after the last pair (fewer rated sessions than planned): rolled back.
    Harm's alpha is shared by all four outcomes even when no label could be read (the gateway shares it by two when
    it has no labeler): a little more conservative, never less."""
    from emili_affect.canary import OUTCOMES, CanaryRule, judge

    rule = CanaryRule(max_sessions=planned_sessions)  # Its burn-in is min(min_sessions, planned_sessions).
    p_harm: dict[str, float] = {}
    looks, verdict = 0, None
    for k in range(1, max(len(candidate), len(production)) + 1):
        values = [
            {m: [float(v) for row in rows[:k] if (v := row.get(m)) is not None] for m in OUTCOMES}
            for rows in (candidate, production)
        ]
        verdict = judge(rule, values[0], values[1], OUTCOMES, previous_p_harm=p_harm)
        p_harm = {look.outcome: look.p_harm for look in verdict.looks}
        looks = k
        if verdict.state != "running":
            break
    outcome, reason = "rolled_back", f"fewer than the planned {planned_sessions} rated sessions on an arm"
    if verdict is not None and verdict.state != "running":
        outcome, reason = verdict.state, verdict.reason
    return {
        "outcome": outcome,
        "reason": reason,
        "rule": "gateway",
        "planned_sessions": planned_sessions,
        "looks": looks,
        "outcomes": [asdict(look) for look in verdict.looks] if verdict is not None else [],
    }


def decision_summary(iterations: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One condition's iterations in numbers: candidates, gate passes, canary outcomes, promotions, sessions."""
    gate = [it.get("gate") or {} for it in iterations]
    canary = [(it.get("canary") or {}).get("outcome") for it in iterations]
    return {
        "iterations": len(iterations),
        "candidates": sum(1 for it in iterations if it.get("candidate")),
        "gate_passed": sum(1 for g in gate if g.get("passed")),
        "gate_failed": sum(1 for g in gate if g and not g.get("passed")),
        "promoted": canary.count("promoted"),
        "rolled_back": canary.count("rolled_back"),
        "sessions_collected": sum(int((it.get("collected") or {}).get("ok", 0)) for it in iterations),
        "sessions_used_last": max((int(it.get("sessions_used") or 0) for it in iterations), default=0),
        "final_production": iterations[-1].get("production_after") if iterations else None,
        "promoted_versions": [it.get("candidate") for it, c in zip(iterations, canary, strict=True) if c == "promoted"],
    }


def build_report(
    options: Mapping[str, Any], conditions: Mapping[str, Sequence[Mapping[str, Any]]], wall_s: float
) -> dict[str, Any]:
    """The study's JSON report: its options, every iteration of every condition, and the decisions per condition."""
    summary = {name: decision_summary(its) for name, its in conditions.items()}
    noise = summary.get("noise")
    return {
        "title": "Loop simulation study (SYNTHETIC: simulated users)",
        "synthetic": True,
        "note": NOTE,
        "canary_note": CANARY_NOTES[str(options.get("canary_rule") or EARLIER_CANARY_RULE)],
        "options": dict(options),
        "wall_s": round(wall_s, 1),
        "conditions": {name: list(its) for name, its in conditions.items()},
        "decisions": summary,
        "pooled_candidate_vs_base": {name: pooled_comparison(its) for name, its in conditions.items()},
        "base_against_base": base_against_base(conditions),
        # None until the noise condition has finished an iteration: "promoted nothing" needs something tried.
        "noise_promoted": None if noise is None or not noise["iterations"] else noise["promoted"] > 0,
    }


# --- pure: the Markdown report -----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:+.3f}" if isinstance(value, float | int) else str(value)


def _ci(ci: Sequence[float | None] | None) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "–"
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _mean(cell: Mapping[str, Any]) -> str:
    return "–" if cell.get("mean") is None else f"{cell['mean']:.3f}"


def _decisions_table(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "### Decisions per iteration (SYNTHETIC: simulated users)",
        "",
        "| condition | iteration | sessions used (new) | candidate | gate | failed checks | canary (offline) | "
        "production after | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, iterations in report["conditions"].items():
        for it in iterations:
            gate = it.get("gate") or {}
            verdict = "–" if not gate else ("passed" if gate.get("passed") else "failed")
            failed = ", ".join(c["name"] for c in gate.get("checks", []) if not c.get("passed")) or "–"
            canary = (it.get("canary") or {}).get("outcome") or "not run"
            used = f"{it.get('sessions_used') or 0} ({it.get('new_sessions') or 0})"
            lines.append(
                f"| {name} | {it['iteration']} | {used} | {it.get('candidate') or '–'} ({it.get('loop_outcome')}) | "
                f"{verdict} | {failed} | {canary} | {it.get('production_after')} | {it.get('wall_s', 0):.0f} |"
            )
    return lines


def _paired(cell: Mapping[str, Any] | None) -> str:
    if not cell or not cell.get("n_pairs"):
        return "–"
    return f"{_fmt(cell['difference'])} {_ci(cell['ci95'])} ({cell['n_pairs']})"


def _arms_table(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "### Candidate vs base (and vs production), simulated users per arm (SYNTHETIC: simulated users)",
        "",
        "Δv: the hidden valence change over a session (end - start); rating: mean of the 1-5 empathy, relevance and "
        "fluency ratings; quality: the simulator's reply-quality score, mean per session; reply_words: words per "
        "reply, mean per session. 95% bootstrap intervals; the difference is candidate - base, arms resampled "
        "independently; paired: the mean of each simulated user's own difference (the same user met both arms), "
        "users resampled, which leaves out how much users differ from one another (– where the iteration did not "
        "record its users).",
        "",
        "| condition | iteration | compared with | metric | n other | other mean [95% CI] | n cand. | "
        "candidate mean [95% CI] | difference [95% CI] | paired difference [95% CI] (pairs) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, iterations in report["conditions"].items():
        for it in iterations:
            evaluation = it.get("evaluation") or {}
            for other in ("base", "production"):
                compared = evaluation.get(f"candidate_vs_{other}") or {}
                for metric in POOLED_METRICS:
                    row = compared.get(metric)
                    if not row:
                        continue
                    b, c, d = row["baseline"], row["candidate"], row["difference"]
                    arm = other if other == "base" else f"production ({it.get('production_before')})"
                    lines.append(
                        f"| {name} | {it['iteration']} | {arm} | {metric} | {b['n']} | {_mean(b)} {_ci(b['ci95'])} | "
                        f"{c['n']} | {_mean(c)} {_ci(c['ci95'])} | {_fmt(d['difference'])} {_ci(d['ci95'])} | "
                        f"{_paired(row.get('paired'))} |"
                    )
    return lines


def _gate_table(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "### Gate checks (evidence from the pipeline's simulated users per arm; SYNTHETIC)",
        "",
        "| condition | iteration | check | kind | n | estimate | 95% CI | passed | why |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, iterations in report["conditions"].items():
        for it in iterations:
            for check in (it.get("gate") or {}).get("checks", []):
                lines.append(
                    f"| {name} | {it['iteration']} | {check['name']} | {check['kind']} | {check['n']} | "
                    f"{_fmt(check.get('estimate'))} | {_ci(check.get('ci'))} | {'yes' if check['passed'] else 'no'} | "
                    f"{check.get('reason', '')} |"
                )
    return lines


def _summary_table(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "### Decisions per condition (SYNTHETIC: simulated users)",
        "",
        "| condition | iterations | candidates | gate passed | promoted | rolled back | sessions collected | "
        "final production |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["decisions"].items():
        lines.append(
            f"| {name} | {s['iterations']} | {s['candidates']} | {s['gate_passed']} | {s['promoted']} | "
            f"{s['rolled_back']} | {s['sessions_collected']} | {s['final_production']} |"
        )
    return lines


def _pooled_paired(cell: Mapping[str, Any] | None) -> str:
    if not cell or not cell.get("iterations"):
        return "–"
    return f"{_fmt(cell['difference'])} {_ci(cell['ci95'])} ({cell['iterations']}, {cell['n_pairs']})"


def _pooled_table(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "### Candidate vs base, every iteration pooled (SYNTHETIC: simulated users)",
        "",
        "The mean over iterations of each candidate's difference from base on that iteration's users; 95% "
        "stratified bootstrap (each iteration's arms resampled within it, independently although both arms meet the "
        "same simulated users, so the interval is on the wide side). It is about these candidates: the interval "
        "covers the users' variation, not what another run of the loop would train (`emili study pool` pools runs "
        "with other seeds: the loop's average effect over runs). Paired: the same over each "
        "user's own difference, in the iterations that recorded their users (how many, and the pairs, in brackets).",
        "",
        "| condition | metric | iterations | sessions, candidate / base (all) | difference [95% CI] | "
        "paired difference [95% CI] (iterations, pairs) |",
        "|---|---|---|---|---|---|",
    ]
    for name, metrics in (report.get("pooled_candidate_vs_base") or {}).items():
        for metric, d in metrics.items():
            if not d["iterations"]:  # E.g. words per reply in a report from before it was measured.
                continue
            lines.append(
                f"| {name} | {metric} | {d['iterations']} | {d['n_candidate']} / {d['n_baseline']} | "
                f"{_fmt(d['difference'])} {_ci(d['ci95'])} | {_pooled_paired(d.get('paired'))} |"
            )
    return lines


def _base_against_base_table(report: Mapping[str, Any]) -> list[str]:
    checks = report.get("base_against_base") or {}
    if not checks:
        return []
    options = report.get("options") or {}
    if (options.get("noise_faces") or RESUME_DEFAULTS["noise_faces"]) == "training":
        heading = [
            "### Base against base: how far chance alone moves an arm (SYNTHETIC: simulated users)",
            "",
            "Each iteration's base arm meets the same simulated users in both conditions, on the same base model: "
            "feedback's base minus noise's base differs only by the model's sampling and the users' reactions. A "
            "candidate's difference from base of this size is no evidence; about 1 in 20 of these intervals "
            "excludes 0 by chance.",
        ]
    else:
        # The base model reads the faces it is shown: under decoy faces its replies differ for a reason besides chance.
        heading = [
            "### Base under real faces against base under decoy faces (SYNTHETIC: simulated users)",
            "",
            "Each iteration's base arm meets the same simulated users in both conditions, on the same base model, "
            "but with `--noise-faces everywhere` the noise condition's users show the decoy state, and the model "
            "reads their faces: this is not an A/A check (`--noise-faces training` gives one). The difference is "
            "what the faces' readout changes in base's replies, plus chance.",
        ]
    lines = [
        *heading,
        "",
        "| metric | iteration | sessions, feedback's base / noise's base | difference [95% CI] |",
        "|---|---|---|---|",
    ]
    for metric, found in checks.items():
        rows = [(str(i), d) for i, d in found["iterations"].items()] + [("pooled", found["pooled"])]
        for label, d in rows:
            if d.get("ci95") is None:
                continue
            lines.append(
                f"| {metric} | {label} | {d['n_candidate']} / {d['n_baseline']} | {_fmt(d['difference'])} "
                f"{_ci(d['ci95'])} |"
            )
    return lines


def _canary_table(report: Mapping[str, Any]) -> list[str]:
    """Every canary decided: its rule, how many looks, the rating's difference and bound, and why."""
    rows = []
    for name, iterations in report["conditions"].items():
        for it in iterations:
            canary = it.get("canary") or {}
            if not canary.get("outcome"):
                continue
            rating: Mapping[str, Any] = next(
                (o for o in canary.get("outcomes") or () if o.get("outcome") == "rating"), {}
            )
            rows.append(
                f"| {name} | {it['iteration']} | {it.get('candidate')} | {canary.get('production')} | "
                f"{canary.get('rule', EARLIER_CANARY_RULE)} | {canary['outcome']} | {canary.get('looks', '–')} | "
                f"{_fmt(rating.get('difference'))} | {_fmt(rating.get('lower_bound'))} | {canary.get('reason', '')} |"
            )
    if not rows:
        return []
    return [
        "### Canary decisions (offline; SYNTHETIC: simulated users)",
        "",
        "Rating: candidate - production, mean of the three 1-5 ratings; bound: its one-sided 95% lower bound at the "
        "planned size (the gateway rule promotes when it is above minus the margin).",
        "",
        "| condition | iteration | candidate | production | rule | outcome | looks | rating difference | bound | why |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _parts_lines(report: Mapping[str, Any]) -> list[str]:
    """A combined study (emili_pipeline.study_combine): the runs it was merged from."""
    parts = report.get("parts") or []
    if not parts:
        return []
    runs = "; ".join(f"{p['conditions']} (run {p['run_id']}, {float(p.get('wall_s') or 0):.0f} s)" for p in parts)
    return [
        f"Combined from {len(parts)} runs with the same options on one stack, one per condition: {runs}. The wall "
        "time counts time they ran together once.",
        "",
    ]


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report for people: what was simulated, decisions, Δv and ratings with intervals, gate checks."""
    from emili_pipeline.study_gate_replies import gate_replies_table
    from emili_pipeline.study_signal import signal_table

    options = report.get("options") or {}
    noise = report.get("noise_promoted")
    verdict = (
        "not run"
        if noise is None
        else ("PROMOTED a candidate (the loop failed this check)" if noise else "promoted nothing (as required)")
    )
    lines = [
        f"# {report['title']}",
        "",
        f"**{report['note']}**",
        "",
        f"{report['canary_note']}",
        "",
        f"Options: {', '.join(f'{k}={v}' for k, v in options.items())}. Wall time {report['wall_s']:.0f} s.",
        "",
        *_parts_lines(report),
        f"Noise condition: the loop {verdict}.",
        "",
        *_summary_table(report),
        "",
        *_decisions_table(report),
        "",
        *_arms_table(report),
        "",
        *_pooled_table(report),
        "",
        *_base_against_base_table(report),
        "",
        *signal_table(report["conditions"]),
        "",
        *gate_replies_table(report["conditions"]),
        "",
        *_gate_table(report),
        "",
        *_canary_table(report),
    ]
    errors = [
        (n, it["iteration"], e) for n, its in report["conditions"].items() for it in its for e in it.get("errors", [])
    ]
    if errors:
        lines += ["### Errors", "", *(f"- {n} iteration {i}: {e}" for n, i, e in errors), ""]
    stopped = report.get("stopped") or {}
    if stopped:
        lines += ["### Not finished", "", *(f"- {why}" for why in stopped.values()), ""]
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "study.json", out / "study.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


# --- the pipeline config of one condition ------------------------------------------------------------------------


NoiseFaces = Literal["everywhere", "training"]


def evaluation_feedback(condition: Condition, noise_faces: NoiseFaces) -> Literal["state", "noise"]:
    """What the faces of a condition's evaluation users (the gate's, step 3's) show."""
    return "state" if noise_faces == "training" else FEEDBACK[condition]


def condition_pipeline(base: Path, condition: Condition, out: Path, noise_faces: NoiseFaces = "everywhere") -> Path:
    """``base`` with the face feedback of the condition's evaluation users, its recipe files as absolute paths,
    written under ``out``."""
    data = yaml.safe_load(base.read_text()) or {}
    data["name"] = f"{data.get('name', 'loop-simulation')}-{condition}"[:64]
    data["simulator"] = {**(data.get("simulator") or {}), "feedback": evaluation_feedback(condition, noise_faces)}
    recipes = dict(data.get("recipes") or {})
    for kind, value in recipes.items():
        if isinstance(value, str) and value.endswith((".yaml", ".yml")) and not Path(value).is_absolute():
            recipes[kind] = str((base.resolve().parent / value).resolve())
    data["recipes"] = recipes
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"pipeline-{condition}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- the loop's surroundings for a study (need the stack at run time, not to build) ------------------------------


class StudyLease:
    """The study's loop is its own and alone: no Redis lease (a real loop's lease is never taken or blocked)."""

    def take(self, owner: str, ttl_s: float) -> bool:
        return True

    def release(self, owner: str) -> None:
        return None


class ScopedStateStore:
    """The object store, with the loop's state kept under the study's own key, so a study never touches (or is
    touched by) the real loop's ``loop/state.json``; every other object is the store's."""

    def __init__(self, store: Any, state_key: str) -> None:
        from emili_pipeline.loop import STATE_KEY

        self._store, self._from, self._to = store, STATE_KEY, state_key

    def _key(self, key: str) -> str:
        return self._to if key == self._from else key

    def get_json(self, bucket: Any, key: str) -> Any:
        return self._store.get_json(bucket, self._key(key))

    def put_json(self, bucket: Any, key: str, value: Any) -> str:
        return str(self._store.put_json(bucket, self._key(key), value))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@dataclass
class OfflineCanary:
    """The canary phase without the gateway: ``compare(candidate)`` runs simulated users on the candidate and the
    production arm and returns the decision's dict (:func:`gateway_canary_decision` or :func:`canary_decision`);
    the outcome is kept until the next candidate."""

    compare: Callable[[str], dict[str, Any]]
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    on_decision: Callable[[], None] = lambda: None  # Keeps the decisions beyond this process (a resumed study).

    def start(self, candidate: str) -> None:
        self.decisions[candidate] = self.compare(candidate)
        self.on_decision()

    def outcome(self, candidate: str) -> str:
        decision = self.decisions.get(candidate)
        return "missing" if decision is None else str(decision["outcome"])


@dataclass
class StudyActions:
    """The real system actions, limited to the sessions this condition recorded (other conditions', the
    pipeline's own evaluation users' and anyone else's sessions stay out), with the canary run offline."""

    system: Any  # emili_pipeline.loop_actions.SystemActions
    canary: OfflineCanary
    allowed: set[str] = field(default_factory=set)

    def eligible_sessions(self, include_synthetic: bool) -> list[str]:
        return [s for s in self.system.eligible_sessions(include_synthetic) if s in self.allowed]

    def start_pipeline(self, session_ids: Sequence[str], baseline: str) -> str:
        return str(self.system.start_pipeline(session_ids, baseline))

    def pipeline_outcome(self, pipeline_id: str) -> Any:
        return self.system.pipeline_outcome(pipeline_id)

    def start_canary(
        self, candidate: str, production: str, share: float, studies: Sequence[str] | None, synthetic: bool
    ) -> list[str]:
        self.canary.start(candidate)  # Offline: its users meet the loop's baseline, the production arm it judged.
        return [OFFLINE_STUDY]

    def canary_outcome(self, candidate: str) -> str:
        return self.canary.outcome(candidate)


# --- running the study against the local stack --------------------------------------------------------------------


@dataclass(frozen=True)
class StudyOptions:
    iterations: int = 2
    sessions: int = 8  # Simulated sessions recorded per iteration (talking to the production arm).
    # Simulated users per arm after each candidate (base, candidate, production); fewer than canary_min_sessions and
    # the offline canary never promotes.
    eval_users: int = MIN_CANARY_SESSIONS
    canary_min_sessions: int = CANARY_PLANNED_SESSIONS  # Per arm; the gateway rule tops an arm up to it.
    seed: int = 0
    conditions: tuple[Condition, ...] = CONDITIONS
    out: Path = Path("var/reports/study-simulate")
    pipeline: Path = SIMULATION_PIPELINE
    gate: Path = SIMULATION_GATE
    concurrency: int = 4  # Chat batches concurrent replies: 4 users at a time cost little more than 2.
    noise_faces: NoiseFaces = "everywhere"  # Where the noise condition's faces show the decoy (module docstring).
    # How the offline canary decides (module docstring); None: gateway for a new study, a resumed one's own.
    canary_rule: CanaryRuleName | None = None
    poll_s: float = 5.0
    # How long one iteration waits for the loop to settle (train, gate, canary) after its collection. On a 2-core CPU
    # with two studies side by side an iteration's loop took over an hour (run N, BENCHMARKS.md).
    iteration_timeout_s: float = 3 * 3600.0

    def to_json(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "sessions_per_iteration": self.sessions,
            "eval_users_per_arm": self.eval_users,
            "canary_min_sessions": self.canary_min_sessions,
            "seed": self.seed,
            "conditions": "+".join(self.conditions),
            "pipeline": str(self.pipeline),
            "gate": str(self.gate),
            "config_sha256": config_digest(self.pipeline, self.gate),
            "noise_faces": self.noise_faces,
            "canary_rule": self.canary_rule,
        }


@dataclass
class Stack:
    """What the study talks to: object storage, the Celery producer, chat's address and a token per subject."""

    store: Any
    celery: Any
    chat_target: str
    token_for: Callable[[str], str]
    fetch_recipe: Callable[[str], str] | None = None
    base_simulator: Any = None  # SimulatorSettings of the environment (TLS and the like).


def _config_files(pipeline: Path, gate: Path) -> list[Path]:
    data = yaml.safe_load(pipeline.read_text()) or {}
    recipes = [v for v in (data.get("recipes") or {}).values() if isinstance(v, str) and v.endswith((".yaml", ".yml"))]
    return [pipeline, gate, *(pipeline.resolve().parent / r for r in recipes)]


def config_digest(pipeline: Path, gate: Path) -> str:
    """The pipeline, its recipe files and the gate, by parsed content: a resumed study must train and judge as
    before, and a comment or a re-wrapped line changes neither."""
    digest = hashlib.sha256()
    for path in _config_files(pipeline, gate):
        content = yaml.safe_load(path.read_text()) if path.is_file() else "(missing)"
        digest.update(json.dumps(content, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def byte_config_digest(pipeline: Path, gate: Path) -> str:
    """The digest studies recorded before config_digest parsed the files (a comment changed it): kept so that such a
    study can still be resumed when its files are byte for byte as they were."""
    digest = hashlib.sha256()
    for path in _config_files(pipeline, gate):
        digest.update(path.read_bytes() if path.is_file() else b"(missing)")
    return digest.hexdigest()[:16]


def arm_role(arm: str) -> str:
    """A short, stable name of an arm for its simulated users' subjects."""
    return "base" if arm == "base" else hashlib.sha256(arm.encode()).hexdigest()[:6]


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] % (2**31))


class ConditionRun:
    """One condition's loop over its iterations: collect, the loop's tick until it settles, the arms compared."""

    def __init__(self, stack: Stack, options: StudyOptions, condition: Condition, run_id: str) -> None:
        from emili_pipeline.config import load_config
        from emili_pipeline.loop import Loop, LoopPolicy
        from emili_pipeline.loop_actions import SystemActions
        from emili_pipeline.simulator import load_personas

        self.stack, self.options, self.condition, self.run_id = stack, options, condition, run_id
        folder = options.out / condition
        self.progress_path = folder / "progress.json"
        self.pending: dict[str, Any] | None = None  # An iteration whose users have been collected, not yet finished.
        self.pipeline_path = condition_pipeline(options.pipeline, condition, folder, options.noise_faces)
        config = load_config(self.pipeline_path)
        self.simulator = config.simulator_settings(stack.base_simulator)  # The evaluation users' faces.
        self.collection_simulator = self.simulator.model_copy(update={"feedback": FEEDBACK[condition]})
        self.personas = load_personas(config.personas, config.persona_limit)
        self.iteration = 0
        self.arm_items: dict[tuple[int, str], dict[str, list[float]]] = {}
        self.arm_sessions: dict[tuple[int, str], list[Any]] = {}  # The users' SessionOutcomes, for the canary.
        self.arm_users: dict[tuple[int, str], dict[str, list[int]]] = {}  # Who gave each of arm_items' values.
        self.arm_errors: list[str] = []
        self.canary = OfflineCanary(self._canary_compare, on_decision=self._save_progress)
        system = SystemActions(stack.store, stack.celery, self.pipeline_path, fetch_recipe=stack.fetch_recipe)
        self.actions = StudyActions(system, self.canary)
        policy = LoopPolicy(
            enabled=True,
            interval_s=max(options.poll_s, 1.0),
            min_new_sessions=1,
            include_synthetic=True,
            canary_in="study",
            study_id=OFFLINE_STUDY,
            production="base",
            gate=options.gate,
            pipeline=self.pipeline_path,
        )
        store = ScopedStateStore(stack.store, f"study-simulations/{run_id}/{condition}/loop-state.json")
        self.loop = Loop(policy, cast(Any, store), StudyLease(), self.actions, owner=f"study-{condition}")

    # Simulated users ---------------------------------------------------------------------------------------------

    def _users(self, n: int, arm: str, role: str, seed: int, collection: bool = False) -> list[Any]:
        from emili_pipeline.simulator import run_users

        settings = (self.collection_simulator if collection else self.simulator).model_copy(
            update={"model_arm": arm, "subject_prefix": f"sim-{self.condition[:5]}-{self.iteration}-{role}"[:32]}
        )
        return asyncio.run(
            run_users(
                n,
                self.options.concurrency,
                self.stack.chat_target,
                self.personas,
                settings,
                seed,
                token_for=self.stack.token_for,
            )
        )

    def arm(self, arm: str) -> dict[str, list[float]]:
        """This iteration's simulated users on ``arm`` (once per arm and iteration): the same seeds on every arm, so
        arms meet the same users."""
        key = (self.iteration, arm)
        if key not in self.arm_items:
            role = arm_role(arm)
            outcomes = self._users(self.options.eval_users, arm, role, _seed(self.options.seed, self.iteration, 2))
            self.arm_errors += [f"arm {arm}: {e}" for o in outcomes for e in o.errors][:10]
            self.arm_items[key] = session_items(outcomes)
            self.arm_users[key] = session_users(outcomes)
            self.arm_sessions[key] = list(outcomes)
        return self.arm_items[key]

    def _canary_compare(self, candidate: str) -> dict[str, Any]:
        production = self.loop.baseline(self.loop.state())
        if self.options.canary_rule == "dv-gain":
            decision = canary_decision(
                self.arm(candidate),
                self.arm(production),
                seed=self.options.seed,
                min_sessions=self.options.canary_min_sessions,
            )
            decision["rule"] = "dv-gain"
        else:
            arms = [self._canary_sessions(arm) for arm in (candidate, production)]
            labels = self._labels([s.session_id for sessions in arms for s in sessions if s.ok])
            decision = gateway_canary_decision(
                canary_outcomes(arms[0], labels), canary_outcomes(arms[1], labels), self.options.canary_min_sessions
            )
            decision["topped_up"] = [
                len(a) - len(self.arm_sessions[(self.iteration, arm)])
                for a, arm in zip(arms, (candidate, production), strict=True)
            ]
        return {**decision, "production": production, "mode": "offline (simulated users per arm)"}

    def _canary_sessions(self, arm: str, rounds: int = 3) -> list[Any]:
        """``arm``'s simulated sessions for the gateway rule's canary: this iteration's users on it, topped up with
        new users while fewer than the planned ``canary_min_sessions`` were rated (a failed session), as the
        gateway's canary waits for more participants; at most ``rounds`` top-ups."""
        self.arm(arm)
        sessions = list(self.arm_sessions[(self.iteration, arm)])
        for round_ in range(1, rounds + 1):
            missing = self.options.canary_min_sessions - sum(1 for s in sessions if rated(s))
            if missing <= 0:
                break
            role = f"c{round_}{arm_role(arm)}"
            extra = self._users(missing, arm, role, _seed(self.options.seed, self.iteration, 3, round_))
            self.arm_errors += [f"canary top-up on {arm}: {e}" for o in extra for e in o.errors][:10]
            sessions += extra
        return sessions

    def _labels(self, session_ids: Sequence[str], timeout_s: float = 900.0) -> dict[str, dict[str, Any]]:
        """The labeler's labels of these sessions (``labeler.label_session``, made once and kept), by session id,
        waited for ``timeout_s`` in all; a session that cannot be labelled by then is left out, as the gateway leaves
        out a label it cannot read."""
        deadline = time.monotonic() + timeout_s
        recorded = self._wait_recorded(session_ids)
        results, labels = {}, {}
        for session_id in recorded:
            try:
                results[session_id] = self.stack.celery.send_task("labeler.label_session", args=[session_id])
            except Exception as exc:  # The broker down: no label outcomes at all.
                self.arm_errors.append(f"canary labels not asked for: {type(exc).__name__}: {exc}")
                return {}
        for session_id, result in results.items():
            try:
                labels[session_id] = dict(result.get(timeout=max(1.0, deadline - time.monotonic())))
            except Exception as exc:  # A session the labeler refuses (or an outage): no label outcomes for it.
                log.warning("study %s: session %s has no label for the canary: %s", self.run_id, session_id, exc)
                self.arm_errors.append(f"canary label of {session_id}: {type(exc).__name__}: {exc}")
        return labels

    def _wait_recorded(self, session_ids: Sequence[str], timeout_s: float = 180.0) -> list[str]:
        """The sessions chat has persisted (ended, recorded): they become eligible a moment after they end."""
        from emili_pipeline.loop_actions import eligible_session_ids

        wanted, deadline = set(session_ids), time.monotonic() + timeout_s
        while True:
            recorded = wanted & set(eligible_session_ids(self.stack.store, include_synthetic=True))
            if recorded == wanted or time.monotonic() > deadline:
                return sorted(recorded)
            time.sleep(2.0)

    # One iteration ---------------------------------------------------------------------------------------------------

    def _save_progress(self) -> None:
        """What a resumed study needs beyond the report: the sessions this condition recorded (the loop learns from
        them alone), an iteration interrupted after its collection and the offline canary's decisions (the loop's
        state says only that a canary settled)."""
        import json

        progress = {
            "run_id": self.run_id,
            "allowed": sorted(self.actions.allowed),
            "pending": self.pending,
            "canary_decisions": self.canary.decisions,
        }
        self.progress_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(progress, indent=1, default=str) + "\n")
        tmp.replace(self.progress_path)

    def restore(self, completed: Sequence[Mapping[str, Any]]) -> None:
        """Carry on a study stopped earlier: its finished iterations, its sessions, an iteration it was in the middle
        of (resumed after its collection, where the loop's saved state is), and its canary decisions."""
        import json

        if not self.progress_path.is_file():
            raise StudyResumeError(f"{self.progress_path} is missing: this folder holds no resumable study")
        progress = json.loads(self.progress_path.read_text())
        if progress.get("run_id") != self.run_id:
            raise StudyResumeError(f"{self.progress_path} belongs to run {progress.get('run_id')}, not {self.run_id}")
        self.actions.allowed = set(progress.get("allowed") or [])
        self.canary.decisions = dict(progress.get("canary_decisions") or {})
        self.iteration = len(completed)
        self.pending = progress.get("pending")
        if self.pending is not None and int(self.pending["iteration"]) <= len(completed):
            self.pending = None  # Stopped after its record was written: that iteration is finished.
        state = self.loop.state()
        # The loop's history only grows: fewer events than the report and progress saw means another (or no) state.
        seen = max(
            sum(len(r.get("loop_events") or []) for r in completed), int((self.pending or {}).get("history_from", 0))
        )
        production = completed[-1].get("production_after") if completed else None
        if len(state.history) < seen:
            raise StudyResumeError(
                f"the {self.condition} loop's saved state is gone from the object store (a make clean?): "
                "this study's sessions and candidates cannot be carried on; start a new one"
            )
        if production and self.loop.baseline(state) != production:
            raise StudyResumeError(
                f"the {self.condition} loop serves {self.loop.baseline(state)}, but the report's last iteration "
                f"left {production}: the report and the stack's state disagree"
            )

    def _collect(self) -> dict[str, Any]:
        """Simulated users talk to the production arm; their recorded sessions join the ones the loop may use."""
        from emili_pipeline.simulator import summarize

        started = time.perf_counter()
        production = self.loop.baseline(self.loop.state())
        record: dict[str, Any] = {"iteration": self.iteration, "production_before": production, "errors": []}
        outcomes = self._users(
            self.options.sessions, production, "collect", _seed(self.options.seed, self.iteration, 1), collection=True
        )
        summary = summarize(outcomes, time.perf_counter() - started)
        record["collected"] = {k: summary[k] for k in ("ok", "failed", "wall_s", "mean_valence_change")}
        record["errors"] += summary["errors"][:10]
        recorded = self._wait_recorded([o.session_id for o in outcomes if o.ok])
        record["collected"]["session_ids"] = recorded
        self.actions.allowed |= set(recorded)
        record["history_from"] = len(self.loop.state().history)
        record["collect_s"] = round(time.perf_counter() - started, 1)
        return record

    def run_iteration(self) -> dict[str, Any]:
        from emili_core.errors import NotFound
        from emili_core.objectstore import Bucket
        from emili_session.loop_records import gate_key

        started, resumed = time.perf_counter(), self.pending is not None
        if self.pending is None:
            self.iteration += 1
            self.pending = self._collect()
            self._save_progress()
        else:
            self.iteration = int(self.pending["iteration"])
            log.info(
                "study %s: %s iteration %d resumed after its collection", self.run_id, self.condition, self.iteration
            )
        record = dict(self.pending)
        history_from = int(record.pop("history_from"))
        collect_s = float(record.pop("collect_s", 0.0))
        record["resumed"] = resumed
        deadline = time.monotonic() + self.options.iteration_timeout_s
        from emili_pipeline.loop import NO_CANARY, NO_CANDIDATE

        settled = {"gate failed", NO_CANARY, "pipeline failed", NO_CANDIDATE}
        settled |= {"canary promoted", "canary rolled back", "canary refused"}
        events: list[dict[str, Any]] = []
        while True:
            state = self.loop.tick()
            assert state is not None  # The study's lease is always taken.
            events = state.history[history_from:]
            if state.phase == "idle" and (any(e["event"] in settled for e in events) or not events):
                break
            if time.monotonic() > deadline:
                # Going on would count this iteration's outcome as the next one's; it stays pending instead.
                raise LoopNotSettled(
                    f"{self.condition} iteration {self.iteration}: the loop did not settle within "
                    f"{self.options.iteration_timeout_s:.0f} s (last: {events[-1]['event'] if events else 'nothing'}"
                    "); this condition stopped there. Run the same command with --resume (and a longer "
                    "--iteration-timeout) to wait for it."
                )
            time.sleep(self.options.poll_s)
        state = self.loop.state()
        started_event = next((e for e in events if e["event"] == "enough new sessions"), {})
        record["sessions_used"] = started_event.get("sessions", 0)
        record["new_sessions"] = started_event.get("new_sessions", 0)
        record["loop_events"] = [e["event"] for e in events]
        record["loop_outcome"] = events[-1]["event"] if events else "not enough new sessions"
        record["pipeline_id"] = state.pipeline_id if events else None
        candidate = state.candidate if any(e["event"] == "candidate trained" for e in events) else None
        record["candidate"] = candidate
        production = record["production_before"]
        if candidate is not None:
            try:
                gate = self.loop.store.get_json(Bucket.MODELS, gate_key(candidate))
                record["gate"] = {"passed": gate.get("passed"), "policy": gate.get("policy"), "checks": gate["checks"]}
            except NotFound:
                record["gate"] = {}
            decision = self.canary.decisions.get(candidate)
            record["canary"] = decision or {"outcome": None, "reason": "not run: the gate did not pass"}
            base, cand = self.arm("base"), self.arm(candidate)
            users = {a: self.arm_users[(self.iteration, a)] for a in ("base", candidate)}
            record["evaluation"] = {
                "arms": {"base": arm_intervals(base), "candidate": arm_intervals(cand)},
                "candidate_vs_base": compare_arms(cand, base, self.options.seed, (users[candidate], users["base"])),
                # Per-session values and their users, so iterations can be pooled (see pooled_comparison).
                "items": {"base": base, "candidate": cand},
                "users": {"base": users["base"], "candidate": users[candidate]},
            }
            if production != "base":
                other = self.arm(production)
                record["evaluation"]["candidate_vs_production"] = compare_arms(
                    cand, other, self.options.seed, (users[candidate], self.arm_users[(self.iteration, production)])
                )
            record["training_signal"] = self._training_signal(state.pipeline_id)
            record["gate_replies"] = self._gate_replies(state.pipeline_id, candidate, production)
        record["errors"] += self.arm_errors
        self.arm_errors = []
        record["production_after"] = self.loop.baseline(state)
        # A resumed iteration: its collection's time plus this run's (the time between the two runs is left out).
        record["wall_s"] = round((collect_s if resumed else 0.0) + time.perf_counter() - started, 1)
        return record

    def _training_signal(self, pipeline_id: str | None) -> dict[str, Any]:
        """The hidden quality of the pipeline's datasets (:mod:`emili_pipeline.study_signal`); {} when unreadable."""
        from emili_core.errors import EmiliError
        from emili_core.keys import pipeline_state_key
        from emili_core.objectstore import Bucket
        from emili_pipeline.study_signal import training_signal

        if pipeline_id is None:
            return {}
        try:
            state = self.stack.store.get_json(Bucket.MODELS, pipeline_state_key(pipeline_id))
            datasets = ((state.get("steps") or {}).get("datasets") or {}).get("outputs") or {}
            return training_signal(self.stack.store, datasets, seed=self.options.seed)
        except EmiliError as exc:
            log.warning("study %s: no training signal for %s: %s", self.run_id, pipeline_id, exc)
            return {}

    def _gate_replies(self, pipeline_id: str | None, candidate: str, production: str) -> dict[str, Any]:
        """The hidden quality of the replies the gate judged (:mod:`emili_pipeline.study_gate_replies`); {} when
        unreadable."""
        from emili_core.errors import EmiliError
        from emili_pipeline.study_gate_replies import gate_replies

        if pipeline_id is None:
            return {}
        try:
            return gate_replies(self.stack.store, pipeline_id, candidate, production, self.options.seed)
        except (EmiliError, ValueError) as exc:
            log.warning("study %s: no gate replies for %s: %s", self.run_id, pipeline_id, exc)
            return {}

    def finish_iteration(self) -> None:
        """After the report holds the iteration's record: nothing of it is left to resume."""
        self.pending = None
        self._save_progress()


def arm_intervals(items: Mapping[str, Sequence[float]]) -> dict[str, dict[str, Any]]:
    """One arm's interval per metric."""
    return {m: interval(items.get(m, [])) for m in METRICS}


# What a resumed study must share with the report it carries on (the number of iterations may grow).
RESUME_MUST_MATCH: tuple[str, ...] = ("sessions_per_iteration", "eval_users_per_arm", "canary_min_sessions", "seed")
RESUME_MUST_MATCH += ("conditions", "pipeline", "gate", "config_sha256", "noise_faces")
RESUME_DEFAULTS = {"noise_faces": "everywhere"}  # Of options added since: a report from before them had the default.


class LoopNotSettled(RuntimeError):
    """An iteration's loop did not settle in time: the iteration stays pending for a resumed study."""


class StudyResumeError(ValueError):
    """The study in the output folder cannot be carried on with these options (the message says why)."""


def _canary_decided(options: StudyOptions, results: Mapping[str, Sequence[Mapping[str, Any]]]) -> bool:
    """Whether the study in ``options.out`` has decided a canary (in a finished iteration or an interrupted one)."""
    if any((it.get("canary") or {}).get("outcome") for its in results.values() for it in its):
        return True
    for condition in options.conditions:
        path = options.out / condition / "progress.json"
        try:
            if path.is_file() and json.loads(path.read_text()).get("canary_decisions"):
                return True
        except (json.JSONDecodeError, AttributeError) as exc:
            raise StudyResumeError(f"{path} cannot be read ({exc}): this folder holds no resumable study") from exc
    return False


def _previous(options: StudyOptions) -> tuple[StudyOptions, str, dict[str, list[dict[str, Any]]], float]:
    """The study in ``options.out``, checked against ``options``: the options it goes on with (its canary rule unless
    another is asked for before any canary was decided), its run id, finished iterations and wall time."""
    path = options.out / "study.json"
    if not path.is_file():
        raise StudyResumeError(f"nothing to resume: {path} does not exist (start the study without --resume)")
    report = json.loads(path.read_text())
    before = RESUME_DEFAULTS | (report.get("options") or {})
    recorded = cast(CanaryRuleName, before.get("canary_rule") or EARLIER_CANARY_RULE)
    now = options.to_json()
    if before.get("config_sha256") == byte_config_digest(options.pipeline, options.gate):
        before["config_sha256"] = now["config_sha256"]
    changed = [f"{k} was {before.get(k)!r}, now {now[k]!r}" for k in RESUME_MUST_MATCH if before.get(k) != now[k]]
    if changed:
        raise StudyResumeError(f"{path} was run with other options ({'; '.join(changed)}): resume with the same ones")
    results: dict[str, list[dict[str, Any]]] = {
        c: list(report.get("conditions", {}).get(c) or []) for c in options.conditions
    }
    rule = options.canary_rule or recorded
    if rule != recorded and _canary_decided(options, results):
        # One study, one rule: a promotion under one rule would change what later candidates are compared with.
        raise StudyResumeError(
            f"{path} decided canaries with the {recorded} rule: resume with --canary-rule {recorded}"
        )
    return replace(options, canary_rule=rule), str(before["run_id"]), results, float(report.get("wall_s") or 0.0)


def run_study(
    stack: Stack,
    options: StudyOptions,
    on_iteration: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Every condition's iterations, interleaved (iteration 1 of each condition, then 2, ...) so a study stopped
    early has the same number of iterations per condition (a resumed one first evens out);
    the report is rewritten after each iteration.

    ``resume``: carry on the study in ``options.out`` (same options; more iterations allowed) until every condition
    has ``options.iterations``; its loop state, sessions and candidates are the object store's, so the local stack
    must still hold them (``make clean`` removes them)."""
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in options.conditions}
    run_id, wall_before = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), 0.0
    if resume:
        options, run_id, results, wall_before = _previous(options)
    else:
        options = replace(options, canary_rule=options.canary_rule or "gateway")
    started = time.perf_counter()
    runs = {c: ConditionRun(stack, options, c, run_id) for c in options.conditions}
    for condition, run in runs.items():
        if resume:
            run.restore(results[condition])
        else:
            run._save_progress()

    def report_now() -> dict[str, Any]:
        return build_report(
            {**options.to_json(), "run_id": run_id}, results, wall_before + time.perf_counter() - started
        )

    report = report_now()
    order = list(runs)

    stopped: dict[str, str] = {}  # Conditions whose loop did not settle: why.

    def waiting() -> list[Condition]:
        return [c for c in order if len(results[c]) < options.iterations and c not in stopped]

    def next_condition() -> Condition:
        """An iteration stopped after its collection first (its pipeline may be running), then the condition with
        the fewest iterations: a study resumed after an uneven stop evens out before it goes further."""
        return min(waiting(), key=lambda c: (runs[c].pending is None, len(results[c]), order.index(c)))

    while waiting():
        condition = next_condition()
        run = runs[condition]
        log.info("study %s: %s iteration %d", run_id, condition, len(results[condition]) + 1)
        try:
            record = run.run_iteration()
        except LoopNotSettled as exc:  # Not a result: the iteration is resumed later, where it stopped.
            log.error("study %s: %s", run_id, exc)
            stopped[condition] = str(exc)
            continue
        except Exception as exc:  # One broken iteration is reported, the others still run.
            log.exception("study %s: %s iteration failed", run_id, condition)
            record = {"iteration": run.iteration, "errors": [f"{type(exc).__name__}: {exc}"], "wall_s": 0.0}
        record["condition"] = condition
        results[condition].append(record)
        report = report_now()
        write_report(report, options.out)
        run.finish_iteration()
        if on_iteration is not None:
            on_iteration(record)
    if stopped:
        report = {**report_now(), "stopped": stopped}
    write_report(report, options.out)
    return report
