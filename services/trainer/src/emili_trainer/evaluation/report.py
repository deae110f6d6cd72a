"""The evaluation report: the paper's Tables 1 and 2, reply metrics per arm and MMLU, as Markdown and PNG plots.

A report is a JSON-serialisable dict built by :func:`build_report` from a run's results::

    {
      "title": str,
      "ratings_table": {row: {"arm": str, "origin": "real"|"synthetic"|"pooled", "n": int, "real": int,
                              "synthetic": int, "empathy"|"relevance"|"fluency": {"mean": float, "ci95": [lo, hi]}}},
      "delta_table": {"lexicon": str, "sessions": int,
                      "arms": {arm: {"n": int, "valence"|"arousal"|"dominance": {"mean", "ci95"}}}} | None,
      "reply_metrics": {arm: reply_metrics(...) dict},
      "perplexity": {arm: float},
      "mmlu": {arm: run_mmlu(...) dict} | {"skipped": str} | None,
      "paired": {source: paired.paired_report(...)} | None,
      "sessions": {"ratings"|"contexts"|"delta_table": {"real": int, "synthetic": int} | None},
      "synthetic_sessions": int | None, "real_sessions": int | None, "pooled_synthetic": bool,
      "gate": {"candidate", "baseline", "evidence", "missing", "origins", "context_sources"} | None,
    }

Table 1 holds the ratings the chat API collects (Likert 1-5, per model arm, bootstrap 95% CIs); Table 2 is the
labeler's ``delta_table`` (mean Delta valence/arousal/dominance of the users' pre- and post-chat texts per arm).
A session made by the user simulator is marked ``synthetic`` (the session manifest's flag): its ratings are not
human ratings. Table 1 therefore keeps synthetic and real sessions in separate rows (``<arm> · synthetic``,
``<arm> · real``) unless pooling was asked for (``pool_synthetic``), and every table, plot and the JSON state how
many sessions were synthetic and real. The evaluation gate's evidence (when the pipeline asked for it) is listed
per metric with the origin of its items, so evidence from simulated users is never read as people's.
Every part may be missing: the renderers say so instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emili_affect.stats import bootstrap_ci
from emili_trainer.evaluation.gate_evidence import summarize as summarize_gate

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
    ("BERTScore F1 (MiniLM; not comparable with published BERTScore)", ("bertscore_f1",), 3),
    ("Distinct-1", ("distinct_1",), 3),
    ("Distinct-2", ("distinct_2",), 3),
    ("Mean length (characters)", ("mean_length_chars",), 1),
    ("Mean length (words)", ("mean_length_words",), 1),
    ("Unique replies", ("unique_replies",), 0),
    ("Unique start words", ("unique_start_words",), 0),
    ("Unique templates (first 3 words)", ("unique_templates",), 0),
    ("Response-trie compression (Lee et al.; lower = more shared openings)", ("response_tries", "compression"), 3),
    ("NIDF specificity (EmPO: ED train+valid counts)", ("nidf",), 3),
    ("Word specificity over the scored rows (not EmPO's NIDF: no ED counts configured)", ("nidf_rows",), 3),
    ("Valence distance to context", ("vad_distance", "valence"), 3),
    ("Arousal distance to context", ("vad_distance", "arousal"), 3),
    ("Intensity distance to context", ("vad_distance", "intensity"), 3),
    ("DIFF-EPITOME ER (project classifiers)", ("diff_epitome", "er"), 3),
    ("DIFF-EPITOME IP (project classifiers)", ("diff_epitome", "ip"), 3),
    ("DIFF-EPITOME EX (project classifiers)", ("diff_epitome", "ex"), 3),
    ("DIFF-EPITOME mean (project classifiers)", ("diff_epitome", "mean"), 3),
)
NO_RATINGS = "No ratings recorded."
NO_DELTAS = "No Delta VAD table (no labelled session with both surveys)."
NO_REPLY_METRICS = "No reply metrics."
NO_MMLU = "MMLU was not run."
NA = "n/a"
ORIGINS = ("real", "synthetic")
MMLU_SUBJECTS = 57
ROW_SEPARATOR = " · "  # "<arm> · <origin>", as reply metrics name "<arm> · <source>".


def _origin(record: Mapping[str, Any], i: int) -> str:
    flag = record.get("synthetic", False)  # Sessions recorded before the flag existed were all real.
    if not isinstance(flag, bool):
        raise ValueError(f"rating {i}: synthetic must be true or false, got {flag!r}")
    return "synthetic" if flag else "real"


def origin_counts(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many records (sessions) are real and how many synthetic (``"synthetic": true``)."""
    counts = dict.fromkeys(ORIGINS, 0)
    for i, record in enumerate(records):
        counts[_origin(record, i)] += 1
    return counts


def origin_sentence(counts: Mapping[str, Any] | None) -> str:
    """``"3 real, 12 synthetic (simulated users)"``, or that the split is unknown."""
    if not isinstance(counts, Mapping) or not all(isinstance(counts.get(o), int) for o in ORIGINS):
        return "synthetic/real split not recorded"
    return f"{counts['real']} real, {counts['synthetic']} synthetic (simulated users)"


def ratings_table(
    records: Sequence[Mapping[str, Any]], samples: int = 2000, seed: int = 0, pool_synthetic: bool = False
) -> dict[str, Any]:
    """Table 1: per model arm and origin, n and the mean empathy, relevance and fluency with bootstrap 95% CIs.

    Records are ``{"model_arm": str, "empathy": int, "relevance": int, "fluency": int, "synthetic": bool}``
    with ratings 1-5 (no ``synthetic``: a real session); a malformed record raises ValueError naming its index.
    Rows are ``<arm> · real`` and ``<arm> · synthetic``; with ``pool_synthetic`` one row per arm pools both.
    Each row says its arm, origin and how many of its sessions were real and synthetic.
    """
    by_arm: dict[str, list[tuple[int, int, int]]] = {}
    origins: dict[str, dict[str, Any]] = {}
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
        origin = _origin(record, i)
        key = arm if pool_synthetic else f"{arm}{ROW_SEPARATOR}{origin}"
        about = origins.setdefault(
            key, {"arm": arm, "origin": "pooled" if pool_synthetic else origin, **dict.fromkeys(ORIGINS, 0)}
        )
        about[origin] += 1
        by_arm.setdefault(key, []).append((values[0], values[1], values[2]))
    table: dict[str, Any] = {}
    for key, rows in sorted(by_arm.items()):
        row: dict[str, Any] = {**origins[key], "n": len(rows)}
        for j, dim in enumerate(RATING_DIMENSIONS):
            column = [float(r[j]) for r in rows]
            low, high = bootstrap_ci(column, samples, seed)
            row[dim] = {"mean": float(np.mean(column)), "ci95": [low, high]}
        table[key] = row
    return table


def _delta_table(table: Any) -> dict[str, Any] | None:
    """The labeler's delta_table; a bare arm_table ({arm: row}) is wrapped into that form."""
    if not isinstance(table, Mapping) or not table:
        return None
    if "arms" in table:
        return dict(table)
    return {"lexicon": None, "sessions": sum(int(row.get("n", 0)) for row in table.values()), "arms": dict(table)}


def _table_origins(table: Mapping[str, Any]) -> dict[str, int] | None:
    """Real and synthetic session counts summed over a table's rows; None when a row does not say."""
    counts = dict.fromkeys(ORIGINS, 0)
    for row in table.values():
        if not isinstance(row, Mapping) or not all(isinstance(row.get(o), int) for o in ORIGINS):
            return None
        for origin in ORIGINS:
            counts[origin] += row[origin]
    return counts


def _sessions(report: Mapping[str, Any]) -> Mapping[str, Any]:
    sessions = report.get("sessions")
    return sessions if isinstance(sessions, Mapping) else {}


def _delta_origins(delta: Mapping[str, Any] | None) -> dict[str, int] | None:
    if not delta:
        return None
    synthetic, real = delta.get("synthetic_sessions"), delta.get("real_sessions")
    if isinstance(synthetic, int) and isinstance(real, int):
        return {"real": real, "synthetic": synthetic}
    return None


def build_report(
    results: Mapping[str, Any], samples: int = 2000, seed: int = 0, pool_synthetic: bool | None = None
) -> dict[str, Any]:
    """The report of a run's results: Table 1 computed from ``ratings`` records, the other parts passed on.

    ``results`` may hold ``title``, ``ratings`` (records, see :func:`ratings_table`) or an already computed
    ``ratings_table``, ``delta_table`` (the labeler's, or a bare ``arm_table``; its ``synthetic_sessions`` and
    ``real_sessions`` are shown when present), ``reply_metrics`` ({arm: metrics}), ``perplexity`` ({arm:
    float}), ``mmlu``, ``paired`` ({source: :func:`~emili_trainer.evaluation.paired.paired_report`}),
    ``context_sessions`` (real and synthetic counts of the recorded sessions whose turns were evaluated),
    ``pool_synthetic`` and ``gate`` (the evaluation gate's evidence); a report is
    accepted too (building is idempotent). ``pool_synthetic`` (default: the results', else False) pools
    synthetic and real ratings into one row per arm.
    """
    pool = bool(results.get("pooled_synthetic", results.get("pool_synthetic", False)))
    pool = pool if pool_synthetic is None else pool_synthetic
    if results.get("ratings") is not None:
        table1 = ratings_table(results["ratings"], samples, seed, pool_synthetic=pool)
    else:
        table1 = dict(results.get("ratings_table") or {})
    delta = _delta_table(results.get("delta_table"))
    previous = _sessions(results)
    sessions = {
        "ratings": _table_origins(table1) if table1 else dict.fromkeys(ORIGINS, 0),
        "contexts": results.get("context_sessions") or previous.get("contexts"),
        "delta_table": _delta_origins(delta),
    }
    known = [counts for counts in sessions.values() if counts]
    return {
        "title": str(results.get("title") or "EMILI evaluation"),
        "ratings_table": table1,
        "delta_table": delta,
        "reply_metrics": dict(results.get("reply_metrics") or {}),
        "perplexity": dict(results.get("perplexity") or {}),
        "mmlu": results.get("mmlu") or None,
        "paired": results.get("paired") or None,
        "sessions": sessions,
        # The most of any one part (the parts usually share sessions); what the gateway labels reports by.
        "synthetic_sessions": max((c["synthetic"] for c in known), default=None),
        "real_sessions": max((c["real"] for c in known), default=None),
        "pooled_synthetic": pool,
        "gate": results.get("gate") or None,
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


def ratings_title(origins: Mapping[str, Any] | None, pooled: bool, prefix: str = "Table 1: ") -> str:
    """Table 1's title: "human ratings" only when every rated session was real."""
    scale = "(Likert 1-5, mean [bootstrap 95% CI])"
    if not isinstance(origins, Mapping) or not all(isinstance(origins.get(o), int) for o in ORIGINS):
        return f"{prefix}ratings, origin of the sessions not recorded {scale}"
    if origins["synthetic"] == 0 and origins["real"] > 0:
        return f"{prefix}human ratings {scale}"
    if origins["real"] == 0 and origins["synthetic"] > 0:
        return f"{prefix}simulated-user ratings, synthetic sessions only (no person rated) {scale}"
    if origins["real"] == 0:
        return f"{prefix}ratings {scale}"
    how = "pooled as asked" if pooled else "in separate rows"
    return f"{prefix}ratings from human and simulated users, {how} {scale}"


def _origin_note(what: str, origins: Mapping[str, Any] | None, pooled: bool) -> str:
    how = (
        "Synthetic and real sessions are pooled (asked for with pool_synthetic)."
        if pooled
        else "Synthetic and real sessions are never pooled: each arm has a row per origin."
    )
    return f"{what}: {origin_sentence(origins)}. {how}"


def _paired_lines(paired: Mapping[str, Any]) -> list[str]:
    """Per metric, each arm's mean ± sd over seeds and, for the other arms, the paired difference from base."""
    metrics = paired.get("metrics") or {}
    if not metrics:
        return ["No paired comparison."]
    seeds = paired.get("seeds") or []
    seed_text = ", ".join("greedy" if s is None else str(s) for s in seeds) or NA
    lines = [
        f"Contexts: {paired.get('n_contexts', NA)}; seeds: {seed_text}; {paired.get('method', 'paired bootstrap')}, "
        f"{paired.get('samples', NA)} resamples. Cells: mean ± sd over seeds; for arms other than the base, the "
        "difference from the base [95% CI], p.",
        "",
    ]
    arms = list(next(iter(metrics.values())).get("arms") or {})
    rows = []
    for entry in metrics.values():
        row = [str(entry.get("label", NA))]
        for arm in arms:
            summary = (entry.get("arms") or {}).get(arm) or {}
            cell = _fmt(summary.get("mean"), 3)
            if summary.get("sd") is not None:
                cell += f" ± {_fmt(summary.get('sd'), 3)}"
            test = (entry.get("vs_base") or {}).get(arm)
            if isinstance(test, Mapping):
                low, high = (test.get("ci95") or [None, None])[:2]
                cell += (
                    f"; diff {_fmt(test.get('diff'), 3)} [{_fmt(low, 3)}, {_fmt(high, 3)}], "
                    f"p={_fmt(test.get('p_value'), 3)}"
                )
            row.append(cell)
        rows.append(row)
    return lines + _table(["Metric", *arms], rows)


def _gate_items(row: Mapping[str, Any], sources: Sequence[str]) -> str:
    """Where a metric's items come from, in words: synthetic sessions are named as such."""
    pairing = "paired" if row.get("paired") else "independent"
    origin = row.get("origin")
    if origin == "contexts":
        return f"{pairing}, contexts ({', '.join(sources) or NA})"
    if origin == "questions":
        return f"{pairing}, MMLU questions"
    if origin == "synthetic":
        return f"{pairing}, synthetic sessions (simulated users)"
    return f"{pairing}, {origin or 'origin not recorded'} sessions"


def _gate_lines(gate: Mapping[str, Any]) -> list[str]:
    sources = [str(s) for s in gate.get("context_sources") or []]
    lines = [
        f"Candidate {gate.get('candidate') or NA} against the production arm {gate.get('baseline') or NA}: the items "
        "the gate judges (the loop adds its verdict to this report once it judges). A metric without items fails "
        "its check.",
        "",
    ]
    rows, missing = [], []
    for row in summarize_gate(gate):
        if "missing" in row:
            missing.append(f"- {row['metric']}: not computed: {row['missing']}")
            continue
        rows.append(
            [
                str(row["metric"]),
                _gate_items(row, sources),
                str(row["n_candidate"]),
                str(row["n_baseline"]),
                _fmt(row["mean_candidate"], 3),
                _fmt(row["mean_baseline"], 3),
            ]
        )
    if rows:
        lines += _table(["Metric", "Items", "n candidate", "n baseline", "Mean candidate", "Mean baseline"], rows)
    else:
        lines.append("No gate evidence.")
    if missing:
        lines += ["", *missing]
    origins = (gate.get("origins") or {}).values()
    if "synthetic" in origins:
        lines += ["", "Evidence from synthetic sessions comes from simulated users: it holds no person's reaction."]
    if "synthetic sessions" in sources:
        lines += ["", "Contexts of the synthetic sessions are conversations of simulated users."]
    if "sessions" in sources:
        lines += ["", "Contexts of recorded sessions pool real and synthetic ones (pool_synthetic)."]
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: Table 1, Table 2, reply metrics side by side per arm, MMLU."""
    lines = [f"# {report.get('title') or 'EMILI evaluation'}", ""]

    sessions = _sessions(report)
    table1 = report.get("ratings_table") or {}
    rating_origins = sessions.get("ratings") if table1 else None
    lines += [f"## {ratings_title(rating_origins, bool(report.get('pooled_synthetic')))}", ""]
    if table1:
        lines += [_origin_note("Rated sessions", rating_origins, bool(report.get("pooled_synthetic"))), ""]
        header = ["Arm", "Sessions", "n", *(d.capitalize() for d in RATING_DIMENSIONS)]
        rows = [
            [
                str(row.get("arm", name)),
                str(row.get("origin", NA)),
                str(row.get("n", NA)),
                *(_cell(row.get(d), 2) for d in RATING_DIMENSIONS),
            ]
            for name, row in table1.items()
        ]
        lines += _table(header, rows)
    else:
        lines.append(NO_RATINGS)
    lines.append("")

    lines += ["## Table 2: change in VAD of the user's texts, post-chat minus pre-chat (mean [bootstrap 95% CI])", ""]
    delta = report.get("delta_table") or {}
    arms2 = delta.get("arms") or {}
    if arms2:
        lines += [
            f"Lexicon: {delta.get('lexicon', NA)}; sessions: {delta.get('sessions', NA)} "
            f"({origin_sentence(sessions.get('delta_table'))}).",
            "",
        ]
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
        if sessions.get("contexts"):
            lines += ["", f"Contexts from recorded sessions: {origin_sentence(sessions.get('contexts'))}."]
        skipped = {arm: _metric(report, arm, ("vad_distance", "pairs_skipped")) for arm in arms}
        if any(skipped.values()):
            counts = ", ".join(f"{arm}: {n}" for arm, n in skipped.items() if n)
            lines += ["", f"VAD distances skip pairs where either side has no lexicon word ({counts})."]
    else:
        lines.append(NO_REPLY_METRICS)
    lines.append("")

    paired = report.get("paired")
    if isinstance(paired, Mapping) and paired:
        lines += ["## Paired differences from the base model (same contexts)", ""]
        for source, part in paired.items():
            if isinstance(part, Mapping):
                lines += [f"### Contexts: {source}", "", *_paired_lines(part), ""]

    lines += ["## MMLU (5-shot accuracy, lm-evaluation-harness)", ""]
    skip, by_arm = _mmlu_by_arm(report.get("mmlu"))
    if skip is not None:
        lines.append(f"Skipped: {skip}.")
    elif by_arm:
        rows = []
        for arm, result in by_arm.items():
            if isinstance(result, Mapping) and "skipped" in result:
                rows.append([arm, f"skipped: {result['skipped']}", NA, NA, NA, NA])
            else:
                result = result if isinstance(result, Mapping) else {}
                rows.append(
                    [
                        arm,
                        _fmt(result.get("acc"), 3),
                        _fmt(result.get("acc_stderr"), 3),
                        _fmt(result.get("n_subjects"), 0),
                        _fmt(result.get("n_questions"), 0),
                        _fmt(result.get("wall_seconds"), 0),
                    ]
                )
        lines += _table(["Arm", "Accuracy", "Std. error", "Subjects", "Questions", "Time (s)"], rows)
        subsets = {
            int(r["n_subjects"])
            for r in by_arm.values()
            if isinstance(r, Mapping) and isinstance(r.get("n_subjects"), int) and r["n_subjects"] < MMLU_SUBJECTS
        }
        if subsets:
            lines += ["", f"A subset of MMLU's {MMLU_SUBJECTS} subjects: the accuracy is over those subjects only."]
    else:
        lines.append(NO_MMLU)
    lines.append("")

    gate = report.get("gate")
    if isinstance(gate, Mapping) and gate:
        lines += ["## Evaluation gate evidence", "", *_gate_lines(gate), ""]
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
    contexts = _sessions(report).get("contexts")
    fig.suptitle("Reply metrics per arm" + (f" (session contexts: {origin_sentence(contexts)})" if contexts else ""))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def render_plots(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """PNG bar charts of the parts present: table1.png and table2.png (with CI error bars), reply_metrics.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    table1 = report.get("ratings_table") or {}
    sessions = _sessions(report)
    if table1:
        origins = sessions.get("ratings")
        title = ratings_title(origins, bool(report.get("pooled_synthetic"))).split(" (Likert")[0]
        written.append(
            _grouped_bars(
                table1,
                RATING_DIMENSIONS,
                f"{title}\n{origin_sentence(origins)} (95% CI)",
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
                f"Table 2: Delta VAD, post - pre (95% CI)\n{origin_sentence(sessions.get('delta_table'))}",
                "Mean change",
                out_dir / "table2.png",
                None,
            )
        )
    metrics_plot = _reply_metric_plot(report, out_dir / "reply_metrics.png")
    if metrics_plot is not None:
        written.append(metrics_plot)
    return written
