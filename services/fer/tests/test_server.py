"""The FER gRPC API through a real in-process server with the real model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emili.fer.v1 import fer_pb2, fer_pb2_grpc
from emili_core.grpc_client import make_channel
from emili_core.grpc_server import RunningServer, start_server
from emili_fer.main import SERVICE_NAME, build_app
from emili_fer.settings import FerSettings
from emili_testing.plugin import TEST_SECRET, token

from .conftest import artifacts_dir


def _settings(**fer: object) -> FerSettings:
    settings = FerSettings(auth={"secret": TEST_SECRET}, artifacts_dir=artifacts_dir())
    options = settings.fer.model_copy(update={"server": settings.fer.server.model_copy(update={"grpc_port": 0}), **fer})
    return settings.model_copy(update={"fer": options})


async def _start(settings: FerSettings) -> RunningServer:
    return await start_server(build_app(settings), settings, settings.fer.server)


@pytest.fixture
async def fer_server() -> AsyncIterator[str]:
    running = await _start(_settings())
    await asyncio.wait_for(running.ready.wait(), 60)
    yield f"127.0.0.1:{running.port}"
    await running.stop()


async def _health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        return int(reply.status)


async def test_serving_and_model_info(fer_server: str) -> None:
    assert await _health(fer_server) == health_pb2.HealthCheckResponse.SERVING
    async with make_channel(fer_server, token(["fer"])) as channel:
        info = await fer_pb2_grpc.FerServiceStub(channel).GetModelInfo(fer_pb2.GetModelInfoRequest())
    assert info.model_id == "mini-xception-fer2013-v1"
    assert list(info.labels) == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert "CPUExecutionProvider" in info.execution_providers


async def test_analyze_a_real_face(fer_server: str, face_jpeg: bytes) -> None:
    async with make_channel(fer_server, token(["fer"])) as channel:
        reply = await fer_pb2_grpc.FerServiceStub(channel).Analyze(
            fer_pb2.AnalyzeRequest(frame=fer_pb2.Frame(data=face_jpeg))
        )
    reading = reply.reading
    assert reading.face_found and reading.top_emotion == "happy"
    assert [s.emotion for s in reading.scores][3] == "happy" and reading.scores[3].salience >= 90
    assert reading.timings.total_ms > 0 and reading.box.height > 100


async def test_bad_frame_is_invalid_argument(fer_server: str) -> None:
    async with make_channel(fer_server, token(["fer"])) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await fer_pb2_grpc.FerServiceStub(channel).Analyze(fer_pb2.AnalyzeRequest(frame=fer_pb2.Frame(data=b"")))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in (exc.value.details() or "")


async def test_batch_keeps_order_with_per_item_errors(fer_server: str, face_jpeg: bytes) -> None:
    frames = [
        fer_pb2.Frame(data=face_jpeg),
        fer_pb2.Frame(data=b"garbage"),
        fer_pb2.Frame(data=bytes(16), format=fer_pb2.FRAME_FORMAT_RAW_GRAY8, width=4, height=4),
        fer_pb2.Frame(data=face_jpeg[:1000]),
    ]
    async with make_channel(fer_server, token(["fer"])) as channel:
        reply = await fer_pb2_grpc.FerServiceStub(channel).AnalyzeBatch(fer_pb2.AnalyzeBatchRequest(frames=frames))
    kinds = [item.WhichOneof("result") for item in reply.items]
    assert kinds == ["reading", "error", "reading", "error"]
    assert reply.items[0].reading.face_found and not reply.items[2].reading.face_found
    assert reply.items[1].error.code == "INVALID_ARGUMENT" and "not a JPEG or PNG" in reply.items[1].error.message
    assert "truncated" in reply.items[3].error.message


async def test_streaming_session(fer_server: str, face_jpeg: bytes) -> None:
    async def frames() -> AsyncIterator[fer_pb2.StreamAnalyzeRequest]:
        for i in range(6):
            data = face_jpeg if i != 3 else b"broken"
            yield fer_pb2.StreamAnalyzeRequest(
                session_id="s-1",
                capture_time_ms=1_700_000_000_000 + 1000 * i,
                sequence=i,
                frame=fer_pb2.Frame(data=data),
            )

    async with make_channel(fer_server, token(["fer"])) as channel:
        replies = [r async for r in fer_pb2_grpc.FerServiceStub(channel).StreamAnalyze(frames())]
    assert [r.sequence for r in replies] == list(range(6))
    assert all(r.session_id == "s-1" for r in replies)
    assert [r.capture_time_ms - 1_700_000_000_000 for r in replies] == [1000 * i for i in range(6)]
    assert replies[3].WhichOneof("result") == "error"  # One bad frame does not end the session.
    assert all(r.reading.top_emotion == "happy" for i, r in enumerate(replies) if i != 3)


async def test_token_is_required_and_scoped(fer_server: str, face_jpeg: bytes) -> None:
    request = fer_pb2.AnalyzeRequest(frame=fer_pb2.Frame(data=face_jpeg))
    async with grpc.aio.insecure_channel(fer_server) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await fer_pb2_grpc.FerServiceStub(channel).Analyze(request, timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with make_channel(fer_server, token(["chat"])) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await fer_pb2_grpc.FerServiceStub(channel).Analyze(request)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_oversized_batch_is_refused(fer_server: str) -> None:
    frames = [fer_pb2.Frame(data=b"x")] * 300
    async with make_channel(fer_server, token(["fer"])) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await fer_pb2_grpc.FerServiceStub(channel).AnalyzeBatch(fer_pb2.AnalyzeBatchRequest(frames=frames))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 256" in (
        exc.value.details() or ""
    )


async def test_gpu_configured_without_gpu_never_serves() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    running = await _start(_settings(device="cuda"))
    try:
        assert running.startup_task is not None
        with pytest.raises(Exception, match="configured for CUDA"):
            await asyncio.wait_for(running.startup_task, 60)
        assert await _health(f"127.0.0.1:{running.port}") == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await running.stop()


async def test_a_batch_over_the_pixel_budget_is_refused_before_decoding(fer_server: str) -> None:
    """64 blank 4096x4096 PNGs (a few MB on the wire, each under the per-frame limit) would take seconds of CPU
    to decode; their headers alone put the request over the budget, so it is refused at once."""
    ok, encoded = cv2.imencode(".png", np.zeros((4096, 4096), np.uint8))
    assert ok
    frames = [fer_pb2.Frame(data=encoded.tobytes())] * 64
    async with make_channel(fer_server, token(["fer"])) as channel:
        stub = fer_pb2_grpc.FerServiceStub(channel)
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.AnalyzeBatch(fer_pb2.AnalyzeBatchRequest(frames=frames))
        elapsed = time.perf_counter() - started
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = exc.value.details() or ""
    assert f"over {64 * 1280 * 720} pixels, the per-request budget" in details and "64 frames of 1280x720" in details
    assert elapsed < 2.0, elapsed  # Decoding them would take seconds.
