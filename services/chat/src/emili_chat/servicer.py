"""gRPC adapter for ``emili.chat.v1.ChatService``: converts messages and calls the engine, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_chat import codec
from emili_chat.engine import ChatEngine
from emili_core.auth import current_principal
from emili_core.errors import InvalidInput


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, engine: ChatEngine) -> None:
        self.engine = engine

    async def CreateSession(
        self, request: chat_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.CreateSessionResponse:
        record = await self.engine.create_session(
            current_principal(),
            store_frames=request.consent.store_frames,
            use_for_training=request.consent.use_for_training,
            arm=request.model_arm,
            options=codec.options_from_pb(request.options),
            synthetic=request.synthetic,
        )
        return chat_pb2.CreateSessionResponse(session=codec.session_to_pb(record))

    async def SubmitPreSurvey(
        self, request: chat_pb2.SubmitPreSurveyRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.SubmitPreSurveyResponse:
        await self.engine.submit_survey(
            current_principal(), request.session_id, "pre", codec.survey_from_pb(request.survey)
        )
        return chat_pb2.SubmitPreSurveyResponse()

    async def SubmitPostSurvey(
        self, request: chat_pb2.SubmitPostSurveyRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.SubmitPostSurveyResponse:
        await self.engine.submit_survey(
            current_principal(), request.session_id, "post", codec.survey_from_pb(request.survey)
        )
        return chat_pb2.SubmitPostSurveyResponse()

    async def SubmitRating(
        self, request: chat_pb2.SubmitRatingRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.SubmitRatingResponse:
        ratings = {"empathy": request.empathy, "relevance": request.relevance, "fluency": request.fluency}
        await self.engine.submit_rating(current_principal(), request.session_id, ratings, request.comment)
        return chat_pb2.SubmitRatingResponse()

    async def EndSession(
        self, request: chat_pb2.EndSessionRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.EndSessionResponse:
        record = await self.engine.end_session(current_principal(), request.session_id)
        return chat_pb2.EndSessionResponse(session=codec.session_to_pb(record))

    async def GetTranscript(
        self, request: chat_pb2.GetTranscriptRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetTranscriptResponse:
        page = await self.engine.transcript_page(
            current_principal(), request.session_id, request.page_size, request.page_token
        )
        return chat_pb2.GetTranscriptResponse(
            session=codec.session_to_pb(page.record),
            events=[codec.event_to_pb(e) for e in page.events],
            next_page_token=page.next_page_token,
        )

    async def DeleteSessionData(
        self, request: chat_pb2.DeleteSessionDataRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.DeleteSessionDataResponse:
        deletion = await self.engine.delete_session_data(current_principal(), request.session_id, request.reason)
        return codec.delete_session_to_pb(deletion)

    async def DeleteUserData(
        self, request: chat_pb2.DeleteUserDataRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.DeleteUserDataResponse:
        deletion = await self.engine.delete_user_data(
            current_principal(), request.user_id, list(request.session_ids), request.reason
        )
        return codec.delete_user_to_pb(deletion)

    async def Converse(
        self, request_iterator: AsyncIterator[chat_pb2.ConverseRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_pb2.ConverseResponse]:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            return
        if not first.session_id:
            raise InvalidInput("the first Converse message must carry session_id")
        inputs = codec.inputs_from_pb(first, requests)
        async for output in self.engine.converse(current_principal(), first.session_id, inputs):
            yield codec.output_to_pb(output)
