"""Loop simulation studies pooled across runs (``emili study pool``): does the loop's candidate beat base, run after
run, and does feedback's beat noise's?

One study's intervals cover its simulated users only: the candidate each iteration trained is one draw of what the
loop trains from that many sessions, and on a 2-core CPU those draws differ a lot from run to run (BENCHMARKS.md,
runs Q to S). Here each run (a seed) gives one estimate per comparison, the mean of its users' paired differences,
and the runs are pooled by random effects: the interval is for the loop's average effect over runs, so it counts how
much runs differ, not only their users. With 2 runs it says little (t on 1 degree of freedom is 12.7).

Iterations are pooled separately: a run's second candidate learned from its first's sessions too, so a run's
iterations are not independent draws; runs with different seeds are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emili_affect.stats import random_effects_mean, variance_from_t_interval

# The step-3 users' (20 per arm in the studies so far) values, paired per user; and the hidden quality of the replies
# the gate's users heard (96 per arm), from its paired interval (`gate_replies` in the report).
POOLED_METRICS = ("delta_v", "rating", "reply_quality", "reply_words", "gate_quality")
GATE_QUALITY = "gate_quality"
# What makes runs draws of the same loop: the pipeline they trained with and the users that judged them.
POOL_MUST_MATCH = ("pipeline", "sessions_per_iteration", "eval_users_per_arm", "noise_faces")
FEEDBACK_AGAINST_NOISE = "feedback candidate - noise candidate"


class StudyPoolError(ValueError):
    """The studies cannot be pooled (the message says which and why)."""


@dataclass
class Run:
    """One seed's study: its conditions' iterations, from one report or its conditions' separate parts."""

    seed: int
    options: dict[str, Any]
    sources: list[str] = field(default_factory=list)
    conditions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    config_sha256: set[str] = field(default_factory=set)


def group_runs(reports: Mapping[str, Mapping[str, Any]]) -> list[Run]:
    """The reports by seed (parts of one study, e.g. ``--condition feedback`` and ``--condition noise`` run apart,
    become one run), checked to be runs of the same loop."""
    runs: dict[int, Run] = {}
    first: tuple[str, Mapping[str, Any]] | None = None
    for source, report in reports.items():
        options = dict(report.get("options") or {})
        # The pipeline by its file's name: the same file in another clone (its content is in config_sha256).
        options["pipeline"] = Path(str(options.get("pipeline"))).name
        if first is None:
            first = (source, options)
        changed = [
            f"{k} {options.get(k)!r} (in {first[0]}: {first[1].get(k)!r})"
            for k in POOL_MUST_MATCH
            if options.get(k) != first[1].get(k)
        ]
        if changed:
            raise StudyPoolError(f"{source} is not a run of the same loop: {'; '.join(changed)}")
        if not isinstance(options.get("seed"), int):
            raise StudyPoolError(f"{source}: its options name no seed (a report of `emili study simulate` has one)")
        run = runs.setdefault(options["seed"], Run(options["seed"], options))
        for condition, iterations in (report.get("conditions") or {}).items():
            if not iterations:
                continue
            if condition in run.conditions:
                raise StudyPoolError(
                    f"{source}: seed {run.seed}'s {condition} condition is also in {', '.join(run.sources)}; "
                    "give each run once (runs are told apart by their seed)"
                )
            run.conditions[condition] = list(iterations)
        run.sources.append(source)
        run.config_sha256.add(str(options.get("config_sha256")))
    if len(runs) < 2:
        raise StudyPoolError(f"pooling needs runs with at least 2 different seeds, got {sorted(runs)}")
    if not any(run.conditions for run in runs.values()):
        raise StudyPoolError("none of the studies has a finished iteration to pool")
    return sorted(runs.values(), key=lambda r: r.seed)


@dataclass
class Paired:
    """One comparison in one run's iteration: each simulated user's difference, how many users the first arm listed,
    and why the run cannot be weighed (None when it can)."""

    diffs: np.ndarray
    listed: int
    unusable: str | None = None


def _by_user(run: Run, iteration: Mapping[str, Any], arm: str, metric: str) -> dict[Any, float] | str:
    """A metric's value per simulated user in one arm, or why there is none."""
    evaluation = iteration.get("evaluation")
    if not evaluation:
        return "no candidate was evaluated in this iteration"
    values = ((evaluation.get("items") or {}).get(arm) or {}).get(metric)
    users = ((evaluation.get("users") or {}).get(arm) or {}).get(metric)
    if values is None:
        return f"the {arm} arm has no {metric}"
    if users is None:
        return "the report did not record its users (written before studies paired them)"
    if len(users) != len(values) or len(set(users)) != len(users):
        raise StudyPoolError(
            f"seed {run.seed} ({', '.join(run.sources)}), iteration {iteration.get('iteration')}: the {arm} arm's "
            f"{metric} lists {len(values)} values for {len(users)} users ({len(set(users))} different): "
            "a damaged report"
        )
    return {u: float(v) for u, v in zip(users, values, strict=True) if v is not None and math.isfinite(float(v))}


def _paired(first: dict[Any, float] | str, second: dict[Any, float] | str) -> Paired:
    """first - second for each simulated user who met both (the same seed, so the same person and opening)."""
    if isinstance(first, str):
        return Paired(np.empty(0), 0, first)
    if isinstance(second, str):
        return Paired(np.empty(0), 0, second)
    diffs = np.array([first[u] - second[u] for u in first if u in second], dtype=np.float64)
    if len(diffs) < 2:
        return Paired(diffs, len(first), f"{len(diffs)} user(s) met both arms")
    # Rounding leaves a spread of about 1e-17 where every user's difference is the same.
    if float(diffs.std(ddof=1)) <= 1e-9 * max(1.0, abs(float(diffs.mean()))):
        return Paired(diffs, len(first), "every user's difference is the same: no spread to weigh it by")
    return Paired(diffs, len(first))


def _at(run: Run, iteration: int) -> dict[str, Mapping[str, Any]]:
    return {
        c: it for c, its in run.conditions.items() for n, it in enumerate(its, 1) if it.get("iteration", n) == iteration
    }


def _gate_quality(run: Run, iteration: int) -> dict[str, dict[str, Any]]:
    """Each condition's candidate against base as its gate's users heard it: the paired difference in hidden reply
    quality, its variance read back from the recorded t-widened 95% interval (half-width / t on n - 1)."""
    out = {}
    for condition, it in _at(run, iteration).items():
        replies = it.get("gate_replies") or {}
        paired = (replies.get("quality") or {}).get("paired")
        estimate: dict[str, Any] = {"seed": run.seed, "n": 0, "listed": 0, "mean": None, "variance": None}
        if not paired or not paired.get("ci95") or int(paired.get("n_pairs") or 0) < 2:
            estimate["left_out"] = "no gate replies recorded (`emili study gate-replies` adds them)"
        elif replies.get("production_version") != "base":
            estimate["left_out"] = f"its gate compared it with {replies.get('production_version')}, not base"
        else:
            n, (low, high) = int(paired["n_pairs"]), paired["ci95"]
            estimate |= {"n": n, "listed": n, "mean": float(paired["difference"]), "left_out": None}
            estimate["variance"] = variance_from_t_interval(float(low), float(high), n)
            if not estimate["variance"] > 0:
                estimate["left_out"], estimate["variance"] = "its interval has no width: no spread to weigh it by", None
        out[f"{condition} candidate - base"] = estimate
    return out


def _differences(run: Run, iteration: int, metric: str) -> dict[str, Paired]:
    """Each comparison's per-user differences in one run's iteration (those the run recorded)."""
    at = _at(run, iteration)
    out = {
        f"{c} candidate - base": _paired(_by_user(run, it, "candidate", metric), _by_user(run, it, "base", metric))
        for c, it in at.items()
    }
    if "feedback" in at and "noise" in at:
        # Both conditions' candidates met the same users: the study's seed and iteration choose them, not the condition.
        out[FEEDBACK_AGAINST_NOISE] = _paired(
            _by_user(run, at["feedback"], "candidate", metric), _by_user(run, at["noise"], "candidate", metric)
        )
    return out


def _run_estimate(seed: int, paired: Paired) -> dict[str, Any]:
    """One run's mean difference and the variance of that mean, or why it is left out of the pooling."""
    n = len(paired.diffs)
    estimate: dict[str, Any] = {"seed": seed, "n": n, "listed": paired.listed, "left_out": paired.unusable}
    estimate["mean"] = float(paired.diffs.mean()) if n else None
    estimate["variance"] = float(paired.diffs.var(ddof=1)) / n if paired.unusable is None else None
    return estimate


def _pooled(estimates: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The runs pooled; fewer than 2 are not (one run's interval covers its users only: nothing across runs)."""
    if len(estimates) < 2:
        return {"runs": len(estimates), "mean": None, "ci95": None, "between_runs_sd": None}
    pooled = random_effects_mean([e["mean"] for e in estimates], [e["variance"] for e in estimates])
    return {
        "mean": pooled.mean,
        "ci95": list(pooled.ci95),
        "runs": pooled.runs,
        "between_runs_sd": pooled.between_runs_sd,
    }


def pool_runs(runs: Sequence[Run], metrics: Sequence[str] = POOLED_METRICS) -> dict[str, Any]:
    """Per comparison, iteration and metric: each run's mean paired difference and the runs pooled."""
    rows: list[dict[str, Any]] = []
    iterations = sorted(
        {it.get("iteration", n) for run in runs for its in run.conditions.values() for n, it in enumerate(its, 1)}
    )
    for iteration in iterations:
        for metric in metrics:
            per_comparison: dict[str, list[dict[str, Any]]] = {}
            for run in runs:
                if metric == GATE_QUALITY:
                    for comparison, estimate in _gate_quality(run, iteration).items():
                        per_comparison.setdefault(comparison, []).append(estimate)
                    continue
                for comparison, paired in _differences(run, iteration, metric).items():
                    per_comparison.setdefault(comparison, []).append(_run_estimate(run.seed, paired))
            used = sorted(
                {int(it.get("sessions_used") or 0) for run in runs for it in _at(run, iteration).values()} - {0}
            )
            for comparison, estimates in sorted(per_comparison.items()):
                weighed = [e for e in estimates if e["left_out"] is None]
                rows.append(
                    {
                        "comparison": comparison,
                        "iteration": iteration,
                        "sessions_used": used,  # What the candidates of this iteration trained on, per run.
                        "metric": metric,
                        "runs": estimates,
                        "pooled": _pooled(weighed),
                    }
                )
    return {
        "title": "Loop simulation studies pooled across runs (SYNTHETIC: simulated users)",
        "synthetic": True,
        "note": (
            "SIMULATED users (emili_pipeline.simulator): each run is one seed's `emili study simulate`; its estimate "
            "is the mean of its users' paired differences; runs pooled by random effects (DerSimonian-Laird, "
            "Hartung-Knapp interval on runs - 1 degrees of freedom): the interval is for the loop's average effect "
            "over runs, so it counts how much runs differ, not only their users. These numbers say whether the loop's "
            "machinery works as designed, nothing about people."
        ),
        "runs": [
            {
                "seed": run.seed,
                "sources": run.sources,
                "iterations": {c: len(its) for c, its in sorted(run.conditions.items())},
                "config_sha256": sorted(run.config_sha256),
            }
            for run in runs
        ],
        "options": {k: runs[0].options.get(k) for k in POOL_MUST_MATCH},
        "rows": rows,
    }


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _iteration_cell(row: Mapping[str, Any]) -> str:
    used = "/".join(str(n) for n in row.get("sessions_used") or [])
    return f"{row['iteration']} ({used})" if used else str(row["iteration"])


def _run_cell(estimate: Mapping[str, Any]) -> str:
    mean = "–" if estimate["mean"] is None else _signed(estimate["mean"])
    users = f"{estimate['n']}" if estimate["n"] == estimate["listed"] else f"{estimate['n']} of {estimate['listed']}"
    why = f", left out: {estimate['left_out']}" if estimate["left_out"] else ""
    return f"{estimate['seed']}: {mean} ({users}{why})"


def render_pool(report: Mapping[str, Any]) -> str:
    lines = [f"# {report['title']}", "", f"**{report['note']}**", ""]
    options = ", ".join(f"{k}={v}" for k, v in report["options"].items())
    lines += [f"Runs of the same loop ({options}):", ""]
    for run in report["runs"]:
        iterations = ", ".join(f"{c} {n}" for c, n in run["iterations"].items())
        lines.append(
            f"- seed {run['seed']}: {iterations} iteration(s); {', '.join(run['sources'])} "
            f"(config {', '.join(run['config_sha256'])})"
        )
    lines += [
        "",
        "Differences are the first named minus the second, per simulated user who met both (same seed, same person).",
        "delta_v, rating, reply_quality (hidden) and reply_words: the users each iteration met after its loop settled;",
        "gate_quality: the hidden quality of the replies the gate's own users heard, its variance read back from the",
        "report's paired interval (runs whose gate compared the candidate with another production arm left out).",
        "A config digest that differs between runs can be a changed gate (or, in reports from before the digest",
        "parsed the files, a comment): pool only runs whose pipeline and recipes trained alike.",
        "",
        "| comparison | iteration (sessions trained on) | metric | runs | each run's mean difference (seed: mean, "
        "users paired) | pooled [95% CI] | between-run SD |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        each = "; ".join(_run_cell(e) for e in row["runs"])
        pooled = row["pooled"]
        if pooled["mean"] is None:
            lines.append(
                f"| {row['comparison']} | {_iteration_cell(row)} | {row['metric']} | {pooled['runs']} | {each} "
                "| not pooled: fewer than 2 runs | – |"
            )
            continue
        low, high = pooled["ci95"]
        sd = "–" if pooled["between_runs_sd"] is None else f"{pooled['between_runs_sd']:.3f}"
        lines.append(
            f"| {row['comparison']} | {_iteration_cell(row)} | {row['metric']} | {pooled['runs']} | {each} "
            f"| {_signed(pooled['mean'])} [{_signed(low)}, {_signed(high)}] | {sd} |"
        )
    return "\n".join(lines) + "\n"
