"""The FER service's Prometheus metrics (prefix ``emili_fer_``)."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

from emili_core.metrics import LATENCY_BUCKETS, metric_name


class FerMetrics:
    def __init__(self) -> None:
        self.frames = Counter(metric_name("fer", "frames_total"), "Frames analysed, by outcome", ["outcome"])
        self.stage_seconds = Histogram(
            metric_name("fer", "stage_duration_seconds"),
            "Time per pipeline stage (classify includes waiting for the micro-batch)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            metric_name("fer", "batch_size"), "Faces per model call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self.queue_depth = Gauge(metric_name("fer", "queue_depth"), "Frames admitted and not yet answered")


@functools.cache
def fer_metrics() -> FerMetrics:
    return FerMetrics()
