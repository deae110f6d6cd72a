"""Evaluation reports for researchers: the newest one that covers a study's arms, and its plots.

The trainer's evaluation runs write them to object storage (bucket ``models``); the gateway reads them there and
never imports the trainer. What it relies on:

    runs/<eval id>/run.json                 the run record: kind "eval", state, arms, created_ms, updated_ms,
                                            report_prefix (default runs/<eval id>/report)
    <report prefix>/report.json             title, ratings_table (Table 1), delta_table (Table 2), ...
    <report prefix>/plots/<name>.png        table1.png, table2.png, reply_metrics.png (those that exist)

A report "covers" a study when every arm of the study is among the run's arms (from run.json; for a run without
one, or a record without arms, the arms its tables name). Among those, the newest by the run's last update wins.
A report says its data are synthetic (simulated users) with ``"synthetic": true`` (or a count of synthetic
sessions) at its top level or in its delta table; reports that do not say are shown without that label.

Parsed run records and reports are cached by their object's etag, so a page reload reads only the listing.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from emili_core.errors import NotFound
from emili_core.keys import run_prefix
from emili_core.objectstore import Bucket, ObjectStore
from emili_gateway.models import ReportPlot, Study, StudyReport

EVAL_RUNS = "runs/eval-"  # Evaluation run ids start with "eval-"; training runs (and their checkpoints) do not.
RUN_ID = re.compile(r"^eval-[A-Za-z0-9_-]{1,64}$")
PLOT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\.png$")
PLOT_TITLES = {
    "table1.png": "Table 1: ratings per arm, real and synthetic (simulated) sessions apart (mean, 95% CI)",
    "table2.png": "Table 2: change in valence, arousal and dominance, post-chat minus pre-chat (mean, 95% CI)",
    "reply_metrics.png": "Reply metrics per arm",
}
_FAILED_STATES = frozenset({"failed", "cancelled"})
MAX_REPORT_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class EvalRun:
    run_id: str
    arms: tuple[str, ...]
    created_ms: int
    updated_ms: int
    report_prefix: str


@dataclass(frozen=True)
class FoundReport:
    run: EvalRun
    report: Mapping[str, Any]
    plots: tuple[str, ...]  # File names under the report's plots/, sorted.


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def arms_named_by(report: Mapping[str, Any]) -> set[str]:
    """The arms a report's tables and metrics name (reply metrics may be per "arm · source")."""
    arms: set[str] = set()
    for part in ("ratings_table", "reply_metrics", "perplexity"):
        table = report.get(part)
        if isinstance(table, Mapping):
            arms |= {str(name).split(" · ")[0] for name in table}
    delta = report.get("delta_table")
    if isinstance(delta, Mapping) and isinstance(delta.get("arms"), Mapping):
        arms |= {str(name).split(" · ")[0] for name in delta["arms"]}
    return arms


def synthetic_of(report: Mapping[str, Any]) -> bool | None:
    """Whether the report says its data are synthetic; None when it does not say."""
    delta = report.get("delta_table")
    for holder in (report, delta if isinstance(delta, Mapping) else {}):
        for key in ("synthetic", "synthetic_sessions"):
            value = holder.get(key)
            if isinstance(value, bool):
                return value
            if isinstance(value, int | float):
                return value > 0
    return None


class ReportFinder:
    """Finds evaluation reports in object storage (blocking calls: run them in a thread)."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self._lock = threading.Lock()
        self._runs: dict[str, tuple[str, EvalRun | None]] = {}  # run.json key -> (etag, parsed; None: not usable)
        self._reports: dict[str, tuple[str, dict[str, Any]]] = {}  # report.json key -> (etag, report)

    def _cached_run(self, run_id: str, key: str, etag: str) -> EvalRun | None:
        with self._lock:
            cached = self._runs.get(key)
        if cached is not None and cached[0] == etag:
            return cached[1]
        try:
            raw = self.objects.get_json(Bucket.MODELS, key)
        except NotFound:
            return None
        run = None
        if isinstance(raw, Mapping) and raw.get("kind", "eval") == "eval" and raw.get("state") not in _FAILED_STATES:
            arms = raw.get("arms")
            prefix = raw.get("report_prefix")
            run = EvalRun(
                run_id=run_id,
                arms=tuple(str(a) for a in arms) if isinstance(arms, list) else (),
                created_ms=_int(raw.get("created_ms")),
                updated_ms=_int(raw.get("updated_ms")),
                report_prefix=prefix if isinstance(prefix, str) and prefix else f"{run_prefix(run_id)}/report",
            )
        with self._lock:
            self._runs[key] = (etag, run)
        return run

    def _cached_report(self, key: str, etag: str) -> dict[str, Any]:
        with self._lock:
            cached = self._reports.get(key)
        if cached is not None and cached[0] == etag:
            return cached[1]
        raw = self.objects.get_json(Bucket.MODELS, key)
        report = dict(raw) if isinstance(raw, Mapping) else {}
        with self._lock:
            self._reports[key] = (etag, report)
        return report

    def runs(self) -> list[tuple[EvalRun, str]]:
        """Every evaluation run with a report: (run, etag of its report.json)."""
        entries = dict(self.objects.list_entries(Bucket.MODELS, EVAL_RUNS))
        found = []
        for key in entries:
            parts = key.split("/")
            if len(parts) != 3 or parts[2] != "run.json" or not RUN_ID.match(parts[1]):
                continue
            run = self._cached_run(parts[1], key, entries[key])
            report_key = f"{run.report_prefix}/report.json" if run is not None else ""
            if run is not None and report_key in entries:
                if not run.arms:  # A record without its arms: take those the report's tables name.
                    report = self._cached_report(report_key, entries[report_key])
                    run = replace(run, arms=tuple(sorted(arms_named_by(report))))
                found.append((run, entries[report_key]))
        # Reports of runs whose record is missing (e.g. copied by hand): their arms come from their tables.
        recorded = {run.run_id for run, _ in found}
        for key, etag in entries.items():
            parts = key.split("/")
            if len(parts) != 4 or parts[2:] != ["report", "report.json"] or not RUN_ID.match(parts[1]):
                continue
            if parts[1] not in recorded and f"runs/{parts[1]}/run.json" not in entries:
                report = self._cached_report(key, etag)
                run = EvalRun(parts[1], tuple(sorted(arms_named_by(report))), 0, 0, f"runs/{parts[1]}/report")
                found.append((run, etag))
        return found

    def newest_for(self, arms: Sequence[str]) -> FoundReport:
        """The newest report whose run compared every one of ``arms``; NotFound says which arms had none."""
        wanted = set(arms)
        covering = [(run, etag) for run, etag in self.runs() if wanted <= set(run.arms)]
        if not covering:
            raise NotFound(
                f"no evaluation report covers this study's arms ({', '.join(arms)}) yet; run an evaluation of "
                f"them (e.g. `emili evaluate --version VERSION`, or `emili pipeline run`) and reload"
            )
        run, etag = max(covering, key=lambda pair: (pair[0].updated_ms, pair[0].created_ms, pair[0].run_id))
        report = self._cached_report(f"{run.report_prefix}/report.json", etag)
        plots_prefix = f"{run.report_prefix}/plots/"
        plots = sorted(
            name
            for name in (k[len(plots_prefix) :] for k in self.objects.list_keys(Bucket.MODELS, plots_prefix))
            if PLOT_NAME.match(name)
        )
        return FoundReport(run, report, tuple(plots))

    def run_for(self, run_id: str, arms: Sequence[str]) -> EvalRun:
        """The evaluation run ``run_id`` if it has a report covering ``arms`` (else NotFound)."""
        if RUN_ID.match(run_id):
            for run, _ in self.runs():
                if run.run_id == run_id and set(arms) <= set(run.arms):
                    return run
        raise NotFound(f"no evaluation report {run_id!r} for this study's arms")

    def plot(self, run: EvalRun, name: str) -> Iterator[bytes]:
        """A plot's bytes, in chunks; NotFound (before any chunk) when it does not exist."""
        key = f"{run.report_prefix}/plots/{name}"
        if not PLOT_NAME.match(name) or not self.objects.exists(Bucket.MODELS, key):
            raise NotFound(f"evaluation {run.run_id} has no plot {name!r}")
        return self.objects.iter_chunks(Bucket.MODELS, key)


def study_report(study: Study, found: FoundReport, api: str) -> StudyReport:
    """The API's view of a found report for ``study``; plot URLs are under ``api`` (e.g. /api/v1)."""
    report = found.report
    ratings = report.get("ratings_table")
    delta = report.get("delta_table")
    base = f"{api}/studies/{study.study_id}/reports/{found.run.run_id}/plots"
    return StudyReport(
        study_id=study.study_id,
        run_id=found.run.run_id,
        title=str(report.get("title") or f"EMILI evaluation {found.run.run_id}"),
        arms=list(found.run.arms),
        study_arms=[a.arm for a in study.arms],
        created_ms=found.run.created_ms,
        updated_ms=found.run.updated_ms,
        synthetic=synthetic_of(report),
        ratings_table=dict(ratings) if isinstance(ratings, Mapping) else {},
        delta_table=dict(delta) if isinstance(delta, Mapping) and delta else None,
        plots=[
            ReportPlot(name=name, title=PLOT_TITLES.get(name, name.removesuffix(".png")), url=f"{base}/{name}")
            for name in found.plots
        ],
    )
