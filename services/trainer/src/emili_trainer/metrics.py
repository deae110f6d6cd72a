"""The trainer worker's Prometheus metrics: live progress of the run in hand."""

from __future__ import annotations

from prometheus_client import Gauge

from emili_core.metrics import metric_name
from emili_trainer.training import Progress


class TrainingMetrics:
    def __init__(self) -> None:
        self.step = Gauge(metric_name("trainer", "run_step"), "Optimiser steps done", ["run_id"])
        self.total = Gauge(metric_name("trainer", "run_total_steps"), "Optimiser steps planned", ["run_id"])
        self.loss = Gauge(metric_name("trainer", "run_loss"), "Training loss at the last log", ["run_id"])
        self.lr = Gauge(metric_name("trainer", "run_learning_rate"), "Learning rate at the last log", ["run_id"])
        self.speed = Gauge(metric_name("trainer", "run_tokens_per_second"), "Input tokens per second", ["run_id"])

    def observe(self, run_id: str, progress: Progress) -> None:
        self.step.labels(run_id).set(progress.step)
        self.total.labels(run_id).set(progress.total_steps)
        if progress.loss is not None:
            self.loss.labels(run_id).set(progress.loss)
        if progress.learning_rate is not None:
            self.lr.labels(run_id).set(progress.learning_rate)
        if progress.tokens_per_second is not None:
            self.speed.labels(run_id).set(progress.tokens_per_second)


TRAINING = TrainingMetrics()
