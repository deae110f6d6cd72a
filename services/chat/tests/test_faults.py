"""Fault handling without Redis or FER processes: the FER stream's reconnects, the store's retries, lost replies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio as aioredis

from emili.fer.v1 import fer_pb2, fer_pb2_grpc
from emili_chat.conversation import unanswered_message
from emili_chat.fer_client import FaceReading, FerStream
from emili_chat.store import SessionStore
from emili_core.errors import DependencyUnavailable
from emili_session.events import Event, EventKind
from emili_testing.plugin import free_port


def ev(kind: EventKind, **payload: Any) -> Event:
    return Event("1-0", kind, 0, payload)


def test_an_unanswered_message_is_the_last_user_message_without_a_reply() -> None:
    user, reply = ev(EventKind.USER_MESSAGE, text="hi"), ev(EventKind.ASSISTANT_MESSAGE, text="hello", turn_id="t")
    unprompted = ev(EventKind.ASSISTANT_MESSAGE, text="oh!", turn_id="u", unprompted=True)
    readout = ev(EventKind.READOUT_INJECTED, text="Right now, user looks HAPPY (90)")
    assert unanswered_message([]) is None
    assert unanswered_message([user, reply]) is None
    assert unanswered_message([user, reply, readout, user]) is user
    assert unanswered_message([user, unprompted]) is user  # Speaking unprompted does not answer it.
    assert unanswered_message([reply, readout]) is None


class FakeFer(fer_pb2_grpc.FerServiceServicer):
    """Answers every frame with a happy face."""

    async def StreamAnalyze(
        self, request_iterator: AsyncIterator[fer_pb2.StreamAnalyzeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fer_pb2.StreamAnalyzeResponse]:
        async for request in request_iterator:
            yield fer_pb2.StreamAnalyzeResponse(
                session_id=request.session_id,
                capture_time_ms=request.capture_time_ms,
                sequence=request.sequence,
                reading=fer_pb2.Reading(face_found=True, scores=[fer_pb2.EmotionScore(emotion="happy", probability=1)]),
            )


async def fake_fer(port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    fer_pb2_grpc.add_FerServiceServicer_to_server(FakeFer(), server)  # type: ignore[abstract]
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    return server


async def until(check: Any, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_fer_stream_reconnects_after_a_restart_and_reports_the_gap() -> None:
    port = free_port()
    server = await fake_fer(port)
    readings: list[FaceReading] = []
    gaps: list[tuple[str, int, Any]] = []

    async def on_reading(reading: FaceReading) -> None:
        readings.append(reading)

    async def on_unavailable(since_ms: int, error: str) -> None:
        gaps.append(("down", since_ms, error))

    async def on_restored(restored_ms: int, reconnects: int) -> None:
        gaps.append(("up", restored_ms, reconnects))

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stream = FerStream(
        channel,
        "s1",
        on_reading,
        on_unavailable=on_unavailable,
        on_restored=on_restored,
        reconnect_initial_s=0.05,
        reconnect_max_s=0.2,
    )
    sending = True

    async def frames() -> None:
        while sending:
            stream.send(b"jpeg", int(time.time() * 1000))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(frames())
    try:
        await until(lambda: len(readings) >= 3)
        assert stream.available and gaps == []
        await server.stop(None)
        await until(lambda: not stream.available)
        stopped_ms = int(time.time() * 1000)
        await asyncio.sleep(0.5)  # Several failed reconnects; one gap.
        assert [g[0] for g in gaps] == ["down"] and gaps[0][1] <= stopped_ms and "UNAVAILABLE" in gaps[0][2]
        before = len(readings)
        server = await fake_fer(port)
        await until(lambda: stream.available and len(readings) > before)
        assert [g[0] for g in gaps] == ["down", "up"] and gaps[1][1] >= gaps[0][1] and gaps[1][2] >= 1
    finally:
        sending = False
        await sender
        await stream.close()
        await channel.close()
        await server.stop(None)


async def test_event_writes_are_retried_briefly_then_fail() -> None:
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")  # Nothing listens there.
    store = SessionStore(client, retry_s=0.3, retry_initial_s=0.05)
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable, match="Redis unavailable while trying to record a user_message"):
        await store.append("s1", EventKind.USER_MESSAGE, {"text": "hi"})
    assert 0.25 <= time.monotonic() - started < 5

    failures = 2

    async def flaky(**_: Any) -> bytes:
        nonlocal failures
        if failures:
            failures -= 1
            raise redis.ConnectionError("Connection reset by peer")
        return b"5-0"

    store._append = flaky  # type: ignore[assignment,method-assign]
    event = await store.append("s1", EventKind.USER_MESSAGE, {"text": "hi"})
    assert event.event_id == "5-0" and failures == 0
    await client.aclose()
