"""The trainer's Prometheus metrics: how many runs are in progress here, the live progress of the one in hand, and
how runs ended.

Run ids are not labels (every run would add series that never go away): they are in the logs and the run record.
The gauges of the run in progress are unlabelled and exist only while a run is in progress in this process, so a
finished run stops reporting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from emili_core.metrics import metric_name

if TYPE_CHECKING:  # Importing training would load torch in every process that imports the metrics.
    from emili_trainer.training import Progress

# The run kinds and outcomes, the only values of ``emili_trainer_runs_total``'s labels.
RUN_KINDS = ("sft", "dpo", "eval")
OUTCOMES = ("succeeded", "failed", "cancelled")


def run_kind(run_id: str) -> str:
    """A run id starts with its kind (``sft-<digest>``, ``eval-<digest>``)."""
    kind = run_id.split("-", 1)[0]
    return kind if kind in RUN_KINDS else "unknown"


@dataclass
class _Live:
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None


class TrainingMetrics(Collector):
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.runs = Counter(
            metric_name("trainer", "runs_total"),
            "Runs ended in this process, by kind and outcome",
            ["kind", "outcome"],
            registry=registry,
        )
        self._lock = threading.Lock()
        self._active: dict[str, _Live] = {}  # Insertion order: the last one started is the run in hand.
        registry.register(self)

    def started(self, run_id: str) -> None:
        with self._lock:
            self._active.pop(run_id, None)
            self._active[run_id] = _Live()

    def ended(self, run_id: str, outcome: str) -> None:
        """The run reached a final state (in this process or, for a queued run cancelled, in the server)."""
        if outcome in OUTCOMES:
            self.runs.labels(run_kind(run_id), outcome).inc()
        self.left(run_id)

    def left(self, run_id: str) -> None:
        """This process stopped working on the run (ended, or failed to be retried later)."""
        with self._lock:
            self._active.pop(run_id, None)

    def observe(self, run_id: str, progress: Progress) -> None:
        with self._lock:
            live = self._active.get(run_id)
            if live is None:  # A late report of a run that ended must not bring its gauges back.
                return
            live.step, live.total_steps = progress.step, progress.total_steps
            if progress.loss is not None:
                live.loss = progress.loss
            if progress.learning_rate is not None:
                live.learning_rate = progress.learning_rate
            if progress.tokens_per_second is not None:
                live.tokens_per_second = progress.tokens_per_second

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            active = len(self._active)
            live = next(reversed(self._active.values()), None)
        yield GaugeMetricFamily(metric_name("trainer", "active_runs"), "Runs in progress in this process", active)
        if live is None:
            return
        ratio = live.step / live.total_steps if live.total_steps > 0 else 0.0
        values = {
            "run_progress_ratio": ("Optimiser steps done / planned (evaluations: contexts answered)", ratio),
            "run_step": ("Optimiser steps done", float(live.step)),
            "run_loss": ("Training loss at the last log", live.loss),
            "run_learning_rate": ("Learning rate at the last log", live.learning_rate),
            "run_tokens_per_second": ("Input tokens per second since the last log", live.tokens_per_second),
        }
        for name, (documentation, value) in values.items():
            if value is not None:
                yield GaugeMetricFamily(metric_name("trainer", name), f"{documentation} (the run in progress)", value)


TRAINING = TrainingMetrics()
