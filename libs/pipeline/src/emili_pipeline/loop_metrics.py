"""The loop process's Prometheus metrics (``emili_loop_*``), served by ``emili loop run`` on
``EMILI_LOOP_METRICS_PORT``.

Labels take bounded values only: the loop's phases and its decision events (names, never versions or ids, which go
to the state's history and the logs). Alerts: EmiliLoopStalled (no tick has completed for a while),
EmiliLoopProductionRetired.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

PHASES = ("idle", "training", "gating", "canary")


@dataclass(frozen=True)
class LoopMetrics:
    ticks: Counter
    last_tick: Gauge
    lease: Gauge
    phase: Gauge
    events: Counter

    def ticked(self, outcome: str) -> None:
        """One tick ended: ``acted`` (it held the lease), ``standby`` (another instance did) or ``failed``."""
        self.ticks.labels(outcome).inc()
        if outcome != "failed":
            self.lease.set(1 if outcome == "acted" else 0)
        # Only acting ticks: an instance whose every tick fails keeps the lease, and a standby instance's ticks
        # would otherwise hide that from the stall alert (which reads the newest across instances).
        if outcome == "acted":
            self.last_tick.set(time.time())

    def in_phase(self, phase: str) -> None:
        for name in PHASES:
            self.phase.labels(name).set(1 if name == phase else 0)

    def event(self, name: str) -> None:
        self.events.labels(name).inc()


@functools.cache
def loop_metrics() -> LoopMetrics:
    # Cached: one registration per process (tests build many loops).
    metrics = LoopMetrics(
        ticks=Counter("emili_loop_ticks_total", "Loop ticks, by outcome (acted, standby, failed)", ["outcome"]),
        last_tick=Gauge(
            "emili_loop_last_tick_timestamp_seconds",
            "When this instance last completed a tick holding the lease (Unix time)",
        ),
        lease=Gauge("emili_loop_holds_lease", "1 while this instance holds the loop's lease (acts), else 0"),
        phase=Gauge("emili_loop_phase", "1 for the loop's current phase, 0 for the others", ["phase"]),
        events=Counter("emili_loop_events_total", "Loop decisions and transitions, by event", ["event"]),
    )
    for outcome in ("acted", "standby", "failed"):
        metrics.ticks.labels(outcome)  # Every series from the start, so increase() sees the first one.
    for event in (
        "gate passed",
        "gate failed",
        "canary promoted",
        "canary rolled back",
        "canary refused",
        "production retired",
    ):
        metrics.events.labels(event)
    return metrics
