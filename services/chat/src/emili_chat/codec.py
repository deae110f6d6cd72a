"""Protobuf at the edge: conversions between ``emili.chat.v1`` messages and the engine's types."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from emili.chat.v1 import chat_pb2
from emili_chat.deletion import DeletedSession, Deletion
from emili_chat.io_types import (
    Accepted,
    AssistantReply,
    ClientReading,
    ConverseInput,
    ConverseOutput,
    Delta,
    Frame,
    Readout,
    SessionOptions,
    UserText,
)
from emili_chat.store import ACTIVE, ENDED, SessionRecord
from emili_core.errors import InvalidInput
from emili_session.events import Event

_CADENCE_TO_PB = {
    "before_user_message": chat_pb2.READOUT_CADENCE_BEFORE_USER_MESSAGE,
    "fixed_interval": chat_pb2.READOUT_CADENCE_FIXED_INTERVAL,
    "on_change": chat_pb2.READOUT_CADENCE_ON_CHANGE,
}
_CADENCE_FROM_PB = {v: k for k, v in _CADENCE_TO_PB.items()}
_STATE_TO_PB = {ACTIVE: chat_pb2.SESSION_STATE_ACTIVE, ENDED: chat_pb2.SESSION_STATE_ENDED}


def options_from_pb(options: chat_pb2.SessionOptions) -> SessionOptions:
    if options.cadence not in (chat_pb2.READOUT_CADENCE_UNSPECIFIED, *_CADENCE_FROM_PB):
        raise InvalidInput(f"unknown readout cadence {options.cadence}")
    return SessionOptions(
        cadence=_CADENCE_FROM_PB.get(options.cadence),
        speak_on_change=options.speak_on_change if options.HasField("speak_on_change") else None,
        post_response_reading_s=(
            options.post_response_reading_seconds if options.HasField("post_response_reading_seconds") else None
        ),
    )


def session_to_pb(record: SessionRecord) -> chat_pb2.Session:
    options = record.options
    return chat_pb2.Session(
        session_id=record.session_id,
        user_id=record.user_id,
        consent=chat_pb2.Consent(store_frames=record.store_frames, use_for_training=record.use_for_training),
        model_arm=record.model_arm,
        model_id=record.model_id,
        state=_STATE_TO_PB.get(record.state, chat_pb2.SESSION_STATE_UNSPECIFIED),
        created_ms=record.created_ms,
        ended_ms=record.ended_ms,
        synthetic=record.synthetic,
        options=chat_pb2.SessionOptions(
            cadence=_CADENCE_TO_PB[options["cadence"]],
            speak_on_change=options["speak_on_change"],
            post_response_reading_seconds=options["post_response_reading_s"],
        ),
    )


def survey_from_pb(survey: chat_pb2.Survey) -> dict[str, object]:
    return {
        "current_feelings": list(survey.current_feelings),
        "desired_feelings": list(survey.desired_feelings),
        "text": survey.text,
    }


def deleted_session_to_pb(deleted: DeletedSession) -> chat_pb2.DeletedSession:
    return chat_pb2.DeletedSession(
        session_id=deleted.session_id,
        already_deleted=deleted.already_deleted,
        redis_keys=deleted.redis_keys,
        events=deleted.events,
        record_objects=deleted.record_objects,
        frames=deleted.frames,
        tombstone_key=deleted.tombstone_key,
        deleted_ms=deleted.deleted_ms,
    )


def delete_session_to_pb(deletion: Deletion) -> chat_pb2.DeleteSessionDataResponse:
    (deleted,) = deletion.sessions
    return chat_pb2.DeleteSessionDataResponse(deleted=deleted_session_to_pb(deleted), audit_key=deletion.audit_key)


def delete_user_to_pb(deletion: Deletion) -> chat_pb2.DeleteUserDataResponse:
    return chat_pb2.DeleteUserDataResponse(
        user_id=deletion.user_id,
        sessions=[deleted_session_to_pb(s) for s in deletion.sessions],
        audit_key=deletion.audit_key,
    )


def event_to_pb(event: Event) -> chat_pb2.TranscriptEvent:
    return chat_pb2.TranscriptEvent(
        event_id=event.event_id, time_ms=event.time_ms, kind=str(event.kind), payload_json=json.dumps(event.payload)
    )


async def inputs_from_pb(
    first: chat_pb2.ConverseRequest, rest: AsyncIterator[chat_pb2.ConverseRequest]
) -> AsyncIterator[ConverseInput]:
    session_id = first.session_id
    request: chat_pb2.ConverseRequest | None = first
    while request is not None:
        if request.session_id and request.session_id != session_id:
            raise InvalidInput("every message of a Converse stream must be for the same session")
        kind = request.WhichOneof("event")
        if kind == "user_message":
            yield UserText(request.user_message.text, request.user_message.client_time_ms)
        elif kind == "frame":
            yield Frame(request.frame.jpeg, request.frame.capture_time_ms)
        elif kind == "reading":
            r = request.reading
            yield ClientReading(r.face_found, dict(r.probabilities), r.capture_time_ms)
        elif request is not first:
            raise InvalidInput("a Converse message needs one of user_message, frame or reading")
        request = await anext(rest, None)


def output_to_pb(output: ConverseOutput) -> chat_pb2.ConverseResponse:
    if isinstance(output, Delta):
        return chat_pb2.ConverseResponse(delta=chat_pb2.AssistantDelta(turn_id=output.turn_id, text=output.text))
    if isinstance(output, AssistantReply):
        return chat_pb2.ConverseResponse(
            message=chat_pb2.AssistantMessage(
                turn_id=output.turn_id,
                text=output.text,
                unprompted=output.unprompted,
                model_id=output.model_id,
                time_ms=output.time_ms,
            )
        )
    if isinstance(output, Readout):
        return chat_pb2.ConverseResponse(
            readout=chat_pb2.ReadoutInjected(
                text=output.text, cadence=_CADENCE_TO_PB[output.cadence], time_ms=output.time_ms
            )
        )
    if isinstance(output, Accepted):
        return chat_pb2.ConverseResponse(
            accepted=chat_pb2.UserMessageAccepted(event_id=output.event_id, time_ms=output.time_ms)
        )
    raise TypeError(f"unknown conversation output {output!r}")
