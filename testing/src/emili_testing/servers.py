"""Real gRPC servers for tests of what talks to chat (the gateway, simulated participants): chat with a scripted
model and a FER stand-in, started in a :class:`~emili_testing.loop.BackgroundLoop` so synchronous test code (a
TestClient, a uvicorn thread) reaches them over real sockets.

The FER stand-in answers Analyze and StreamAnalyze without a model: a face is "found" (happy) unless the frame's
bytes contain ``NOFACE``. The real FER service needs its ONNX model and would only slow these tests down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc

from emili.fer.v1 import fer_pb2, fer_pb2_grpc
from emili_chat.llm import ChatBackend
from emili_chat.main import build_app as build_chat_app
from emili_chat.settings import ChatSettings
from emili_core.grpc_server import ServiceApp, start_server
from emili_core.objectstore import ObjectStore
from emili_core.settings import AuthSettings, CommonSettings, S3Settings, ServerSettings
from emili_testing.loop import BackgroundLoop
from emili_testing.plugin import TEST_SECRET

BackendT = TypeVar("BackendT", bound=ChatBackend)
FER_SERVICE = fer_pb2.DESCRIPTOR.services_by_name["FerService"].full_name
NO_FACE_MARK = b"NOFACE"


STAND_IN_PROBABILITIES = {
    "angry": 0.02,
    "disgust": 0.01,
    "fear": 0.02,
    "happy": 0.6,
    "sad": 0.05,
    "surprise": 0.1,
    "neutral": 0.2,
}


def stand_in_reading(data: bytes) -> fer_pb2.Reading:
    if NO_FACE_MARK in data:
        return fer_pb2.Reading(face_found=False, face_count=0, model_id="stand-in")
    scores = [
        fer_pb2.EmotionScore(emotion=e, probability=p, salience=round(p * 100))
        for e, p in STAND_IN_PROBABILITIES.items()
    ]
    return fer_pb2.Reading(face_found=True, face_count=1, scores=scores, top_emotion="happy", model_id="stand-in")


class FerStandIn(fer_pb2_grpc.FerServiceServicer):
    """FER without a model; counts what it was asked."""

    def __init__(self) -> None:
        self.analyzed = 0
        self.streamed = 0

    async def Analyze(self, request: fer_pb2.AnalyzeRequest, context: grpc.aio.ServicerContext) -> Any:
        self.analyzed += 1
        return fer_pb2.AnalyzeResponse(reading=stand_in_reading(request.frame.data))

    async def AnalyzeBatch(self, request: fer_pb2.AnalyzeBatchRequest, context: grpc.aio.ServicerContext) -> Any:
        self.analyzed += len(request.frames)
        items = [fer_pb2.BatchItem(reading=stand_in_reading(frame.data)) for frame in request.frames]
        return fer_pb2.AnalyzeBatchResponse(items=items)

    async def GetModelInfo(self, request: fer_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> Any:
        return fer_pb2.GetModelInfoResponse(model_id="stand-in", labels=list(STAND_IN_PROBABILITIES))

    async def StreamAnalyze(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in request_iterator:
            self.streamed += 1
            yield fer_pb2.StreamAnalyzeResponse(
                session_id=request.session_id,
                capture_time_ms=request.capture_time_ms,
                sequence=request.sequence,
                reading=stand_in_reading(request.frame.data),
            )


@dataclass
class ChatAndFer(Generic[BackendT]):
    chat_target: str
    fer_target: str
    fer: FerStandIn
    backend: BackendT


@contextmanager
def chat_and_fer(
    redis_url: str,
    s3_settings: S3Settings,
    artifacts_dir: Path,
    backend: BackendT,
    chat_options: Callable[[Any], dict[str, Any]] | None = None,
) -> Iterator[ChatAndFer[BackendT]]:
    """A running chat server (``backend`` as its model, readings right after each reply) and FER stand-in, stopped
    on exit; ``chat_options`` maps chat's default options to updates of them (e.g. its survey vocabularies)."""
    loop = BackgroundLoop()
    fer = FerStandIn()
    auth = AuthSettings(secret=TEST_SECRET)  # type: ignore[arg-type]
    ObjectStore(s3_settings).ensure_buckets()

    async def start() -> tuple[Any, Any]:
        fer_app = ServiceApp(
            name="fer",
            service_names=[FER_SERVICE],
            register=lambda server: fer_pb2_grpc.add_FerServiceServicer_to_server(fer, server),
        )
        fer_server = await start_server(fer_app, CommonSettings(auth=auth), ServerSettings(grpc_port=0, metrics_port=0))
        settings = ChatSettings(env="test", redis_url=redis_url, s3=s3_settings, auth=auth, artifacts_dir=artifacts_dir)
        options = settings.chat.model_copy(
            update={
                "server": settings.chat.server.model_copy(update={"grpc_port": 0, "metrics_port": 0}),
                "readout": settings.chat.readout.model_copy(update={"post_response_reading_s": 0.0}),
                "fer_target": f"127.0.0.1:{fer_server.port}",
                **(chat_options(settings.chat) if chat_options else {}),
            }
        )
        settings = settings.model_copy(update={"chat": options})
        chat_server = await start_server(build_chat_app(settings, backend), settings, options.server)
        await asyncio.wait_for(asyncio.gather(fer_server.ready.wait(), chat_server.ready.wait()), 60)
        return fer_server, chat_server

    fer_server, chat_server = loop.run(start())
    try:
        yield ChatAndFer(f"127.0.0.1:{chat_server.port}", f"127.0.0.1:{fer_server.port}", fer, backend)
    finally:
        loop.run(chat_server.stop())
        loop.run(fer_server.stop())
        loop.close()
