"""``emili chat``: a terminal conversation with the running chat service.

Face input: ``--video FILE`` (sampled at 1 frame/s, looping), ``--camera N``, or ``--simulate``
(scripted FER readings drifting between moods, for machines without a camera). Type ``/quit`` or
press Ctrl-D to end the session.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import cv2
import typer
from rich.console import Console

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_chat.readout import EMOTIONS
from emili_chat.settings import ChatSettings
from emili_core.grpc_client import make_channel
from emili_core.settings import load_settings

app = typer.Typer(help="Talk to EMILI.", invoke_without_command=True)
console = Console()


def simulated_reading(t: float) -> chat_pb2.FerReading:
    """A face that drifts from neutral to happy to sad and back over about a minute."""
    happy = max(0.0, math.sin(t / 10.0)) * 0.7
    sad = max(0.0, -math.sin(t / 10.0)) * 0.6
    raw = {"angry": 0.02, "disgust": 0.01, "fear": 0.03, "happy": happy, "sad": sad, "surprise": 0.04}
    raw["neutral"] = max(0.05, 1.0 - sum(raw.values()))
    total = sum(raw.values())
    return chat_pb2.FerReading(
        face_found=True, probabilities={e: raw[e] / total for e in EMOTIONS}, capture_time_ms=int(time.time() * 1000)
    )


async def face_inputs(
    video: Path | None, camera: int | None, simulate: bool
) -> AsyncIterator[chat_pb2.ConverseRequest]:
    if simulate:
        started = time.time()
        while True:
            yield chat_pb2.ConverseRequest(reading=simulated_reading(time.time() - started))
            await asyncio.sleep(1.0)
    if video is None and camera is None:
        return
    capture = cv2.VideoCapture(str(video) if video is not None else camera)  # type: ignore[arg-type]
    if not capture.isOpened():
        raise typer.BadParameter(f"cannot open {'video ' + str(video) if video else f'camera {camera}'}")
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    try:
        while True:
            ok, image = capture.read()
            if not ok and video is not None:
                capture.set(cv2.CAP_PROP_POS_FRAMES, 0)  # Loop the file.
                continue
            if not ok:
                raise typer.BadParameter(f"camera {camera} stopped delivering frames")
            jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
            yield chat_pb2.ConverseRequest(frame=chat_pb2.FaceFrame(jpeg=jpeg, capture_time_ms=int(time.time() * 1000)))
            if video is not None:
                for _ in range(max(0, int(fps) - 1)):  # Skip ahead one second of video.
                    capture.grab()
            await asyncio.sleep(1.0)
    finally:
        capture.release()


async def user_inputs() -> AsyncIterator[chat_pb2.ConverseRequest]:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "/quit":
            return
        if line.strip():
            yield chat_pb2.ConverseRequest(
                user_message=chat_pb2.UserMessage(text=line.strip(), client_time_ms=int(time.time() * 1000))
            )


async def requests(
    session_id: str, faces: AsyncIterator[chat_pb2.ConverseRequest]
) -> AsyncIterator[chat_pb2.ConverseRequest]:
    """User lines and face inputs merged into one stream; it ends when the user quits."""
    queue: asyncio.Queue[chat_pb2.ConverseRequest | None] = asyncio.Queue()

    async def pump(source: AsyncIterator[chat_pb2.ConverseRequest], final: bool) -> None:
        async for request in source:
            await queue.put(request)
        if final:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(user_inputs(), True)), asyncio.create_task(pump(faces, False))]
    yield chat_pb2.ConverseRequest(session_id=session_id)
    try:
        while (request := await queue.get()) is not None:
            yield request
        await asyncio.sleep(0.5)  # Let the last reply finish streaming before the stream half-closes.
    finally:
        for task in tasks:
            task.cancel()


async def converse(
    target: str, token: str, arm: str, video: Path | None, camera: int | None, simulate: bool, show_readouts: bool
) -> None:
    async with make_channel(target, token, timeout=60, stream_timeout=24 * 3600) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        session = (await stub.CreateSession(chat_pb2.CreateSessionRequest(model_arm=arm))).session
        console.print(f"[dim]session {session.session_id} with {session.model_id}; type /quit to end[/dim]")
        async for reply in stub.Converse(requests(session.session_id, face_inputs(video, camera, simulate))):
            kind = reply.WhichOneof("event")
            if kind == "readout" and show_readouts:
                console.print(f"[dim]{reply.readout.text}[/dim]")
            elif kind == "delta":
                console.print(reply.delta.text, end="", style="bold cyan", soft_wrap=True)
            elif kind == "message":
                console.print("  [dim](unprompted)[/dim]" if reply.message.unprompted else "")
        ended = (await stub.EndSession(chat_pb2.EndSessionRequest(session_id=session.session_id))).session
        console.print(f"[dim]session {ended.session_id} ended; its record is being saved to object storage[/dim]")


@app.callback()
def chat(
    video: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="Send frames from a video.")] = None,
    camera: Annotated[int | None, typer.Option(help="Send frames from camera N.")] = None,
    simulate: Annotated[bool, typer.Option(help="Send scripted FER readings instead of frames.")] = False,
    arm: Annotated[str, typer.Option(help="Model arm: 'base' or a model version id.")] = "",
    readouts: Annotated[bool, typer.Option(help="Show the readouts injected into the conversation.")] = True,
    target: Annotated[str | None, typer.Option(help="Chat server address (default from settings).")] = None,
) -> None:
    """A terminal chat with EMILI."""
    if sum(x is not None and x is not False for x in (video, camera, simulate or None)) > 1:
        raise typer.BadParameter("choose one of --video, --camera and --simulate")
    from emili_core.cli import CliSettings, client_token

    settings = load_settings(ChatSettings)
    token = client_token(load_settings(CliSettings), "chat", subject="cli-user")
    asyncio.run(converse(target or settings.grpc_target(), token, arm, video, camera, simulate, readouts))
