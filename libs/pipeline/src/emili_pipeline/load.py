"""The load test (``make load``): M simulated users at once, face input at 1/s each, for T minutes.

Each of the M slots runs simulated sessions back to back until the time is up, so M sessions are open at any
moment. Measured on the client: face inputs sent per second (sustained over the run), time to first token,
errors. Measured on the stack: the length of every Celery queue in Redis once a second (queue lag), and for every
session the time from EndSession to its record in object storage (the chat worker's lag). Then the zero-loss
check: every event the chat service acknowledged (user messages by event id, assistant turns by turn id) must be
in the stored ``events.jsonl`` of its session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from emili_core.errors import NotFound
from emili_core.grpc_client import make_channel
from emili_core.keys import session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.queues import Queue
from emili_core.tasks import TRANSIENT_ERRORS
from emili_pipeline.simulator.faces import load_face_set
from emili_pipeline.simulator.personas import Persona
from emili_pipeline.simulator.run import (
    SessionOutcome,
    SimulatorSettings,
    lost_events,
    run_user,
    user_seed,
    user_subject,
)


@dataclass
class LoadResult:
    outcomes: list[SessionOutcome] = field(default_factory=list)
    persist_lag_s: dict[str, float] = field(default_factory=dict)  # Session id -> EndSession to stored record.
    unpersisted: list[str] = field(default_factory=list)
    queue_samples: dict[str, list[int]] = field(default_factory=dict)
    wall_s: float = 0.0


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


async def _sample_queues(redis_url: str, samples: dict[str, list[int]], stop: asyncio.Event) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        while not stop.is_set():
            # The load test observes; under `make chaos` Redis is killed on purpose, and a missed sample is fine.
            with contextlib.suppress(*TRANSIENT_ERRORS):
                for queue in Queue:
                    samples.setdefault(queue.value, []).append(int(await client.llen(queue.value)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await client.aclose()


async def _await_record(store: ObjectStore, session_id: str, ended: float, timeout_s: float) -> float | None:
    """Seconds from the session's end until its record is in object storage (None: not within the timeout)."""
    key = session_record_keys(session_id)["session.json"]
    while time.perf_counter() - ended < timeout_s:
        try:
            if await asyncio.to_thread(store.exists, Bucket.SESSIONS, key):
                return time.perf_counter() - ended
        except TRANSIENT_ERRORS:  # S3 down (a chaos fault): keep waiting until the timeout.
            pass
        await asyncio.sleep(0.25)
    return None


async def run_load(
    users: int,
    minutes: float,
    target: str,
    personas: Sequence[Persona],
    settings: SimulatorSettings,
    store: ObjectStore,
    redis_url: str,
    *,
    token_for: Callable[[str], str],
    seed: int = 0,
    persist_timeout_s: float = 120.0,
) -> LoadResult:
    result = LoadResult()
    faces = await asyncio.to_thread(load_face_set, settings.faces, settings.face) if settings.faces else None
    deadline = time.perf_counter() + minutes * 60
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_queues(redis_url, result.queue_samples, stop))
    waits: list[asyncio.Task[None]] = []

    async def watch_record(session_id: str, ended: float) -> None:
        lag = await _await_record(store, session_id, ended, persist_timeout_s)
        if lag is None:
            result.unpersisted.append(session_id)
        else:
            result.persist_lag_s[session_id] = lag

    async with make_channel(target, None, tls=settings.tls, timeout=settings.rpc_timeout_s) as channel:

        async def slot(index: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                subject = user_subject(settings.subject_prefix, seed, index)
                persona = personas[(index + n * users) % len(personas)]
                outcome = await run_user(
                    channel,
                    persona,
                    settings,
                    user_seed(seed, index * 100_000 + n),
                    token=token_for(subject),
                    faces=faces,
                )
                result.outcomes.append(outcome)
                if outcome.session_id:
                    waits.append(asyncio.create_task(watch_record(outcome.session_id, time.perf_counter())))
                n += 1

        started = time.perf_counter()
        await asyncio.gather(*(slot(i) for i in range(users)))
        result.wall_s = time.perf_counter() - started
    await asyncio.gather(*waits)
    stop.set()
    await sampler
    return result


def zero_loss(store: ObjectStore, outcomes: Sequence[SessionOutcome]) -> dict[str, list[str]]:
    """Session id -> acknowledged events missing from its stored record (an empty dict: nothing was lost)."""
    missing: dict[str, list[str]] = {}
    for outcome in outcomes:
        if not outcome.session_id:
            continue
        key = session_record_keys(outcome.session_id)["events.jsonl"]
        try:
            lines = store.get_bytes(Bucket.SESSIONS, key).decode().splitlines()
        except NotFound:
            missing[outcome.session_id] = ["the whole record"]
            continue
        lost = lost_events(outcome, [json.loads(line) for line in lines if line.strip()])
        if lost:
            missing[outcome.session_id] = lost
    return missing


def report(result: LoadResult, store: ObjectStore, users: int, minutes: float, fps: float) -> dict[str, Any]:
    outcomes = result.outcomes
    inputs = sum(o.frames_sent + o.readings_sent for o in outcomes)
    ttft = [t for o in outcomes for t in o.ttft_s]
    lags = list(result.persist_lag_s.values())
    lost = zero_loss(store, outcomes)
    acknowledged = sum(len(o.accepted_event_ids) + len(o.assistant_turn_ids) for o in outcomes)
    return {
        "users": users,
        "minutes": minutes,
        "face_inputs_per_user_per_s": fps,
        "face_input": "jpeg frames" if any(o.frames_sent for o in outcomes) else "fer readings",
        "wall_s": round(result.wall_s, 1),
        "sessions": len(outcomes),
        "sessions_failed": sum(not o.ok for o in outcomes),
        "face_inputs_sent": inputs,
        "sustained_face_inputs_per_s": round(inputs / result.wall_s, 2) if result.wall_s else None,
        "turns": sum(len(o.turns) for o in outcomes),
        "ttft_s": {"p50": _pct(ttft, 50), "p99": _pct(ttft, 99), "max": _pct(ttft, 100), "n": len(ttft)},
        "queue_length": {
            q: {"max": max(s), "mean": round(float(np.mean(s)), 2)} for q, s in result.queue_samples.items() if s
        },
        "persist_lag_s": {"p50": _pct(lags, 50), "p99": _pct(lags, 99), "max": _pct(lags, 100), "n": len(lags)},
        "unpersisted_sessions": result.unpersisted,
        "errors": [f"{o.session_id or o.persona_id}: {e}" for o in outcomes for e in o.errors][:50],
        "error_count": sum(len(o.errors) for o in outcomes),
        "acknowledged_events": acknowledged,
        "lost_events": sum(len(v) for v in lost.values()),
        "lost_detail": {k: v[:5] for k, v in list(lost.items())[:10]},
        "zero_loss": not lost and not result.unpersisted,
    }
