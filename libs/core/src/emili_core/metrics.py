"""Prometheus metrics: one registry per process, names prefixed ``emili_<service>_``."""

from __future__ import annotations

import functools

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def metric_name(service: str, name: str) -> str:
    return f"emili_{service}_{name}"


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serve /metrics on its own port; port 0 means disabled (tests run many services in one process).

    ``host`` is ``settings.metrics_host``: the loopback unless configured (the endpoint has no authentication;
    Kubernetes sets 0.0.0.0 so that Prometheus can scrape the pod)."""
    if port:
        start_http_server(port, addr=host, registry=REGISTRY)


class RpcMetrics:
    """Per-RPC counters and latency, recorded once by the error-mapping interceptor."""

    def __init__(self, service: str) -> None:
        self.requests = Counter(
            metric_name(service, "grpc_requests_total"),
            "gRPC calls handled, by method and status code",
            ["method", "code"],
        )
        self.latency = Histogram(
            metric_name(service, "grpc_request_duration_seconds"),
            "gRPC call duration (for streams: the whole stream)",
            ["method"],
            buckets=LATENCY_BUCKETS,
        )


@functools.cache
def rpc_metrics(service: str) -> RpcMetrics:
    # Cached: a process may start a service's server more than once (tests) but may register a name once.
    return RpcMetrics(service)
