"""The gateway's Prometheus metrics (prefix ``emili_gateway_``). Every label has a bounded set of values."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

from emili_core.metrics import LATENCY_BUCKETS, metric_name

# Studies are labelled by id up to this many per process; later ones share "other", so a long-running
# gateway with many studies cannot grow the series without bound.
MAX_LABELLED_STUDIES = 50
WS_MESSAGE_TYPES = frozenset(
    {"auth", "user_message", "frame", "ready", "accepted", "delta", "message", "readout", "limit", "error"}
)


class GatewayMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            metric_name("gateway", "http_requests_total"),
            "HTTP requests, by route template, method and status",
            ["route", "method", "status"],
        )
        self.latency = Histogram(
            metric_name("gateway", "http_request_duration_seconds"),
            "HTTP request duration, by route template",
            ["route"],
            buckets=LATENCY_BUCKETS,
        )
        self.websockets = Gauge(metric_name("gateway", "websocket_connections"), "Open conversation WebSockets")
        self.ws_messages = Counter(
            metric_name("gateway", "websocket_messages_total"),
            "Conversation WebSocket messages, by direction and type",
            ["direction", "type"],
        )
        self.sessions_created = Counter(
            metric_name("gateway", "sessions_created_total"),
            "Study sessions created, by study and arm",
            ["study", "arm"],
        )
        self.redemptions = Counter(
            metric_name("gateway", "invite_redemptions_total"), "Invite redemptions, by outcome", ["outcome"]
        )
        self.frames_dropped = Counter(
            metric_name("gateway", "frames_dropped_total"), "Face frames not forwarded to chat, by reason", ["reason"]
        )
        self.canary_decisions = Counter(
            metric_name("gateway", "canary_decisions_total"),
            "Canaries decided, by outcome (one canary across several studies is one decision)",
            ["outcome"],
        )
        for outcome in ("promoted", "rolled_back"):  # Made at 0, so that increase() sees the first decision.
            self.canary_decisions.labels(outcome)
        self.canaries_running = Gauge(
            metric_name("gateway", "canaries_running"), "Canaries now running (one across several studies counts once)"
        )
        self._studies: set[str] = set()

    def study_label(self, study_id: str) -> str:
        if study_id in self._studies:
            return study_id
        if len(self._studies) < MAX_LABELLED_STUDIES:
            self._studies.add(study_id)
            return study_id
        return "other"

    def ws_message(self, direction: str, kind: object) -> None:
        self.ws_messages.labels(direction, kind if kind in WS_MESSAGE_TYPES else "unknown").inc()


@functools.cache
def gateway_metrics() -> GatewayMetrics:
    # Cached: tests build several apps in one process, and a metric name may be registered once.
    return GatewayMetrics()
