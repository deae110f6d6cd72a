"""One loop simulation study from its conditions run apart (``emili study combine``).

A study runs its conditions one after the other; on a 2-core machine two iterations of both take about three hours.
Its conditions can instead run at the same time as two ``emili study simulate --condition ...`` processes with the
same options on one stack (each run's loop state, sessions and candidates are scoped by run and condition), and be
merged here into the report one process would have written: the noise verdict, the pooled tables and the
base-against-base check need both conditions. Every iteration's users come from the study's seed and the iteration,
never the condition, so both parts met the same simulated users on their base arms, as in one process.
"""

from __future__ import annotations

import calendar
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emili_pipeline.study_sim import CONDITIONS, RESUME_DEFAULTS, RESUME_MUST_MATCH, build_report

RUN_ID_FORMAT = "%Y%m%dT%H%M%SZ"
# Parts of one study: the same design, judged by the same rule, each finished.
COMBINE_MUST_MATCH = (*(k for k in RESUME_MUST_MATCH if k != "conditions"), "iterations", "canary_rule")


class StudyCombineError(ValueError):
    """The parts cannot be one study (the message says which part and why)."""


def read_part(path: Path) -> dict[str, Any]:
    """A study's report from its study.json or the folder holding it."""
    file = path / "study.json" if path.is_dir() else path
    if not file.is_file():
        raise StudyCombineError(f"{path}: no study.json (give a study's folder or its study.json)")
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise StudyCombineError(f"{file}: not a study report ({exc})") from None
    if not isinstance(report, dict) or "options" not in report or "conditions" not in report:
        raise StudyCombineError(f"{file}: not a study report (no options or conditions)")
    return report


def _span(parts: Sequence[Mapping[str, Any]]) -> float:
    """Wall time of the parts together: the union of their [start, start + wall] intervals, so parts that ran at
    the same time count once and parts run one after another add up."""
    intervals = sorted(
        (start, start + float(p.get("wall_s") or 0.0))
        for p in parts
        for start in [calendar.timegm(time.strptime(str(p["options"]["run_id"]), RUN_ID_FORMAT))]
    )
    total, end = 0.0, float("-inf")
    for start, stop in intervals:
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return total


def combine_reports(parts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One study's report from ``parts`` (name, e.g. its path -> its report), each with other conditions."""
    if len(parts) < 2:
        raise StudyCombineError("give two or more studies to combine (one per condition)")
    options = {name: RESUME_DEFAULTS | dict(report["options"]) for name, report in parts.items()}
    (first_name, first), *others = options.items()
    for name, other in others:
        changed = [
            f"{k} {first.get(k)!r} in {first_name}, {other.get(k)!r} here"
            for k in COMBINE_MUST_MATCH
            if first.get(k) != other.get(k)
        ]
        if changed:
            raise StudyCombineError(f"{name} was run with other options ({'; '.join(changed)}): not one study")
    conditions: dict[str, list[dict[str, Any]]] = {}
    for name, report in parts.items():
        for condition, iterations in report["conditions"].items():
            if condition in conditions:
                raise StudyCombineError(f"{name}: condition {condition} is in another part too")
            if len(iterations) < int(first["iterations"]):
                raise StudyCombineError(
                    f"{name}: {condition} has {len(iterations)} of {first['iterations']} iterations; finish it first "
                    "(emili study simulate ... --resume)"
                )
            conditions[condition] = list(iterations)
    ordered: dict[str, list[dict[str, Any]]] = {c: conditions[c] for c in CONDITIONS if c in conditions}
    merged = {
        **first,
        "conditions": "+".join(ordered),
        "run_id": "+".join(str(o["run_id"]) for o in options.values()),
    }
    report = build_report(merged, ordered, _span(list(parts.values())))
    report["parts"] = [
        {
            "from": name,
            "run_id": part["options"]["run_id"],
            "conditions": part["options"]["conditions"],
            "wall_s": part.get("wall_s"),
        }
        for name, part in parts.items()
    ]
    return report
