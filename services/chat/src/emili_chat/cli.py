"""``emili chat``: a terminal conversation with the running chat service.

Face input: ``--video FILE`` (sampled at 1 frame/s, looping), ``--camera N``, or ``--simulate``
(scripted FER readings drifting between moods, for machines without a camera).

The participant's steps come around the chat, so a session made here is usable for training
(``emili_chat.participant``): consent (keep the face frames? use the conversation for training?), the
pre-chat survey, the chat (type ``/quit`` or press Ctrl-D to end it), the post-chat survey, the rating,
then the session ends. Options answer any of them beforehand for scripted use, e.g.
``--no-consent-training --feelings 4,2 --desired-feelings hopeful --pre-survey-text "..."
--post-feelings happy --post-survey-text "..." --rating 4,4,5``; ``--no-surveys`` skips the surveys and rating.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import cv2
import grpc
import typer
from rich.console import Console
from rich.markup import escape

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_chat.delete_cli import register as register_delete_commands
from emili_chat.participant import (
    Lines,
    NoAnswer,
    Preset,
    Survey,
    ask_consent,
    ask_post_survey,
    ask_pre_survey,
    ask_rating,
    parse_feelings,
    parse_rating,
)
from emili_chat.settings import ChatSettings
from emili_core.auth import create_token
from emili_core.grpc_client import make_channel
from emili_core.settings import TLSSettings, load_settings
from emili_session.emotions import EMOTIONS
from emili_session.surveys import CURRENT_FEELINGS, DESIRED_FEELINGS

app = typer.Typer(help="Talk to EMILI.", invoke_without_command=True)
register_delete_commands(app)  # emili chat delete-user / delete-session
console = Console()
SESSION_TOKEN_TTL_S = 6 * 3600


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


async def user_inputs(lines: Lines) -> AsyncIterator[chat_pb2.ConverseRequest]:
    while True:
        line = await lines.get()
        if line is None or line.strip() == "/quit":
            return
        if line.strip():
            yield chat_pb2.ConverseRequest(
                user_message=chat_pb2.UserMessage(text=line.strip(), client_time_ms=int(time.time() * 1000))
            )


async def requests(
    session_id: str, faces: AsyncIterator[chat_pb2.ConverseRequest], lines: Lines
) -> AsyncIterator[chat_pb2.ConverseRequest]:
    """User lines and face inputs merged into one stream; it ends when the user quits."""
    queue: asyncio.Queue[chat_pb2.ConverseRequest | None] = asyncio.Queue()

    async def pump(source: AsyncIterator[chat_pb2.ConverseRequest], final: bool) -> None:
        async for request in source:
            await queue.put(request)
        if final:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(user_inputs(lines), True)), asyncio.create_task(pump(faces, False))]
    yield chat_pb2.ConverseRequest(session_id=session_id)
    try:
        while (request := await queue.get()) is not None:
            yield request
        await asyncio.sleep(0.5)  # Let the last reply finish streaming before the stream half-closes.
    finally:
        for task in tasks:
            task.cancel()


def survey_message(survey: Survey) -> chat_pb2.Survey:
    return chat_pb2.Survey(
        current_feelings=survey.current_feelings, desired_feelings=survey.desired_feelings, text=survey.text
    )


async def chat_turns(
    stub: chat_pb2_grpc.ChatServiceStub,
    session_id: str,
    faces: AsyncIterator[chat_pb2.ConverseRequest],
    lines: Lines,
    show_readouts: bool,
) -> None:
    """The conversation itself: user lines and face inputs up, readouts and streamed replies down."""
    async for reply in stub.Converse(requests(session_id, faces, lines)):
        kind = reply.WhichOneof("event")
        if kind == "readout" and show_readouts:
            console.print(reply.readout.text, style="dim", markup=False)
        elif kind == "delta":
            console.print(reply.delta.text, end="", style="bold cyan", soft_wrap=True, markup=False)
        elif kind == "message":
            console.print("  [dim](unprompted)[/dim]" if reply.message.unprompted else "")


async def after_chat(stub: chat_pb2_grpc.ChatServiceStub, session_id: str, lines: Lines, preset: Preset) -> None:
    """The post-chat survey, then the rating; if input ends first, the rest is skipped (the session still ends)."""
    try:
        post = await ask_post_survey(console, lines, preset)
        await stub.SubmitPostSurvey(
            chat_pb2.SubmitPostSurveyRequest(session_id=session_id, survey=survey_message(post))
        )
        rating = await ask_rating(console, lines, preset)
        await stub.SubmitRating(
            chat_pb2.SubmitRatingRequest(session_id=session_id, comment=rating.comment, **rating.scores())
        )
    except NoAnswer:
        console.print("[yellow]input ended, so the remaining questions were skipped[/yellow]")


async def converse(
    target: str,
    token: str,
    arm: str,
    video: Path | None,
    camera: int | None,
    simulate: bool,
    show_readouts: bool,
    preset: Preset | None = None,
    surveys: bool = True,
    lines: Lines | None = None,
    tls: TLSSettings | None = None,
) -> str:
    """Consent, pre-chat survey, chat, post-chat survey, rating, EndSession; returns the session id."""
    preset = preset or Preset()
    lines = lines or Lines()
    # Asked before anything is created: leaving here leaves nothing behind.
    consent = await ask_consent(console, lines, preset, frames_sent=video is not None or camera is not None)
    pre = await ask_pre_survey(console, lines, preset) if surveys else None
    async with make_channel(target, token, tls=tls, timeout=60, stream_timeout=24 * 3600) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = chat_pb2.CreateSessionRequest(
            model_arm=arm,
            consent=chat_pb2.Consent(store_frames=consent.store_frames, use_for_training=consent.use_for_training),
        )
        session = (await stub.CreateSession(request)).session
        session_id: str = session.session_id
        end = chat_pb2.EndSessionRequest(session_id=session_id)
        try:
            if pre is not None:
                await stub.SubmitPreSurvey(
                    chat_pb2.SubmitPreSurveyRequest(session_id=session_id, survey=survey_message(pre))
                )
            console.print(f"[dim]session {session_id} with {session.model_id}; type /quit to end the chat[/dim]")
            await chat_turns(stub, session_id, face_inputs(video, camera, simulate), lines, show_readouts)
            if surveys:
                await after_chat(stub, session_id, lines, preset)
        except BaseException:
            # Interrupted (Ctrl-C) or failed: end the session anyway, so what was said is saved.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.EndSession(end)
            raise
        await stub.EndSession(end)
    use = "may be used for training" if consent.use_for_training else "will not be used for training"
    console.print(f"[dim]session {session_id} ended; its record is being saved to object storage ({use})[/dim]")
    return session_id


def _feelings_option(value: str | None, vocabulary: tuple[str, ...], option: str) -> list[str] | None:
    if value is None:
        return None
    try:
        return parse_feelings(value, vocabulary)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _choices(help: str) -> Any:
    return typer.Option(help=f"{help}: numbers or names, comma-separated ('' for none); asked when not given.")


def _text(help: str) -> Any:
    return typer.Option(help=f"{help} (free text); asked when not given.")


@app.callback()
def chat(
    ctx: typer.Context,
    video: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="Send frames from a video.")] = None,
    camera: Annotated[int | None, typer.Option(help="Send frames from camera N.")] = None,
    simulate: Annotated[bool, typer.Option(help="Send scripted FER readings instead of frames.")] = False,
    arm: Annotated[str, typer.Option(help="Model arm: 'base' or a model version id.")] = "",
    readouts: Annotated[bool, typer.Option(help="Show the readouts injected into the conversation.")] = True,
    target: Annotated[str | None, typer.Option(help="Chat server address (default from settings).")] = None,
    consent_frames: Annotated[
        bool | None,
        typer.Option(
            "--consent-frames/--no-consent-frames",
            help="Keep the face frames sent (only with --video or --camera); asked when not given.",
        ),
    ] = None,
    consent_training: Annotated[
        bool | None,
        typer.Option(
            "--consent-training/--no-consent-training",
            help="The conversation may be used for training (declining still allows the chat); asked when not given.",
        ),
    ] = None,
    surveys: Annotated[
        bool, typer.Option(help="Ask the pre- and post-chat surveys and the rating (a session for training).")
    ] = True,
    feelings: Annotated[str | None, _choices("Pre-chat: how you feel now")] = None,
    desired_feelings: Annotated[str | None, _choices("Pre-chat: how you would like to feel")] = None,
    pre_survey_text: Annotated[str | None, _text("Pre-chat: how you feel today, and why")] = None,
    post_feelings: Annotated[str | None, _choices("Post-chat: how you feel now")] = None,
    post_survey_text: Annotated[str | None, _text("Post-chat: how you feel after the chat")] = None,
    rating: Annotated[
        str | None, typer.Option(help="Empathy, relevance, fluency, each 1-5, e.g. 4,4,5; asked when not given.")
    ] = None,
    comment: Annotated[str | None, typer.Option(help="The rating's comment (none when --rating is given).")] = None,
) -> None:
    """A terminal chat with EMILI, with the participant's consent, surveys and rating around it."""
    if ctx.invoked_subcommand is not None:  # delete-user, delete-session: no chat.
        return
    if sum(x is not None and x is not False for x in (video, camera, simulate or None)) > 1:
        raise typer.BadParameter("choose one of --video, --camera and --simulate")
    try:
        scores = parse_rating(rating) if rating is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--rating") from None
    preset = Preset(
        consent_frames=consent_frames,
        consent_training=consent_training,
        feelings=_feelings_option(feelings, CURRENT_FEELINGS, "--feelings"),
        desired_feelings=_feelings_option(desired_feelings, DESIRED_FEELINGS, "--desired-feelings"),
        pre_text=pre_survey_text,
        post_feelings=_feelings_option(post_feelings, CURRENT_FEELINGS, "--post-feelings"),
        post_text=post_survey_text,
        rating=scores,
        comment=comment,
    )
    from emili_core.cli import CliSettings

    settings = load_settings(ChatSettings)
    cli_settings = load_settings(CliSettings)
    if cli_settings.token is not None:
        token = cli_settings.token.get_secret_value()
    else:
        # Long enough for the questions and a long chat: every call, EndSession included, carries it.
        secret = cli_settings.auth.secret.get_secret_value()
        token = create_token(
            secret, "cli-user", ["chat"], ttl_seconds=SESSION_TOKEN_TTL_S, issuer=cli_settings.auth.issuer
        )
    work = converse(
        target or settings.grpc_target(),
        token,
        arm,
        video,
        camera,
        simulate,
        readouts,
        preset,
        surveys,
        tls=settings.tls,
    )
    try:
        asyncio.run(work)
    except NoAnswer:
        console.print("[red]input ended before the questions were answered; no session was made[/red]")
        raise typer.Exit(1) from None
    except grpc.aio.AioRpcError as exc:
        console.print(f"[red]error:[/red] {exc.code().name}: {escape(exc.details() or '')}")
        raise typer.Exit(1) from None
