"""The gateway's gRPC edge: calls to the chat service (FER's Analyze for camera checks, the labeler's session labels
for canaries).

The only module that touches protobuf: everything else sees the plain types below. gRPC status codes
become emili_core domain errors here, with the callee's message, so callers never see a grpc exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili.fer.v1 import fer_pb2, fer_pb2_grpc
from emili.labeler.v1 import labeler_pb2, labeler_pb2_grpc
from emili_core import errors
from emili_core.grpc_client import TokenSource, make_channel
from emili_core.settings import TLSSettings

T = TypeVar("T")
Cadence = Literal["before_user_message", "fixed_interval", "on_change"]

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
FER_SERVICE = fer_pb2.DESCRIPTOR.services_by_name["FerService"].full_name
_CADENCE_TO_PB = {
    "before_user_message": chat_pb2.READOUT_CADENCE_BEFORE_USER_MESSAGE,
    "fixed_interval": chat_pb2.READOUT_CADENCE_FIXED_INTERVAL,
    "on_change": chat_pb2.READOUT_CADENCE_ON_CHANGE,
}
_STATE_FROM_PB = {chat_pb2.SESSION_STATE_ACTIVE: "active", chat_pb2.SESSION_STATE_ENDED: "ended"}
# Frames waiting for the chat stream beyond this are dropped: a slow stream must not hold a backlog of faces.
_MAX_QUEUED_FRAMES = 8


@dataclass(frozen=True)
class ChatSession:
    session_id: str
    user_id: str
    model_arm: str
    state: str
    created_ms: int
    ended_ms: int


@dataclass(frozen=True)
class ChatEvent:
    """One event of chat's log, as GetTranscript returns it."""

    event_id: str
    time_ms: int
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Accepted:
    event_id: str
    time_ms: int


@dataclass(frozen=True)
class Delta:
    turn_id: str
    text: str


@dataclass(frozen=True)
class Reply:
    turn_id: str
    text: str
    unprompted: bool
    time_ms: int


@dataclass(frozen=True)
class Readout:
    text: str
    time_ms: int


ConverseOutput = Accepted | Delta | Reply | Readout


@dataclass(frozen=True)
class ChatDeletion:
    """What chat's DeleteUserData removed."""

    session_ids: tuple[str, ...]
    totals: dict[str, int]  # sessions, already_deleted, redis_keys, events, record_objects, frames
    audit_key: str


def _domain_error(exc: grpc.aio.AioRpcError, service: str) -> errors.EmiliError:
    code, detail = exc.code(), exc.details() or ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return errors.DependencyUnavailable(
            f"the {service} service is unavailable right now ({code.name.lower()}); please try again in a minute"
        )
    mapped: dict[grpc.StatusCode, type[errors.EmiliError]] = {
        grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInput,
        grpc.StatusCode.OUT_OF_RANGE: errors.InvalidInput,
        grpc.StatusCode.NOT_FOUND: errors.NotFound,
        grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
        grpc.StatusCode.ALREADY_EXISTS: errors.FailedPrecondition,
        grpc.StatusCode.RESOURCE_EXHAUSTED: errors.Overloaded,
        grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
        grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    }
    cls = mapped.get(code)
    if cls is None:
        # INTERNAL and the like: chat's message carries its error id, which is what an operator needs.
        return errors.DependencyUnavailable(f"the {service} service failed: {detail}")
    return cls(detail)


async def _call(awaitable: Awaitable[T], service: str) -> T:
    try:
        return await awaitable
    except grpc.aio.AioRpcError as exc:
        raise _domain_error(exc, service) from None


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _session(pb: chat_pb2.Session) -> ChatSession:
    return ChatSession(
        session_id=pb.session_id,
        user_id=pb.user_id,
        model_arm=pb.model_arm,
        state=_STATE_FROM_PB.get(pb.state, "unknown"),
        created_ms=pb.created_ms,
        ended_ms=pb.ended_ms,
    )


def _output(pb: chat_pb2.ConverseResponse) -> ConverseOutput | None:
    kind = pb.WhichOneof("event")
    if kind == "accepted":
        return Accepted(pb.accepted.event_id, pb.accepted.time_ms)
    if kind == "delta":
        return Delta(pb.delta.turn_id, pb.delta.text)
    if kind == "message":
        m = pb.message
        return Reply(m.turn_id, m.text, m.unprompted, m.time_ms)
    if kind == "readout":
        return Readout(pb.readout.text, pb.readout.time_ms)
    return None  # A newer chat's event this gateway does not know: skipped, not fatal.


class Conversation:
    """One open Converse stream. Inputs are queued (the stream reads them as chat is ready); ``close_input``
    half-closes, after which chat finishes the turn in progress and ends the stream."""

    def __init__(self, stub: chat_pb2_grpc.ChatServiceAsyncStub, token: str, session_id: str) -> None:
        self._inputs: asyncio.Queue[chat_pb2.ConverseRequest | None] = asyncio.Queue()
        self._inputs.put_nowait(chat_pb2.ConverseRequest(session_id=session_id))
        self._closed = False
        self._call = stub.Converse(self._requests(), metadata=_metadata(token))

    async def _requests(self) -> AsyncIterator[chat_pb2.ConverseRequest]:
        while (request := await self._inputs.get()) is not None:
            yield request

    def send_message(self, text: str, client_time_ms: int) -> None:
        if not self._closed:
            message = chat_pb2.UserMessage(text=text, client_time_ms=client_time_ms)
            self._inputs.put_nowait(chat_pb2.ConverseRequest(user_message=message))

    def send_frame(self, jpeg: bytes, capture_time_ms: int) -> bool:
        """Queue a face frame; False when it was dropped because chat is not keeping up."""
        if self._closed or self._inputs.qsize() >= _MAX_QUEUED_FRAMES:
            return False
        frame = chat_pb2.FaceFrame(jpeg=jpeg, capture_time_ms=capture_time_ms)
        self._inputs.put_nowait(chat_pb2.ConverseRequest(frame=frame))
        return True

    def close_input(self) -> None:
        if not self._closed:
            self._closed = True
            self._inputs.put_nowait(None)

    def cancel(self) -> None:
        self._closed = True
        self._call.cancel()

    async def outputs(self) -> AsyncIterator[ConverseOutput]:
        try:
            async for response in self._call:
                output = _output(response)
                if output is not None:
                    yield output
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._closed:
                return
            raise _domain_error(exc, "chat") from None


class ChatClient:
    """Calls chat with the caller's own token, so chat's ownership checks apply to every participant."""

    def __init__(self, target: str, timeout_seconds: float, tls: TLSSettings | None = None) -> None:
        self.target = target
        self.timeout = timeout_seconds
        self.tls = tls
        self._channel: grpc.aio.Channel | None = None

    @property
    def stub(self) -> chat_pb2_grpc.ChatServiceAsyncStub:
        if self._channel is None:
            # gRPC aio channels belong to the loop they are made in: made on first use, in the app's loop.
            self._channel = make_channel(
                self.target, None, tls=self.tls, timeout=self.timeout, stream_timeout=24 * 3600
            )
        return chat_pb2_grpc.ChatServiceStub(self._channel)  # type: ignore[return-value]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def healthy(self) -> str | None:
        """None when chat answers SERVING; otherwise what is wrong."""
        self.stub  # noqa: B018 - makes the channel
        assert self._channel is not None
        health = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=CHAT_SERVICE), timeout=2)
        except grpc.aio.AioRpcError as exc:
            return f"chat at {self.target}: {exc.code().name}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return f"chat at {self.target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        return None

    async def create_session(
        self,
        token: str,
        *,
        arm: str,
        store_frames: bool,
        use_for_training: bool,
        cadence: Cadence,
        speak_on_change: bool,
        synthetic: bool = False,
    ) -> ChatSession:
        request = chat_pb2.CreateSessionRequest(
            consent=chat_pb2.Consent(store_frames=store_frames, use_for_training=use_for_training),
            model_arm=arm,
            options=chat_pb2.SessionOptions(cadence=_CADENCE_TO_PB[cadence], speak_on_change=speak_on_change),
            synthetic=synthetic,
        )
        reply = await _call(self.stub.CreateSession(request, metadata=_metadata(token)), "chat")
        return _session(reply.session)

    async def submit_survey(
        self,
        token: str,
        session_id: str,
        phase: Literal["pre", "post"],
        current: list[str],
        desired: list[str],
        text: str,
    ) -> None:
        survey = chat_pb2.Survey(current_feelings=current, desired_feelings=desired, text=text)
        if phase == "pre":
            pre = chat_pb2.SubmitPreSurveyRequest(session_id=session_id, survey=survey)
            await _call(self.stub.SubmitPreSurvey(pre, metadata=_metadata(token)), "chat")
        else:
            post = chat_pb2.SubmitPostSurveyRequest(session_id=session_id, survey=survey)
            await _call(self.stub.SubmitPostSurvey(post, metadata=_metadata(token)), "chat")

    async def submit_rating(
        self, token: str, session_id: str, *, empathy: int, relevance: int, fluency: int, comment: str
    ) -> None:
        request = chat_pb2.SubmitRatingRequest(
            session_id=session_id, empathy=empathy, relevance=relevance, fluency=fluency, comment=comment
        )
        await _call(self.stub.SubmitRating(request, metadata=_metadata(token)), "chat")

    async def end_session(self, token: str, session_id: str) -> ChatSession:
        request = chat_pb2.EndSessionRequest(session_id=session_id)
        reply = await _call(self.stub.EndSession(request, metadata=_metadata(token)), "chat")
        return _session(reply.session)

    async def transcript(self, token: str, session_id: str) -> tuple[ChatSession, list[ChatEvent]]:
        """The whole event log, read page by page (GetTranscript's next_page_token)."""
        events = []
        page_token, seen = "", set()
        while True:
            request = chat_pb2.GetTranscriptRequest(session_id=session_id, page_token=page_token)
            reply = await _call(self.stub.GetTranscript(request, metadata=_metadata(token)), "chat")
            for e in reply.events:
                with contextlib.suppress(ValueError):
                    payload = json.loads(e.payload_json) if e.payload_json else {}
                    events.append(
                        ChatEvent(e.event_id, e.time_ms, e.kind, payload if isinstance(payload, dict) else {})
                    )
            page_token = reply.next_page_token
            if not page_token or page_token in seen:  # The last page (a repeated token would never end).
                return _session(reply.session), events
            seen.add(page_token)

    async def delete_user_data(self, token: str, user_id: str, session_ids: list[str], reason: str) -> ChatDeletion:
        """Delete every session of ``user_id`` that chat knows of and ``session_ids`` (an admin token)."""
        request = chat_pb2.DeleteUserDataRequest(user_id=user_id, session_ids=session_ids, reason=reason)
        reply = await _call(self.stub.DeleteUserData(request, metadata=_metadata(token)), "chat")
        sessions = list(reply.sessions)
        totals = {
            "sessions": len(sessions),
            "already_deleted": sum(s.already_deleted for s in sessions),
            "redis_keys": sum(len(s.redis_keys) for s in sessions),
            "events": sum(s.events for s in sessions),
            "record_objects": sum(s.record_objects for s in sessions),
            "frames": sum(s.frames for s in sessions),
        }
        return ChatDeletion(tuple(s.session_id for s in sessions), totals, reply.audit_key)

    def converse(self, token: str, session_id: str) -> Conversation:
        return Conversation(self.stub, token, session_id)


class _ServiceClient:
    """A channel to another service under the gateway's own service token, made on first use."""

    def __init__(self, target: str, token: TokenSource, timeout_seconds: float, tls: TLSSettings | None = None) -> None:
        self.target = target
        self.token = token  # A ServiceToken: short-lived, minted again before it expires.
        self.timeout = timeout_seconds
        self.tls = tls
        self._channel: grpc.aio.Channel | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = make_channel(self.target, self.token, tls=self.tls, timeout=self.timeout)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class FerClient(_ServiceClient):
    """FER's Analyze with the gateway's own service token (scope ``fer``): camera checks only."""

    @property
    def stub(self) -> fer_pb2_grpc.FerServiceAsyncStub:
        return fer_pb2_grpc.FerServiceStub(self.channel)  # type: ignore[return-value]

    async def face_found(self, jpeg: bytes) -> bool:
        request = fer_pb2.AnalyzeRequest(frame=fer_pb2.Frame(data=jpeg, format=fer_pb2.FRAME_FORMAT_JPEG))
        reply = await _call(self.stub.Analyze(request), "face recognition")
        return bool(reply.reading.face_found)


@dataclass(frozen=True)
class SessionReactions:
    """A finished session's outcomes from its label: ``delta_v`` (valence after minus before, from the surveys; None
    when one is missing) and ``positive_reaction`` (the share of replies whose read reaction was flagged positive;
    None when no reaction was read, e.g. without a camera)."""

    delta_v: float | None
    positive_reaction: float | None


class LabelerClient(_ServiceClient):
    """The labeler's LabelSession with the gateway's own service token (scope ``labeler``): canary outcomes only.
    The label is the one the loop trains on (the same settings), made once and kept by the labeler."""

    @property
    def stub(self) -> labeler_pb2_grpc.LabelerServiceAsyncStub:
        return labeler_pb2_grpc.LabelerServiceStub(self.channel)  # type: ignore[return-value]

    async def reactions(self, session_id: str) -> SessionReactions:
        request = labeler_pb2.LabelSessionRequest(session_id=session_id)
        label = (await _call(self.stub.LabelSession(request), "labeling")).label
        read = [t for t in label.turns if t.HasField("delta")]
        return SessionReactions(
            delta_v=label.delta.valence if label.HasField("delta") else None,
            positive_reaction=sum(t.flagged for t in read) / len(read) if read else None,
        )
