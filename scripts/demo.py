"""`make demo` until the end-to-end pipeline lands: drive what exists through the running local stack.

1. A live session: a stream of real face frames through FER StreamAnalyze, one reading per frame.
2. A stored session: the frames are uploaded to S3 and the `fer.analyze_session_frames` task runs on
   the FER worker through Redis, writing the session's FER time series back to S3.
3. A chat with EMILI: the same face frames go with the user's messages through the chat service,
   which injects readouts, answers with SmolLM2, and saves the session record to S3.
4. The labeler worker labels that session: VAD gold labels from the surveys, reaction flags per reply.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili.fer.v1 import fer_pb2, fer_pb2_grpc
from emili_chat.settings import ChatSettings
from emili_core.cli import CliSettings, client_token
from emili_core.grpc_client import make_channel
from emili_core.keys import frame_key, session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import REPO_ROOT, load_settings
from emili_core.tasks import create_celery_app
from emili_fer.settings import FerSettings

console = Console()
FACE = REPO_ROOT / "var" / "artifacts" / "samples" / "face_640x480.jpg"


def demo_frames(count: int = 8) -> list[bytes]:
    """The sample face, shifting and tilting a little, with a frame where the user looks away."""
    face = cv2.imread(str(FACE))
    if face is None:
        raise SystemExit(f"{FACE} is missing; run `make setup`")
    frames = []
    for i in range(count):
        if i == count // 2:
            image = np.full_like(face, 90)  # The user is out of view.
        else:
            matrix = cv2.getRotationMatrix2D((320, 240), (i - count / 2) * 2.0, 1.0)
            matrix[0, 2] += 6 * i
            image = cv2.warpAffine(face, matrix, (640, 480), borderMode=cv2.BORDER_REPLICATE)
        frames.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return frames


async def live_session(target: str, token: str, session_id: str, frames: list[bytes]) -> None:
    start_ms = int(time.time() * 1000)

    async def requests() -> AsyncIterator[fer_pb2.StreamAnalyzeRequest]:
        for i, data in enumerate(frames):
            yield fer_pb2.StreamAnalyzeRequest(
                session_id=session_id, capture_time_ms=start_ms + 1000 * i, sequence=i, frame=fer_pb2.Frame(data=data)
            )

    table = Table(title=f"live session {session_id}: FER StreamAnalyze")
    for column in ("t (s)", "face", "top emotion", "salience (0-100)", "server ms"):
        table.add_column(column)
    async with make_channel(target, token) as channel:
        async for reply in fer_pb2_grpc.FerServiceStub(channel).StreamAnalyze(requests()):
            reading = reply.reading
            scores = " ".join(f"{s.emotion}={s.salience}" for s in reading.scores if s.salience > 0)
            table.add_row(
                f"{(reply.capture_time_ms - start_ms) / 1000:.0f}",
                "yes" if reading.face_found else "no",
                reading.top_emotion or "-",
                scores or "-",
                f"{reading.timings.total_ms:.1f}",
            )
    console.print(table)


def stored_session(settings: CliSettings, session_id: str, frames: list[bytes]) -> None:
    store = ObjectStore(settings.s3)
    store.ensure_buckets()
    start_ms = int(time.time() * 1000)
    for i, data in enumerate(frames):
        store.put_bytes(Bucket.FRAMES, frame_key(session_id, start_ms + 1000 * i), data, content_type="image/jpeg")
    app = create_celery_app("demo", settings)
    console.print(f"enqueued fer.analyze_session_frames for {session_id} on queue 'fer'")
    result = app.send_task("fer.analyze_session_frames", args=[session_id]).get(timeout=120)
    console.print_json(json.dumps(result))
    first = store.get_bytes(Bucket.SESSIONS, str(result["key"])).decode().splitlines()[0]
    console.print(f"first record of s3://{store.bucket(Bucket.SESSIONS)}/{result['key']}:")
    console.print_json(first)


async def chat_session(target: str, token: str, frames: list[bytes], store: ObjectStore) -> str:
    lines = ["Hi EMILI! I finally finished my thesis today.", "I think I will sleep for a week."]
    async with make_channel(target, token, timeout=120) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        session = (
            await stub.CreateSession(
                chat_pb2.CreateSessionRequest(consent=chat_pb2.Consent(store_frames=False, use_for_training=True))
            )
        ).session
        await stub.SubmitPreSurvey(
            chat_pb2.SubmitPreSurveyRequest(
                session_id=session.session_id,
                survey=chat_pb2.Survey(
                    current_feelings=["Tired"], desired_feelings=["Proud"], text="Tired but relieved."
                ),
            )
        )
        answered = asyncio.Event()

        async def requests() -> AsyncIterator[chat_pb2.ConverseRequest]:
            yield chat_pb2.ConverseRequest(session_id=session.session_id)
            for line in lines:
                for data in frames[:3]:
                    capture = int(time.time() * 1000)
                    yield chat_pb2.ConverseRequest(frame=chat_pb2.FaceFrame(jpeg=data, capture_time_ms=capture))
                    await asyncio.sleep(0.4)
                answered.clear()
                console.print(f"[bold]user:[/bold] {line}")
                yield chat_pb2.ConverseRequest(user_message=chat_pb2.UserMessage(text=line))
                await answered.wait()

        console.rule(f"chat session {session.session_id} ({session.model_id})")
        async for reply in stub.Converse(requests()):
            kind = reply.WhichOneof("event")
            if kind == "readout":
                console.print(f"[dim]{reply.readout.text}[/dim]")
            elif kind == "message":
                console.print(f"[bold cyan]EMILI:[/bold cyan] {reply.message.text}")
                answered.set()
        await stub.SubmitPostSurvey(
            chat_pb2.SubmitPostSurveyRequest(session_id=session.session_id, survey=chat_pb2.Survey(text="Proud."))
        )
        await stub.SubmitRating(
            chat_pb2.SubmitRatingRequest(session_id=session.session_id, empathy=4, relevance=4, fluency=5)
        )
        await stub.EndSession(chat_pb2.EndSessionRequest(session_id=session.session_id))
    key = session_record_keys(session.session_id)["session.json"]
    for _ in range(60):
        if store.exists(Bucket.SESSIONS, key):
            manifest = store.get_json(Bucket.SESSIONS, key)
            console.print(
                f"session record: s3://{store.bucket(Bucket.SESSIONS)}/{session.session_id}/ {manifest['counts']}"
            )
            return str(session.session_id)
        await asyncio.sleep(1)
    raise SystemExit("the session record did not reach object storage within a minute; see var/log/chat-worker.log")


def label_session(settings: CliSettings, session_id: str) -> None:
    """The labeler worker turns the recorded session into VAD gold labels and reaction flags."""
    app = create_celery_app("demo", settings)
    label = app.send_task("labeler.label_session", args=[session_id]).get(timeout=600)
    gold = label["gold"]
    table = Table(title=f"labels of {session_id} (lexicon {gold['lexicon']})")
    for column in ("", "valence", "arousal", "dominance"):
        table.add_column(column)
    for name in ("pre", "post", "delta"):
        values = gold[name]
        table.add_row(name, *(f"{values[d]:+.3f}" if values else "-" for d in ("valence", "arousal", "dominance")))
    console.print(table)
    for turn in label["turns"]:
        delta = "no face data" if turn["delta"] is None else f"reaction delta {turn['delta']:+.1f}"
        console.print(f"turn {turn['turn_id']}: {'flagged' if turn['flagged'] else 'not flagged'} ({delta})")


def main() -> None:
    settings = load_settings(CliSettings)
    target = load_settings(FerSettings).grpc_target()
    session_id = f"demo-{uuid.uuid4().hex[:8]}"
    frames = demo_frames()
    asyncio.run(live_session(target, client_token(settings, "fer", subject="demo-client"), session_id, frames))
    stored_session(settings, session_id, frames)
    chat_target = load_settings(ChatSettings).grpc_target()
    chat_token = client_token(settings, "chat", subject="demo-user")
    chat_id = asyncio.run(chat_session(chat_target, chat_token, frames, ObjectStore(settings.s3)))
    label_session(settings, chat_id)
    console.print("[bold]Training, evaluation and the full pipeline arrive with issues #6 and #7.[/bold]")


if __name__ == "__main__":
    main()
