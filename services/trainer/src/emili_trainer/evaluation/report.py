"""The evaluation report: the paper's Tables 1 and 2, reply metrics per arm and MMLU, as Markdown and PNG plots.

A report is a JSON-serialisable dict built by :func:`build_report` from a run's results::

    {
      "title": str,
      "ratings_table": {arm: {"n": int, "empathy"|"relevance"|"fluency": {"mean": float, "ci95": [lo, hi]}}},
      "delta_table": {"lexicon": str, "sessions": int,
                      "arms": {arm: {"n": int, "valence"|"arousal"|"dominance": {"mean", "ci95"}}}} | None,
      "reply_metrics": {arm: reply_metrics(...) dict},
      "perplexity": {arm: float},
      "mmlu": {arm: run_mmlu(...) dict} | {"skipped": str} | None,
    }

Table 1 holds the human ratings the chat API collects (Likert 1-5, per model arm, bootstrap 95% CIs);
Table 2 is the labeler's ``delta_table`` (mean Delta valence/arousal/dominance of the users' pre- and
post-chat texts per arm). Every part may be missing: the renderers say so instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emili_affect.stats import bootstrap_ci

__all__ = [
    "RATING_DIMENSIONS",
    "REPLY_METRIC_ROWS",
    "VAD_DIMENSIONS",
    "build_report",
    "ratings_table",
    "render_markdown",
    "render_plots",
]

RATING_DIMENSIONS = ("empathy", "relevance", "fluency")
VAD_DIMENSIONS = ("valence", "arousal", "dominance")
# (label, path into an arm's reply metrics, digits); "perplexity" comes from the report's perplexity part.
REPLY_METRIC_ROWS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("Replies (n)", ("n",), 0),
    ("BLEU", ("bleu",), 2),
    ("Reference perplexity", ("perplexity",), 2),
    ("Semantic similarity (MiniLM cosine)", ("semantic_similarity",), 3),
    ("Distinct-1", ("distinct_1",), 3),
    ("Distinct-2", ("distinct_2",), 3),
    ("Mean length (characters)", ("mean_length_chars",), 1),
    ("Mean length (words)", ("mean_length_words",), 1),
    ("Unique replies", ("unique_replies",), 0),
    ("Unique start words", ("unique_start_words",), 0),
    ("Unique templates (first 3 words)", ("unique_templates",), 0),
    ("NIDF specificity", ("nidf",), 3),
    ("Valence distance to context", ("vad_distance", "valence"), 3),
    ("Arousal distance to context", ("vad_distance", "arousal"), 3),
    ("Intensity distance to context", ("vad_distance", "intensity"), 3),
)
NO_RATINGS = "No ratings recorded."
NO_DELTAS = "No Delta VAD table (no labelled session with both surveys)."
NO_REPLY_METRICS = "No reply metrics."
NO_MMLU = "MMLU was not run."
NA = "n/a"


def ratings_table(records: Sequence[Mapping[str, Any]], samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Table 1: per model arm, n and the mean empathy, relevance and fluency with percentile-bootstrap 95% CIs.

    Records are ``{"model_arm": str, "empathy": int, "relevance": int, "fluency": int}`` with ratings 1-5;
    a malformed record raises ValueError naming its index. Same shape as the labeler's ``arm_table`` rows.
    """
    by_arm: dict[str, list[tuple[int, int, int]]] = {}
    for i, record in enumerate(records):
        arm = record.get("model_arm")
        if not isinstance(arm, str) or not arm:
            raise ValueError(f"rating {i}: model_arm must be a non-empty string, got {arm!r}")
        values = []
        for dim in RATING_DIMENSIONS:
            value = record.get(dim)
            # bool is an int subclass; True must not pass as a rating of 1.
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
                raise ValueError(f"rating {i}: {dim} must be an integer from 1 to 5, got {value!r}")
            values.append(value)
        by_arm.setdefault(arm, []).append((values[0], values[1], values[2]))
    table: dict[str, Any] = {}
    for arm, rows in sorted(by_arm.items()):
        row: dict[str, Any] = {"n": len(rows)}
        for j, dim in enumerate(RATING_DIMENSIONS):
            column = [float(r[j]) for r in rows]
            low, high = bootstrap_ci(column, samples, seed)
            row[dim] = {"mean": float(np.mean(column)), "ci95": [low, high]}
        table[arm] = row
    return table


def _delta_table(table: Any) -> dict[str, Any] | None:
    """The labeler's delta_table; a bare arm_table ({arm: row}) is wrapped into that form."""
    if not isinstance(table, Mapping) or not table:
        return None
    if "arms" in table:
        return dict(table)
    return {"lexicon": None, "sessions": sum(int(row.get("n", 0)) for row in table.values()), "arms": dict(table)}


def build_report(results: Mapping[str, Any], samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The report of a run's results: Table 1 computed from ``ratings`` records, the other parts passed on.

    ``results`` may hold ``title``, ``ratings`` (records, see :func:`ratings_table`) or an already computed
    ``ratings_table``, ``delta_table`` (the labeler's, or a bare ``arm_table``), ``reply_metrics``
    ({arm: metrics}), ``perplexity`` ({arm: float}) and ``mmlu``; a report is accepted too (building is
    idempotent).
    """
    if results.get("ratings") is not None:
        table1 = ratings_table(results["ratings"], samples, seed)
    else:
        table1 = dict(results.get("ratings_table") or {})
    return {
        "title": str(results.get("title") or "EMILI evaluation"),
        "ratings_table": table1,
        "delta_table": _delta_table(results.get("delta_table")),
        "reply_metrics": dict(results.get("reply_metrics") or {}),
        "perplexity": dict(results.get("perplexity") or {}),
        "mmlu": results.get("mmlu") or None,
    }


def _fmt(value: Any, digits: int) -> str:
    if isinstance(value, bool) or value is None:
        return NA
    if isinstance(value, int) and digits == 0:
        return str(value)
    if isinstance(value, int | float):
        return NA if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _cell(stat: Mapping[str, Any] | None, digits: int) -> str:
    """``mean [lo, hi]`` of a {"mean", "ci95"} cell."""
    if not stat:
        return NA
    low, high = (stat.get("ci95") or [None, None])[:2]
    return f"{_fmt(stat.get('mean'), digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _arms(report: Mapping[str, Any]) -> list[str]:
    """Arms with reply metrics or perplexity, in first-seen order (the caller puts the base model first)."""
    seen: dict[str, None] = {}
    for part in ("reply_metrics", "perplexity"):
        seen.update(dict.fromkeys(report.get(part) or {}))
    return list(seen)


def _metric(report: Mapping[str, Any], arm: str, path: tuple[str, ...]) -> Any:
    if path == ("perplexity",):
        return (report.get("perplexity") or {}).get(arm)
    value: Any = (report.get("reply_metrics") or {}).get(arm) or {}
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _mmlu_by_arm(mmlu: Any) -> tuple[str | None, dict[str, Any]]:
    """(a skip message for all arms, or None; per-arm results)."""
    if not isinstance(mmlu, Mapping):
        return None, {}
    if "skipped" in mmlu:
        return str(mmlu["skipped"]), {}
    return None, dict(mmlu)


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: Table 1, Table 2, reply metrics side by side per arm, MMLU."""
    lines = [f"# {report.get('title') or 'EMILI evaluation'}", ""]

    lines += ["## Table 1: human ratings (Likert 1-5, mean [bootstrap 95% CI])", ""]
    table1 = report.get("ratings_table") or {}
    if table1:
        header = ["Arm", "n", *(d.capitalize() for d in RATING_DIMENSIONS)]
        rows = [
            [arm, str(row.get("n", NA)), *(_cell(row.get(d), 2) for d in RATING_DIMENSIONS)]
            for arm, row in table1.items()
        ]
        lines += _table(header, rows)
    else:
        lines.append(NO_RATINGS)
    lines.append("")

    lines += ["## Table 2: change in VAD of the user's texts, post-chat minus pre-chat (mean [bootstrap 95% CI])", ""]
    delta = report.get("delta_table") or {}
    arms2 = delta.get("arms") or {}
    if arms2:
        lines += [f"Lexicon: {delta.get('lexicon', NA)}; sessions: {delta.get('sessions', NA)}.", ""]
        header = ["Arm", "n", *(f"Delta {d}" for d in VAD_DIMENSIONS)]
        rows = [
            [arm, str(row.get("n", NA)), *(_cell(row.get(d), 3) for d in VAD_DIMENSIONS)] for arm, row in arms2.items()
        ]
        lines += _table(header, rows)
    else:
        lines.append(NO_DELTAS)
    lines.append("")

    lines += ["## Reply metrics", ""]
    arms = _arms(report)
    if arms:
        rows = [
            [label, *(_fmt(_metric(report, arm, path), digits) for arm in arms)]
            for label, path, digits in REPLY_METRIC_ROWS
        ]
        lines += _table(["Metric", *arms], rows)
        skipped = {arm: _metric(report, arm, ("vad_distance", "pairs_skipped")) for arm in arms}
        if any(skipped.values()):
            counts = ", ".join(f"{arm}: {n}" for arm, n in skipped.items() if n)
            lines += ["", f"VAD distances skip pairs where either side has no lexicon word ({counts})."]
    else:
        lines.append(NO_REPLY_METRICS)
    lines.append("")

    lines += ["## MMLU (5-shot accuracy, lm-evaluation-harness)", ""]
    skip, by_arm = _mmlu_by_arm(report.get("mmlu"))
    if skip is not None:
        lines.append(f"Skipped: {skip}.")
    elif by_arm:
        rows = []
        for arm, result in by_arm.items():
            if isinstance(result, Mapping) and "skipped" in result:
                rows.append([arm, f"skipped: {result['skipped']}", NA, NA])
            else:
                result = result if isinstance(result, Mapping) else {}
                rows.append(
                    [
                        arm,
                        _fmt(result.get("acc"), 3),
                        _fmt(result.get("acc_stderr"), 3),
                        _fmt(result.get("n_subjects"), 0),
                    ]
                )
        lines += _table(["Arm", "Accuracy", "Std. error", "Subjects"], rows)
    else:
        lines.append(NO_MMLU)
    lines.append("")
    return "\n".join(lines)


def _errors(stats: Sequence[Mapping[str, Any]]) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Asymmetric error bars (2, n) from {"mean", "ci95"} cells; a missing or NaN bound draws no bar."""
    out = np.zeros((2, len(stats)))
    for i, stat in enumerate(stats):
        mean = float(stat.get("mean") or 0.0)
        low, high = (stat.get("ci95") or [mean, mean])[:2]
        low = mean if low is None or math.isnan(low) else float(low)
        high = mean if high is None or math.isnan(high) else float(high)
        out[:, i] = (max(mean - low, 0.0), max(high - mean, 0.0))
    return out


def _grouped_bars(
    table: Mapping[str, Mapping[str, Any]], dims: Sequence[str], title: str, ylabel: str, path: Path, ylim: Any
) -> Path:
    from matplotlib.figure import Figure

    # A Figure without pyplot draws with Agg and touches no global backend state.
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    arms = list(table)
    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(dims))
    for i, arm in enumerate(arms):
        stats = [table[arm].get(d) or {} for d in dims]
        means = [float(s.get("mean") or 0.0) for s in stats]
        ax.bar(
            x + (i - (len(arms) - 1) / 2) * width,
            means,
            width,
            yerr=_errors(stats),
            capsize=4,
            label=f"{arm} (n={table[arm].get('n', '?')})",
        )
    ax.set_xticks(x, [d.capitalize() for d in dims])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.axhline(0.0, color="black", linewidth=0.8)
    # Below the axes: bars reach the top of the rating scale.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(len(arms), 3), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def _reply_metric_plot(report: Mapping[str, Any], path: Path) -> Path | None:
    from matplotlib.figure import Figure

    arms = _arms(report)
    panels = []
    for label, metric_path, _ in REPLY_METRIC_ROWS:
        values = [_metric(report, arm, metric_path) for arm in arms]
        numbers = [float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan for v in values]
        if metric_path != ("n",) and not all(math.isnan(v) for v in numbers):
            panels.append((label, numbers))
    if not panels:
        return None
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(3.2 * columns, 2.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    colours = [f"C{i % 10}" for i in range(len(arms))]
    for ax, (label, numbers) in zip(axes, panels, strict=False):
        # Metrics differ in scale (BLEU 0-100, Distinct 0-1): one panel each.
        ax.bar(range(len(arms)), [0.0 if math.isnan(v) else v for v in numbers], color=colours)
        ax.set_xticks(range(len(arms)), arms, fontsize=8)
        ax.set_title(label, fontsize=9)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Reply metrics per arm")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def render_plots(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """PNG bar charts of the parts present: table1.png and table2.png (with CI error bars), reply_metrics.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    table1 = report.get("ratings_table") or {}
    if table1:
        written.append(
            _grouped_bars(
                table1,
                RATING_DIMENSIONS,
                "Table 1: human ratings (95% CI)",
                "Mean rating (1-5)",
                out_dir / "table1.png",
                (0, 5.5),
            )
        )
    arms2 = (report.get("delta_table") or {}).get("arms") or {}
    if arms2:
        written.append(
            _grouped_bars(
                arms2,
                VAD_DIMENSIONS,
                "Table 2: Delta VAD, post - pre (95% CI)",
                "Mean change",
                out_dir / "table2.png",
                None,
            )
        )
    metrics_plot = _reply_metric_plot(report, out_dir / "reply_metrics.png")
    if metrics_plot is not None:
        written.append(metrics_plot)
    return written
