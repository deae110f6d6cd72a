"""Simulated users driving the chat gRPC API exactly as a client app does.

Per user (:func:`run_user`): ``CreateSession`` (consent, model arm, ``synthetic=True``), ``SubmitPreSurvey``,
one ``Converse`` stream carrying face input at ``frames_per_second`` (frames from a face set, or FER
readings sampled from the hidden state) and ``turns`` user messages, each sent once the previous reply
is complete and ``seconds_between_turns`` have passed; then ``SubmitPostSurvey``, ``SubmitRating`` and
``EndSession``. Every acknowledged event is kept in the :class:`SessionOutcome` (the accepted user message
ids and every assistant turn id), so a load test can check that the stored record lost none of them
(:func:`lost_events`). A failed call is recorded in ``errors`` and the session is still ended.

:func:`run_users` runs N users, at most ``concurrency`` at a time, over one shared channel; each user
has its own subject (and token), persona and seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from pydantic import BaseModel, Field

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_core.grpc_client import make_channel
from emili_core.settings import TLSSettings
from emili_pipeline.simulator.faces import FaceModelSettings, FaceSet, load_face_set
from emili_pipeline.simulator.personas import Persona
from emili_pipeline.simulator.state import ReplyScorer, StateModelSettings, reply_quality
from emili_pipeline.simulator.user import Feedback, SimulatedUser
from emili_session.events import EventKind

log = logging.getLogger(__name__)

RATING_NAMES = ("empathy", "relevance", "fluency")


class SimulatorSettings(BaseModel):
    """One simulated session's shape; ``EMILI_PIPELINE__SIMULATOR__<FIELD>``."""

    turns: int = Field(3, ge=1, le=200)  # User messages per session.
    seconds_between_turns: float = Field(2.0, ge=0)  # After a reply is complete, before the next message.
    frames_per_second: float = Field(1.0, ge=0, le=30)  # Face inputs per second; 0 = the user is never visible.
    model_arm: str = ""  # "base", a model version id, or "" for the server's default.
    faces: Path | None = None  # Class folders or an NPZ of labelled faces; None = send FER readings.
    store_frames: bool = False  # Consent: keep the frames in object storage.
    use_for_training: bool = True  # Consent: the session may be labelled and used for training.
    linger_s: float = Field(0.0, ge=0)  # Face input kept on after the last reply (post-response readings).
    # What the face shows: the user's state ("state"), or noise unrelated to the replies (simulation studies).
    feedback: Feedback = "state"
    rpc_timeout_s: float = Field(30.0, gt=0)
    reply_timeout_s: float = Field(300.0, gt=0)  # A complete reply, from sending the message.
    subject_prefix: str = Field("sim", pattern=r"^[A-Za-z0-9._-]{1,32}$")
    state: StateModelSettings = StateModelSettings()
    face: FaceModelSettings = FaceModelSettings()
    # How to reach chat over TLS: the process's ``EMILI_TLS__*`` (PipelineSettings copies them here).
    tls: TLSSettings | None = Field(None, exclude=True)


@dataclass
class TurnResult:
    user_text: str
    event_id: str = ""  # UserMessageAccepted.event_id: the user message's id in the event log.
    turn_id: str = ""  # The reply's turn id (in the assistant_message event's payload).
    reply: str = ""
    ttft_s: float | None = None  # From sending the message to the reply's first token, client side.
    reply_s: float | None = None  # From sending the message to the complete reply.
    quality: float | None = None
    valence_after: float | None = None
    arousal_after: float | None = None


@dataclass
class SessionOutcome:
    persona_id: str
    seed: int
    user_id: str = ""
    session_id: str = ""
    model_id: str = ""
    turns: list[TurnResult] = field(default_factory=list)
    accepted_event_ids: list[str] = field(default_factory=list)
    assistant_turn_ids: list[str] = field(default_factory=list)  # Every assistant turn, unprompted ones too.
    unprompted_turn_ids: list[str] = field(default_factory=list)
    readouts: int = 0
    readings_sent: int = 0
    frames_sent: int = 0
    start_state: dict[str, float] = field(default_factory=dict)
    end_state: dict[str, float] = field(default_factory=dict)
    ratings: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.session_id) and not self.errors

    @property
    def ttft_s(self) -> list[float]:
        return [t.ttft_s for t in self.turns if t.ttft_s is not None]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def _rpc_error(step: str, exc: grpc.aio.AioRpcError) -> str:
    return f"{step}: {exc.code().name}: {exc.details()}"


def _survey(answers: Any) -> chat_pb2.Survey:
    return chat_pb2.Survey(
        current_feelings=answers.current_feelings, desired_feelings=answers.desired_feelings, text=answers.text
    )


def _state(user: SimulatedUser, which: str) -> dict[str, float]:
    state = user.state.start if which == "start" else user.state.current
    return {"valence": state.valence, "arousal": state.arousal, "dominance": state.dominance}


class TurnTracker:
    """A conversation's turn bookkeeping, whatever carries it (gRPC here, the gateway's WebSocket in
    :mod:`~emili_pipeline.simulator.gateway_participant`): each server event updates the outcome and the turn in
    progress, with first-token and whole-reply times measured from when its message was sent."""

    def __init__(self, user: SimulatedUser, outcome: SessionOutcome) -> None:
        self.user, self.outcome = user, outcome
        self.current: TurnResult | None = None
        self.sent_at = 0.0
        self.awaiting_first_token = False

    def start_turn(self, turn: int) -> str:
        """The user's ``turn``-th message, now being sent."""
        self.current = TurnResult(self.user.message(turn))
        self.outcome.turns.append(self.current)
        self.sent_at = time.perf_counter()
        return self.current.user_text

    def accepted(self, event_id: str) -> None:
        self.outcome.accepted_event_ids.append(event_id)
        if self.current is not None and not self.current.event_id:
            self.current.event_id = event_id
            self.awaiting_first_token = True  # The next reply's tokens answer this message.

    def delta(self) -> None:
        if self.awaiting_first_token and self.current is not None:
            self.current.ttft_s = time.perf_counter() - self.sent_at
            self.awaiting_first_token = False

    def readout(self) -> None:
        self.outcome.readouts += 1

    def message(self, turn_id: str, text: str, unprompted: bool) -> bool:
        """A complete assistant message, which the user hears; True when it answers the turn in progress."""
        self.outcome.assistant_turn_ids.append(turn_id)
        quality, state = self.user.hear(text)
        if unprompted:
            self.outcome.unprompted_turn_ids.append(turn_id)
            return False
        if self.current is not None:
            self.current.turn_id, self.current.reply = turn_id, text
            self.current.reply_s = time.perf_counter() - self.sent_at
            self.current.quality, self.current.valence_after = quality.score, state.valence
            self.current.arousal_after = state.arousal
        return True


class _Conversation:
    """One Converse stream: a face loop, a reader of the server's events, and the turn driver."""

    def __init__(
        self,
        stub: chat_pb2_grpc.ChatServiceStub,
        user: SimulatedUser,
        outcome: SessionOutcome,
        settings: SimulatorSettings,
        faces: FaceSet | None,
        metadata: tuple[tuple[str, str], ...] | None,
    ) -> None:
        self.stub, self.user, self.outcome, self.settings, self.faces = stub, user, outcome, settings, faces
        self.metadata = metadata
        self.outbox: asyncio.Queue[chat_pb2.ConverseRequest | None] = asyncio.Queue()
        self.replies: asyncio.Queue[chat_pb2.AssistantMessage] = asyncio.Queue()
        self.tracker = TurnTracker(user, outcome)

    async def _requests(self) -> AsyncIterator[chat_pb2.ConverseRequest]:
        yield chat_pb2.ConverseRequest(session_id=self.outcome.session_id)
        while (request := await self.outbox.get()) is not None:
            yield request

    async def _face_loop(self) -> None:
        if self.settings.frames_per_second <= 0:
            return
        loop = asyncio.get_running_loop()
        period, due = 1.0 / self.settings.frames_per_second, loop.time()
        while True:
            captured = int(time.time() * 1000)
            if self.faces is not None:
                _, image = self.user.frame(self.faces)
                request = chat_pb2.ConverseRequest(frame=chat_pb2.FaceFrame(jpeg=image, capture_time_ms=captured))
                self.outcome.frames_sent += 1
            else:
                reading = self.user.reading()
                request = chat_pb2.ConverseRequest(
                    reading=chat_pb2.FerReading(
                        face_found=reading.face_found, probabilities=reading.probabilities, capture_time_ms=captured
                    )
                )
                self.outcome.readings_sent += 1
            await self.outbox.put(request)
            due += period
            await asyncio.sleep(max(0.0, due - loop.time()))

    async def _read(self, call: Any) -> None:
        async for response in call:
            kind = response.WhichOneof("event")
            if kind == "accepted":
                self.tracker.accepted(response.accepted.event_id)
            elif kind == "delta":
                self.tracker.delta()
            elif kind == "readout":
                self.tracker.readout()
            elif kind == "message":
                message = response.message
                if self.tracker.message(message.turn_id, message.text, message.unprompted):
                    await self.replies.put(message)

    async def _next_reply(self, reader: asyncio.Task[None]) -> None:
        waiter = asyncio.ensure_future(self.replies.get())
        try:
            done, _ = await asyncio.wait(
                {waiter, reader}, timeout=self.settings.reply_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        if waiter in done:
            return
        if reader in done:
            reader.result()  # Raises the stream's error, if it failed.
            raise RuntimeError("the server closed the conversation before replying")
        raise TimeoutError(f"no complete reply within {self.settings.reply_timeout_s} s")

    async def run(self) -> None:
        call = self.stub.Converse(self._requests(), metadata=self.metadata)
        reader = asyncio.create_task(self._read(call))
        faces = asyncio.create_task(self._face_loop())
        try:
            for turn in range(self.settings.turns):
                if turn:
                    await asyncio.sleep(self.settings.seconds_between_turns)
                text = self.tracker.start_turn(turn)
                await self.outbox.put(
                    chat_pb2.ConverseRequest(
                        user_message=chat_pb2.UserMessage(text=text, client_time_ms=int(time.time() * 1000))
                    )
                )
                await self._next_reply(reader)
            await asyncio.sleep(self.settings.linger_s)
            faces.cancel()
            await self.outbox.put(None)  # Half-close: the server finishes and ends the stream.
            await asyncio.wait_for(reader, self.settings.reply_timeout_s)
        finally:
            for task in (faces, reader):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await task
            call.cancel()


async def run_user(
    channel_or_target: grpc.aio.Channel | str,
    persona: Persona,
    settings: SimulatorSettings,
    seed: int,
    *,
    token: str | None = None,
    faces: FaceSet | None = None,
    scorer: ReplyScorer = reply_quality,
) -> SessionOutcome:
    """One simulated user's whole session. ``token`` is sent with every call (a channel given here may
    carry its own instead); ``faces`` defaults to ``settings.faces`` (None: FER readings are sent)."""
    if isinstance(channel_or_target, str):
        async with make_channel(channel_or_target, None, tls=settings.tls, timeout=settings.rpc_timeout_s) as channel:
            return await run_user(channel, persona, settings, seed, token=token, faces=faces, scorer=scorer)
    if faces is None and settings.faces is not None:
        faces = await asyncio.to_thread(load_face_set, settings.faces, settings.face)
    started = time.perf_counter()
    user = SimulatedUser(
        persona, seed, state_model=settings.state, face_model=settings.face, scorer=scorer, feedback=settings.feedback
    )
    outcome = SessionOutcome(persona_id=persona.persona_id, seed=seed, start_state=_state(user, "start"))
    stub = chat_pb2_grpc.ChatServiceStub(channel_or_target)
    metadata, timeout = _metadata(token), settings.rpc_timeout_s
    step = "CreateSession"
    try:
        session = (
            await stub.CreateSession(
                chat_pb2.CreateSessionRequest(
                    consent=chat_pb2.Consent(
                        store_frames=settings.store_frames, use_for_training=settings.use_for_training
                    ),
                    model_arm=settings.model_arm,
                    synthetic=True,
                ),
                metadata=metadata,
                timeout=timeout,
            )
        ).session
        outcome.session_id, outcome.user_id, outcome.model_id = session.session_id, session.user_id, session.model_id
        step = "SubmitPreSurvey"
        await stub.SubmitPreSurvey(
            chat_pb2.SubmitPreSurveyRequest(session_id=session.session_id, survey=_survey(user.pre_survey())),
            metadata=metadata,
            timeout=timeout,
        )
        step = "Converse"
        await _Conversation(stub, user, outcome, settings, faces, metadata).run()
        step = "SubmitPostSurvey"
        await stub.SubmitPostSurvey(
            chat_pb2.SubmitPostSurveyRequest(session_id=session.session_id, survey=_survey(user.post_survey())),
            metadata=metadata,
            timeout=timeout,
        )
        step = "SubmitRating"
        rated = user.ratings()
        await stub.SubmitRating(
            chat_pb2.SubmitRatingRequest(
                session_id=session.session_id,
                empathy=rated.empathy,
                relevance=rated.relevance,
                fluency=rated.fluency,
                comment=rated.comment,
            ),
            metadata=metadata,
            timeout=timeout,
        )
        outcome.ratings = {"empathy": rated.empathy, "relevance": rated.relevance, "fluency": rated.fluency}
    except grpc.aio.AioRpcError as exc:
        outcome.errors.append(_rpc_error(step, exc))
    except (TimeoutError, RuntimeError) as exc:
        outcome.errors.append(f"{step}: {exc}")
    if outcome.session_id:
        try:
            await stub.EndSession(
                chat_pb2.EndSessionRequest(session_id=outcome.session_id), metadata=metadata, timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            outcome.errors.append(_rpc_error("EndSession", exc))
    outcome.end_state = _state(user, "end")
    outcome.duration_s = time.perf_counter() - started
    log.log(
        logging.WARNING if outcome.errors else logging.INFO,
        "simulated session %s",
        outcome.session_id or "(none)",
        extra={
            "persona": persona.persona_id,
            "turns": len(outcome.turns),
            "valence_change": round(outcome.end_state["valence"] - outcome.start_state["valence"], 3),
            "errors": len(outcome.errors),
        },
    )
    return outcome


def user_seed(seed: int, index: int) -> int:
    """User ``index``'s own seed, derived from the run's seed (independent streams per user)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def user_subject(subject_prefix: str, seed: int, index: int) -> str:
    """The token subject (the session's user id) of :func:`run_users`' user ``index``."""
    return f"{subject_prefix}-{seed}-{index}"


async def run_users(
    n: int,
    concurrency: int,
    channel_or_target: grpc.aio.Channel | str,
    personas: Sequence[Persona],
    settings: SimulatorSettings,
    seed: int = 0,
    *,
    token_for: Callable[[str], str] | None = None,
    faces: FaceSet | None = None,
    scorer: ReplyScorer = reply_quality,
) -> list[SessionOutcome]:
    """N simulated users, at most ``concurrency`` at once, in user order. User i is subject
    ``<subject_prefix>-<seed>-<i>`` with the token ``token_for(subject)`` (None: the channel's own token),
    and plays persona ``personas[permutation(seed)[i % len]]``."""
    if n < 0 or concurrency < 1:
        raise ValueError("n must be >= 0 and concurrency >= 1")
    if not personas:
        raise ValueError("no personas to simulate")
    if isinstance(channel_or_target, str):
        async with make_channel(channel_or_target, None, tls=settings.tls, timeout=settings.rpc_timeout_s) as channel:
            return await run_users(
                n, concurrency, channel, personas, settings, seed, token_for=token_for, faces=faces, scorer=scorer
            )
    if faces is None and settings.faces is not None:
        faces = await asyncio.to_thread(load_face_set, settings.faces, settings.face)
    order = np.random.default_rng(seed).permutation(len(personas))
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> SessionOutcome:
        subject = user_subject(settings.subject_prefix, seed, index)
        async with gate:
            return await run_user(
                channel_or_target,
                personas[int(order[index % len(personas)])],
                settings,
                user_seed(seed, index),
                token=token_for(subject) if token_for is not None else None,
                faces=faces,
                scorer=scorer,
            )

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def transcript_events(response: chat_pb2.GetTranscriptResponse) -> list[dict[str, Any]]:
    """A transcript's events in the shape of the stored ``events.jsonl`` lines."""
    return [
        {"event_id": e.event_id, "kind": e.kind, "time_ms": e.time_ms, **json.loads(e.payload_json or "{}")}
        for e in response.events
    ]


def lost_events(outcome: SessionOutcome, events: Iterable[Mapping[str, Any]]) -> list[str]:
    """Acknowledged events of ``outcome`` missing from a stored record (``events.jsonl`` lines or
    :func:`transcript_events`): user messages by event id, assistant turns by turn id."""
    user_ids, turn_ids = set(), set()
    for event in events:
        if event.get("kind") == EventKind.USER_MESSAGE:
            user_ids.add(event.get("event_id"))
        elif event.get("kind") == EventKind.ASSISTANT_MESSAGE:
            turn_ids.add(event.get("turn_id"))
    missing = [f"user_message {i}" for i in outcome.accepted_event_ids if i not in user_ids]
    return missing + [f"assistant_message {t}" for t in outcome.assistant_turn_ids if t not in turn_ids]


def _percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summarize(outcomes: Sequence[SessionOutcome], wall_s: float) -> dict[str, Any]:
    """The JSON summary of a simulation run."""
    ttft = [t for o in outcomes for t in o.ttft_s]
    replies = [t.reply_s for o in outcomes for t in o.turns if t.reply_s is not None]
    changes = [o.end_state["valence"] - o.start_state["valence"] for o in outcomes if o.ok]
    rated = [o.ratings for o in outcomes if o.ratings]
    return {
        "users": len(outcomes),
        "ok": sum(o.ok for o in outcomes),
        "failed": sum(not o.ok for o in outcomes),
        "wall_s": round(wall_s, 3),
        "turns": sum(len(o.turns) for o in outcomes),
        "accepted_events": sum(len(o.accepted_event_ids) for o in outcomes),
        "assistant_turns": sum(len(o.assistant_turn_ids) for o in outcomes),
        "unprompted_turns": sum(len(o.unprompted_turn_ids) for o in outcomes),
        "readings_sent": sum(o.readings_sent for o in outcomes),
        "frames_sent": sum(o.frames_sent for o in outcomes),
        "ttft_s": {"p50": _percentile(ttft, 50), "p95": _percentile(ttft, 95), "max": _percentile(ttft, 100)},
        "reply_s": {"p50": _percentile(replies, 50), "p95": _percentile(replies, 95)},
        "mean_valence_change": round(float(np.mean(changes)), 4) if changes else None,
        "mean_ratings": {k: round(float(np.mean([r[k] for r in rated])), 3) for k in RATING_NAMES} if rated else {},
        "sessions": [o.session_id for o in outcomes if o.session_id],
        "errors": [f"{o.persona_id}: {e}" for o in outcomes for e in o.errors][:50],
    }
