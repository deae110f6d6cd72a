"""The chat service's Prometheus metrics (prefix ``emili_chat_``)."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

from emili_core.metrics import metric_name

GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)


class ChatMetrics:
    def __init__(self) -> None:
        self.active_sessions = Gauge(metric_name("chat", "active_conversations"), "Open Converse streams")
        self.turns = Counter(metric_name("chat", "turns_total"), "Assistant messages, by kind", ["kind"])
        self.ttft = Histogram(
            metric_name("chat", "time_to_first_token_seconds"),
            "From request to first token",
            buckets=GENERATION_BUCKETS,
        )
        self.generation = Histogram(
            metric_name("chat", "generation_duration_seconds"), "Whole reply generation", buckets=GENERATION_BUCKETS
        )
        self.readouts = Counter(metric_name("chat", "readouts_injected_total"), "Readouts injected", ["cadence"])
        self.readout_build = Histogram(
            metric_name("chat", "readout_build_seconds"),
            "Building a readout (aggregate, format, record) before a turn",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
        )
        self.backend_errors = Counter(metric_name("chat", "backend_errors_total"), "LLM backend errors", ["kind"])
        self.fer_readings = Counter(metric_name("chat", "fer_readings_total"), "Face readings, by source", ["source"])


@functools.cache
def chat_metrics() -> ChatMetrics:
    return ChatMetrics()
