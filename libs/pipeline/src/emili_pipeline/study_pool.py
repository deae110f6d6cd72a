"""Loop simulation studies pooled across runs (``emili study pool``): does the loop's candidate beat base, run after
run, and does feedback's beat noise's?

One study's intervals cover its simulated users only: the candidate each iteration trained is one draw of what the
loop trains from that many sessions, and on a 2-core CPU those draws differ a lot from run to run (BENCHMARKS.md,
runs Q to S). Here each run (a seed) gives one estimate per comparison, the mean of its users' paired differences,
and the runs are pooled by random effects, so the interval covers what another run of the loop would train too.

Iterations are pooled separately: a run's second candidate learned from its first's sessions and is compared with
the same production arm, so a run's iterations are not independent draws; runs with different seeds are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emili_affect.stats import random_effects_mean

POOLED_METRICS = ("delta_v", "rating", "reply_quality", "reply_words")
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
        run = runs.setdefault(int(options.get("seed", 0)), Run(int(options.get("seed", 0)), options))
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
    return sorted(runs.values(), key=lambda r: r.seed)


def _by_user(iteration: Mapping[str, Any], arm: str, metric: str) -> dict[Any, float]:
    evaluation = iteration.get("evaluation") or {}
    values = ((evaluation.get("items") or {}).get(arm) or {}).get(metric) or []
    users = ((evaluation.get("users") or {}).get(arm) or {}).get(metric) or []
    return {u: float(v) for u, v in zip(users, values, strict=False) if v is not None and math.isfinite(float(v))}


def _paired(first: Mapping[Any, float], second: Mapping[Any, float]) -> np.ndarray:
    """first - second for each simulated user who met both (the same seed, so the same person and opening)."""
    return np.array([first[u] - second[u] for u in first if u in second], dtype=np.float64)


def _differences(run: Run, iteration: int, metric: str) -> dict[str, np.ndarray]:
    """Each comparison's per-user differences in one run's iteration (those the run recorded)."""
    at = {c: its[iteration - 1] for c, its in run.conditions.items() if len(its) >= iteration}
    out = {
        f"{c} candidate - base": _paired(_by_user(it, "candidate", metric), _by_user(it, "base", metric))
        for c, it in at.items()
    }
    if "feedback" in at and "noise" in at:
        # Both conditions' candidates met the same users: the study's seed and iteration choose them, not the condition.
        out[FEEDBACK_AGAINST_NOISE] = _paired(
            _by_user(at["feedback"], "candidate", metric), _by_user(at["noise"], "candidate", metric)
        )
    return out


def _run_estimate(seed: int, diffs: np.ndarray) -> dict[str, Any]:
    """One run's mean difference and the variance of that mean; left out of the pooling (saying why) when its
    users cannot tell how precise it is."""
    estimate: dict[str, Any] = {"seed": seed, "n": len(diffs), "mean": None, "variance": None, "left_out": None}
    if len(diffs) < 2:
        estimate["left_out"] = f"{len(diffs)} user(s) met both arms"
        return estimate
    estimate["mean"], variance = float(diffs.mean()), float(diffs.var(ddof=1)) / len(diffs)
    # Rounding leaves a spread of about 1e-17 where every user's difference is the same.
    if math.sqrt(variance) > 1e-9 * max(1.0, abs(estimate["mean"])):
        estimate["variance"] = variance
    else:
        estimate["left_out"] = "every user's difference is the same: no spread to weigh it by"
    return estimate


def _pooled(estimates: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    pooled = random_effects_mean([e["mean"] for e in estimates], [e["variance"] for e in estimates])
    return {
        "mean": pooled.mean,
        "ci95": list(pooled.ci95),
        "runs": pooled.runs,
        "between_runs_sd": None if math.isnan(pooled.between_runs_sd) else pooled.between_runs_sd,
    }


def pool_runs(runs: Sequence[Run], metrics: Sequence[str] = POOLED_METRICS) -> dict[str, Any]:
    """Per comparison, iteration and metric: each run's mean paired difference and the runs pooled."""
    rows: list[dict[str, Any]] = []
    deepest = max(len(its) for run in runs for its in run.conditions.values())
    for iteration in range(1, deepest + 1):
        for metric in metrics:
            per_comparison: dict[str, list[dict[str, Any]]] = {}
            for run in runs:
                for comparison, diffs in _differences(run, iteration, metric).items():
                    per_comparison.setdefault(comparison, []).append(_run_estimate(run.seed, diffs))
            for comparison, estimates in sorted(per_comparison.items()):
                weighed = [e for e in estimates if e["left_out"] is None]
                rows.append(
                    {
                        "comparison": comparison,
                        "iteration": iteration,
                        "metric": metric,
                        "runs": estimates,
                        "pooled": _pooled(weighed) if weighed else None,
                    }
                )
    return {
        "title": "Loop simulation studies pooled across runs (SYNTHETIC: simulated users)",
        "synthetic": True,
        "note": (
            "SIMULATED users (emili_pipeline.simulator): each run is one seed's `emili study simulate`; its estimate "
            "is the mean of its users' paired differences; runs pooled by random effects (DerSimonian-Laird, "
            "Hartung-Knapp interval on runs - 1 degrees of freedom), so the interval covers what another run of the "
            "loop would train. These numbers say whether the loop's machinery works as designed, nothing about people."
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


def _run_cell(estimate: Mapping[str, Any]) -> str:
    mean = "–" if estimate["mean"] is None else _signed(estimate["mean"])
    why = f", left out: {estimate['left_out']}" if estimate["left_out"] else ""
    return f"{estimate['seed']}: {mean} ({estimate['n']}{why})"


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
        "A config digest that differs between runs can be a changed gate or comment: pool only runs whose pipeline",
        "and recipes trained alike.",
        "",
        "| comparison | iteration | metric | runs | each run's mean difference (seed: mean, users) | pooled [95% CI] "
        "| between-run SD |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        each = "; ".join(_run_cell(e) for e in row["runs"])
        pooled = row["pooled"]
        if pooled is None:
            lines.append(f"| {row['comparison']} | {row['iteration']} | {row['metric']} | 0 | {each} | – | – |")
            continue
        low, high = pooled["ci95"]
        sd = "–" if pooled["between_runs_sd"] is None else f"{pooled['between_runs_sd']:.3f}"
        lines.append(
            f"| {row['comparison']} | {row['iteration']} | {row['metric']} | {pooled['runs']} | {each} "
            f"| {_signed(pooled['mean'])} [{_signed(low)}, {_signed(high)}] | {sd} |"
        )
    return "\n".join(lines) + "\n"
