"""Prometheus metrics: one registry per process; EMILI's own names are prefixed ``emili_<service>_``.

gRPC servers use the conventional names of go-grpc-prometheus / py-grpc-prometheus (``grpc_server_handled_total``
and friends, labelled by full proto service name and method), so the usual gRPC dashboards and alerts work as they
are. Every label takes a bounded set of values: ids (runs, sessions, users) go to logs and records, never labels.
"""

from __future__ import annotations

import functools
from typing import Literal, get_args

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The ``grpc_type`` label: how many messages each side sends.
GRPC_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}


def metric_name(service: str, name: str) -> str:
    return f"emili_{service}_{name}"


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serve /metrics on its own port; port 0 means disabled (tests run many services in one process).

    ``host`` is ``settings.metrics_host``: the loopback unless configured (the endpoint has no authentication;
    Kubernetes sets 0.0.0.0 so that Prometheus can scrape the pod)."""
    if port:
        start_http_server(port, addr=host, registry=REGISTRY)


def grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    return GRPC_TYPES[(request_streaming, response_streaming)]


def split_method(full_method: str) -> tuple[str, str]:
    """``/emili.fer.v1.FerService/Analyze`` -> (``emili.fer.v1.FerService``, ``Analyze``)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


class RpcMetrics:
    """Started and handled calls and their duration, recorded once per call by the error-mapping interceptor."""

    def __init__(self) -> None:
        labels = ["grpc_service", "grpc_method", "grpc_type"]
        self.started = Counter("grpc_server_started_total", "RPCs started on the server", labels)
        self.handled = Counter(
            "grpc_server_handled_total", "RPCs completed on the server, by status code", [*labels, "grpc_code"]
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its end (for streams: the whole stream)",
            labels,
            buckets=LATENCY_BUCKETS,
        )


@functools.cache
def rpc_metrics() -> RpcMetrics:
    # Cached: a process may start several servers (tests) but may register a name once.
    return RpcMetrics()


@functools.cache
def serving_gauge() -> Gauge:
    """1 while the server's health says SERVING (gRPC health; the gateway: /readyz), else 0.

    ``up`` only says that the metrics port answers; a server stuck loading its models or cut off from a dependency
    answers scrapes all the same, so it reports its serving status here too (alert: EmiliServiceNotServing)."""
    return Gauge("emili_server_serving", "1 while the server reports SERVING (ready for requests), else 0", ["service"])


# Bounded label values of ``emili_objectstore_errors_total``: what was asked of the store, never a key or bucket.
ObjectStoreOperation = Literal["bucket", "stat", "upload", "download", "list", "delete", "ping"]
OBJECTSTORE_OPERATIONS: tuple[str, ...] = get_args(ObjectStoreOperation)
# ``transient``: a failed attempt that is retried; ``final``: a failure the caller gets (retries spent, or an error
# that retrying cannot fix, such as refused credentials).
OBJECTSTORE_ERROR_KINDS = ("transient", "final")


@functools.cache
def objectstore_errors() -> Counter:
    counter = Counter(
        "emili_objectstore_errors_total",
        "Failed object storage (S3) calls, one per failed attempt, by operation and kind (transient or final)",
        ["operation", "kind"],
    )
    # Every series exists from the start at 0, so that rate() and increase() see the first failure.
    for operation in OBJECTSTORE_OPERATIONS:
        for kind in OBJECTSTORE_ERROR_KINDS:
            counter.labels(operation, kind)
    return counter
