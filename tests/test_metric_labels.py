"""Every metric the services register has bounded labels: no run, session, user or other id as a label."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from emili_chat.metrics import chat_metrics
from emili_core.metrics import objectstore_errors, rpc_metrics, serving_gauge
from emili_core.tasks import heartbeat_gauge
from emili_fer.metrics import fer_metrics
from emili_gateway.metrics import gateway_metrics
from emili_pipeline.loop_metrics import loop_metrics
from emili_trainer.metrics import TRAINING

# Labels that take a bounded set of values (a registered version, a route template, a capped study list, the
# loop's phases and its decision events' names, ...).
BOUNDED = {
    "grpc_service", "grpc_method", "grpc_type", "grpc_code", "service", "queue", "task", "outcome", "kind",
    "direction", "arm", "cadence", "source", "stage", "route", "method", "status", "type", "study", "reason", "bucket",
    "operation", "phase", "event",
}  # fmt: skip


def label_names() -> set[tuple[str, str]]:
    """(metric, label) of every EMILI and gRPC metric registered, with samples or not yet."""
    found = set()
    for collector in list(REGISTRY._collector_to_names):  # Labelled metrics without a sample have no samples yet.
        if isinstance(collector, MetricWrapperBase):
            found |= {(collector._name, label) for label in collector._labelnames}
        else:
            found |= {(m.name, label) for m in collector.collect() for sample in m.samples for label in sample.labels}
    return {(name, label) for name, label in found if name.startswith(("emili_", "grpc_server_")) and label != "le"}


def test_no_metric_is_labelled_by_an_id() -> None:
    chat_metrics(), fer_metrics(), gateway_metrics(), rpc_metrics(), heartbeat_gauge(), serving_gauge()
    objectstore_errors(), loop_metrics()
    TRAINING.started("sft-0123456789abcdef")  # So that the run gauges are collected too.
    try:
        labels = label_names()
    finally:
        TRAINING.left("sft-0123456789abcdef")
    assert ("grpc_server_handled", "grpc_code") in labels  # Counters are registered without ``_total``.
    assert {("emili_objectstore_errors", "operation"), ("emili_server_serving", "service")} <= labels
    assert {("emili_loop_phase", "phase"), ("emili_loop_events", "event")} <= labels
    assert not {(name, label) for name, label in labels if label not in BOUNDED}
