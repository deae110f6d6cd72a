"""The chat service's Prometheus metrics (prefix ``emili_chat_``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from prometheus_client import Counter, Gauge, Histogram

from emili_chat.llm import Message
from emili_core.metrics import metric_name

GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)


class ChatMetrics:
    def __init__(self) -> None:
        self.active_sessions = Gauge(metric_name("chat", "active_conversations"), "Open Converse streams")
        self.turns = Counter(metric_name("chat", "turns_total"), "Assistant messages, by kind", ["kind"])
        # ``arm``: the adapter (a registered model version) or "base"; bounded by the versions registered.
        self.ttft = Histogram(
            metric_name("chat", "time_to_first_token_seconds"),
            "From request to first token, by model arm",
            ["arm"],
            buckets=GENERATION_BUCKETS,
        )
        self.tokens = Counter(
            metric_name("chat", "tokens"),
            "Tokens of prompts sent to the model (in) and of replies (out), by model arm",
            ["direction", "arm"],
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


def reply_tokens(count_tokens: Callable[[Sequence[Message]], int], text: str) -> int:
    """Tokens of a reply by the backend's own count: the reply as a message, less the framing of an empty one."""
    return max(0, count_tokens([Message("assistant", text)]) - count_tokens([Message("assistant", "")]))


@functools.cache
def chat_metrics() -> ChatMetrics:
    return ChatMetrics()
