"""Bounds on what a person or client controls: survey words and lengths, one rating and one survey of each kind
per session (a resubmission replaces it, a few times at most), nothing accepted after EndSession, transcripts in
pages. In the engine against a real Redis server, and through gRPC for the status codes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio as aioredis

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_chat.engine import ChatEngine, normalise_feelings
from emili_chat.io_types import SessionOptions, UserText
from emili_chat.main import build_app
from emili_chat.persist import persist_session
from emili_chat.settings import ChatSettings, SurveySettings, TranscriptSettings
from emili_chat.store import SessionStore
from emili_core.auth import Principal
from emili_core.errors import FailedPrecondition, InvalidInput
from emili_core.grpc_client import make_channel
from emili_core.grpc_server import start_server
from emili_core.keys import session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import AuthSettings, S3Settings, load_settings
from emili_session.events import PostSurvey, PreSurvey, Rating, UserMessage, payloads_of
from emili_session.surveys import CURRENT_FEELINGS, DESIRED_FEELINGS
from emili_testing.chat import ScriptedBackend
from emili_testing.plugin import TEST_SECRET, free_port, token

from .conftest import make_engine, make_settings

ALICE = Principal("alice", frozenset({"chat"}))
RATING = {"empathy": 4, "relevance": 4, "fluency": 5}


def with_options(settings: ChatSettings, **update: Any) -> ChatSettings:
    return settings.model_copy(update={"chat": settings.chat.model_copy(update=update)})


async def new_session(engine: ChatEngine) -> str:
    record = await engine.create_session(
        ALICE, store_frames=False, use_for_training=True, arm="", options=SessionOptions()
    )
    return record.session_id


async def one_message(text: str = "hello there") -> AsyncIterator[UserText]:
    yield UserText(text)


# --- the vocabulary (no Redis) --------------------------------------------------------------------------------


def test_feelings_are_the_vocabularys_words_matched_ignoring_case_each_once() -> None:
    chosen = ["happy", " TIRED ", "Happy", "tired"]
    assert normalise_feelings(chosen, CURRENT_FEELINGS, "current_feelings", 12) == ("Happy", "Tired")
    assert normalise_feelings([], DESIRED_FEELINGS, "desired_feelings", 12) == ()
    with pytest.raises(InvalidInput, match=r"'Bored' not offered; choose from Angry, Tired, Anxious") as exc:
        normalise_feelings(["Happy", "Bored"], CURRENT_FEELINGS, "current_feelings", 12)
    assert "current_feelings" in str(exc.value)
    with pytest.raises(InvalidInput, match="3 chosen, over the limit of 2"):
        normalise_feelings(["Happy", "Sad", "Tired"], CURRENT_FEELINGS, "current_feelings", 2)
    with pytest.raises(InvalidInput, match="10000 given, over the limit of 12"):
        normalise_feelings([f"feeling-{i}" for i in range(10_000)], CURRENT_FEELINGS, "current_feelings", 12)


def test_limits_are_settings_with_sensible_defaults() -> None:
    surveys, pages = SurveySettings(), TranscriptSettings()
    assert surveys.current_feelings == CURRENT_FEELINGS and surveys.desired_feelings == DESIRED_FEELINGS
    assert (surveys.max_text_chars, surveys.max_comment_chars, surveys.max_submissions) == (4000, 2000, 10)
    assert pages.default_page_size <= pages.max_page_size and pages.max_page_bytes <= 4 * 1024 * 1024


def test_the_vocabulary_and_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMILI_CHAT__SURVEYS__CURRENT_FEELINGS", '["Calm", "Tense"]')
    monkeypatch.setenv("EMILI_CHAT__SURVEYS__MAX_SUBMISSIONS", "3")
    monkeypatch.setenv("EMILI_CHAT__TRANSCRIPT__MAX_PAGE_SIZE", "200")
    settings = load_settings(ChatSettings)
    assert settings.chat.surveys.current_feelings == ("Calm", "Tense")
    assert settings.chat.surveys.desired_feelings == DESIRED_FEELINGS
    assert settings.chat.surveys.max_submissions == 3 and settings.chat.transcript.max_page_size == 200


# --- the engine -----------------------------------------------------------------------------------------------

engine_tests = pytest.mark.integration


@engine_tests
async def test_surveys_are_checked_and_stored_in_the_vocabulary_spelling(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    engine = make_engine(make_settings(redis_url), redis_client)
    sid = await new_session(engine)
    survey = {"current_feelings": ["tired", "TIRED", "sad"], "desired_feelings": ["hopeful"], "text": "long week"}
    await engine.submit_survey(ALICE, sid, "pre", survey)
    (pre,) = payloads_of(await engine.store.events(sid), PreSurvey)
    assert pre == PreSurvey(("Tired", "Sad"), ("Hopeful",), "long week")
    with pytest.raises(InvalidInput, match="'Elated' not offered"):
        await engine.submit_survey(ALICE, sid, "post", {"current_feelings": ["Elated"]})
    with pytest.raises(InvalidInput, match="desired_feelings"):
        await engine.submit_survey(ALICE, sid, "post", {"desired_feelings": ["Tired"]})  # A current feeling only.
    with pytest.raises(InvalidInput, match="survey text is 4001 characters, over the 4000 limit"):
        await engine.submit_survey(ALICE, sid, "post", {"text": "x" * 4001})
    with pytest.raises(InvalidInput, match="rating comment is 2001 characters, over the 2000 limit"):
        await engine.submit_rating(ALICE, sid, RATING, "y" * 2001)
    with pytest.raises(InvalidInput, match="user message is 4001 characters, over the 4000 limit"):
        [o async for o in engine.converse(ALICE, sid, one_message("m" * 4001))]
    kinds = [e.kind for e in await engine.store.events(sid)]
    assert kinds == ["session_created", "pre_survey"]  # Nothing refused was recorded.


@engine_tests
async def test_a_resubmitted_rating_or_survey_replaces_it_up_to_the_limit(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    settings = make_settings(redis_url)
    settings = with_options(settings, surveys=settings.chat.surveys.model_copy(update={"max_submissions": 3}))
    engine = make_engine(settings, redis_client)
    sid = await new_session(engine)
    for empathy in (1, 2, 3):
        await engine.submit_rating(ALICE, sid, RATING | {"empathy": empathy}, f"take {empathy}")
    with pytest.raises(FailedPrecondition, match="already holds 3 rating events"):
        await engine.submit_rating(ALICE, sid, RATING, "a fourth")
    ratings = list(payloads_of(await engine.store.events(sid), Rating))
    assert [r.empathy for r in ratings] == [1, 2, 3] and ratings[-1].comment == "take 3"  # Readers take the last.
    for text in ("a", "b", "c"):
        await engine.submit_survey(ALICE, sid, "post", {"text": text})
    with pytest.raises(FailedPrecondition, match="already holds 3 post_survey events"):
        await engine.submit_survey(ALICE, sid, "post", {"text": "d"})
    await engine.submit_survey(ALICE, sid, "pre", {"text": "pre counts apart"})
    assert [p.text for p in payloads_of(await engine.store.events(sid), PostSurvey)] == ["a", "b", "c"]
    session = await engine.store.get(sid)  # The counts in the session hash are not part of the record.
    assert session.session_id == sid and not hasattr(session, "count:rating")


@engine_tests
async def test_nothing_is_accepted_after_end_session_and_nothing_acknowledged_is_missing(
    redis_url: str, redis_client: aioredis.Redis, object_store: ObjectStore
) -> None:
    engine = make_engine(make_settings(redis_url, post_response_reading_s=0.0, speak_on_change=False), redis_client)
    sid = await new_session(engine)
    await engine.submit_survey(ALICE, sid, "pre", {"current_feelings": ["Sad"], "text": "low"})
    [o async for o in engine.converse(ALICE, sid, one_message())]
    await engine.submit_survey(ALICE, sid, "post", {"current_feelings": ["Happy"], "text": "better"})
    await engine.submit_rating(ALICE, sid, RATING, "first")
    await engine.submit_rating(ALICE, sid, RATING | {"fluency": 3}, "second")
    await engine.end_session(ALICE, sid)
    hint = r"has ended: nothing more is recorded after EndSession \(submit the post-survey and rating before"
    with pytest.raises(FailedPrecondition, match=hint):
        await engine.submit_rating(ALICE, sid, RATING, "too late")
    with pytest.raises(FailedPrecondition, match=hint):
        await engine.submit_survey(ALICE, sid, "post", {"text": "too late"})
    with pytest.raises(FailedPrecondition, match=hint):
        await engine.submit_survey(ALICE, sid, "pre", {"text": "too late"})
    with pytest.raises(FailedPrecondition, match=hint):
        [o async for o in engine.converse(ALICE, sid, one_message())]
    # A write racing EndSession (it passed the state check before the session ended) is refused atomically too,
    # as is a conversation still streaming when the session ends.
    with pytest.raises(FailedPrecondition, match=hint):
        await engine.store.record(sid, UserMessage(text="still streaming"))

    summary = persist_session(redis.Redis.from_url(redis_url), object_store, sid)
    lines = object_store.get_bytes(Bucket.SESSIONS, session_record_keys(sid)["events.jsonl"]).decode().splitlines()
    stored = [json.loads(line) for line in lines]
    assert summary["events"] == len(stored) == len(await engine.store.events(sid))
    assert [e["kind"] for e in stored] == [
        "session_created",
        "pre_survey",
        "readout_injected",
        "user_message",
        "assistant_message",
        "post_survey",
        "rating",
        "rating",
        "session_ended",
    ]
    assert list(payloads_of(stored, Rating))[-1].comment == "second"
    assert "too late" not in json.dumps(stored) and "still streaming" not in json.dumps(stored)
    manifest = object_store.get_json(Bucket.SESSIONS, session_record_keys(sid)["session.json"])
    assert not any(k.startswith("count:") for k in manifest)


@engine_tests
async def test_transcript_pages_follow_the_event_ids(redis_url: str, redis_client: aioredis.Redis) -> None:
    settings = make_settings(redis_url)
    settings = with_options(
        settings, transcript=TranscriptSettings(default_page_size=4, max_page_size=6, max_page_bytes=64 * 1024)
    )
    engine = make_engine(settings, redis_client)
    sid = await new_session(engine)
    for i in range(12):
        await engine.store.record(sid, UserMessage(text=f"message {i}"))
    _, everything = await engine.transcript(ALICE, sid)
    assert len(everything) == 13

    pages, token_ = [], ""
    while True:
        page = await engine.transcript_page(ALICE, sid, page_token=token_)
        pages.append(page.events)
        if not (token_ := page.next_page_token):
            break
        assert token_ == page.events[-1].event_id
    assert [len(p) for p in pages] == [4, 4, 4, 1]
    assert [e for p in pages for e in p] == everything
    clamped = await engine.transcript_page(ALICE, sid, page_size=100)
    assert len(clamped.events) == 6 and clamped.next_page_token == everything[5].event_id
    last = await engine.transcript_page(ALICE, sid, page_size=1, page_token=everything[-2].event_id)
    assert last.events == everything[-1:] and last.next_page_token == ""
    with pytest.raises(InvalidInput, match="page_size"):
        await engine.transcript_page(ALICE, sid, page_size=-1)
    with pytest.raises(InvalidInput, match="page_token"):
        await engine.transcript_page(ALICE, sid, page_token="0) or 1=1")

    # A page also ends before its events pass max_page_bytes (a huge event still comes, alone).
    big = await new_session(engine)
    for _ in range(5):
        await engine.store.record(big, UserMessage(text="z" * 30_000))
    sizes, token_ = [], ""
    while True:
        page = await engine.transcript_page(ALICE, big, page_size=6, page_token=token_)
        sizes.append(len(page.events))
        if not (token_ := page.next_page_token):
            break
    assert sum(sizes) == 6 and max(sizes) <= 3 and len(sizes) >= 3, sizes  # 2 of 30 kB fit in 64 KiB, not 3.


# --- through gRPC: the status codes ---------------------------------------------------------------------------


@pytest.fixture
async def chat_stub(
    redis_url: str, s3_settings: S3Settings, object_store: ObjectStore, tmp_path: Path
) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    settings = ChatSettings(
        env="test",
        redis_url=redis_url,
        s3=s3_settings,
        auth=AuthSettings(secret=TEST_SECRET),  # type: ignore[arg-type]
        artifacts_dir=tmp_path,
    )
    options = settings.chat.model_copy(
        update={
            "server": settings.chat.server.model_copy(update={"grpc_port": 0, "metrics_port": 0}),
            "fer_target": f"127.0.0.1:{free_port()}",
            "readout": settings.chat.readout.model_copy(update={"post_response_reading_s": 0.0}),
            "surveys": settings.chat.surveys.model_copy(update={"max_submissions": 2}),
            "transcript": TranscriptSettings(default_page_size=50, max_page_size=100, max_page_bytes=64 * 1024),
        }
    )
    settings = settings.model_copy(update={"chat": options})
    server = await start_server(build_app(settings, ScriptedBackend("ok")), settings, options.server)
    await server.ready.wait()
    channel = make_channel(f"127.0.0.1:{server.port}", token(["chat"], "grpc-user"), timeout=30)
    yield chat_pb2_grpc.ChatServiceStub(channel)
    await channel.close()
    await server.stop()


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return exc.value


@pytest.mark.integration
async def test_status_codes_through_grpc(chat_stub: chat_pb2_grpc.ChatServiceStub, redis_url: str) -> None:
    stub = chat_stub
    sid = (await stub.CreateSession(chat_pb2.CreateSessionRequest())).session.session_id

    many = chat_pb2.Survey(current_feelings=[f"f{i}" for i in range(10_000)], text="x")
    error = await rpc_error(stub.SubmitPreSurvey(chat_pb2.SubmitPreSurveyRequest(session_id=sid, survey=many)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 12" in (error.details() or "")
    unknown = chat_pb2.Survey(current_feelings=["Happy", "Bored"])
    error = await rpc_error(stub.SubmitPreSurvey(chat_pb2.SubmitPreSurveyRequest(session_id=sid, survey=unknown)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'Bored' not offered; choose from Angry, Tired" in (error.details() or "")
    long_text = chat_pb2.Survey(text="x" * 4001)
    error = await rpc_error(stub.SubmitPreSurvey(chat_pb2.SubmitPreSurveyRequest(session_id=sid, survey=long_text)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "4000 limit" in (error.details() or "")
    long_comment = chat_pb2.SubmitRatingRequest(session_id=sid, empathy=3, relevance=3, fluency=3, comment="c" * 2001)
    error = await rpc_error(stub.SubmitRating(long_comment))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "2000 limit" in (error.details() or "")

    survey = chat_pb2.Survey(current_feelings=["happy"], desired_feelings=["PROUD"], text="fine")
    await stub.SubmitPreSurvey(chat_pb2.SubmitPreSurveyRequest(session_id=sid, survey=survey))
    rating = chat_pb2.SubmitRatingRequest(session_id=sid, empathy=3, relevance=3, fluency=3)
    await stub.SubmitRating(rating)
    await stub.SubmitRating(rating)
    error = await rpc_error(stub.SubmitRating(rating))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already holds 2 rating events" in (error.details() or "")

    # Transcript pages (several, each under the byte budget) hold every event exactly once.
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = SessionStore(client)
        for i in range(40):
            await store.record(sid, UserMessage(text=f"{i:04d}" + "w" * 3996))
    finally:
        await client.aclose()
    events, page_token, pages = [], "", 0
    while True:
        reply = await stub.GetTranscript(chat_pb2.GetTranscriptRequest(session_id=sid, page_token=page_token))
        assert reply.session.session_id == sid and reply.ByteSize() < 100 * 1024
        events.extend(reply.events)
        pages += 1
        if not (page_token := reply.next_page_token):
            break
    assert pages > 2 and len(events) == 1 + 1 + 2 + 40 and len({e.event_id for e in events}) == len(events)
    pre = next(json.loads(e.payload_json) for e in events if e.kind == "pre_survey")
    assert pre["current_feelings"] == ["Happy"] and pre["desired_feelings"] == ["Proud"]
    error = await rpc_error(stub.GetTranscript(chat_pb2.GetTranscriptRequest(session_id=sid, page_token="nope")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

    await stub.EndSession(chat_pb2.EndSessionRequest(session_id=sid))
    for call in (
        stub.SubmitRating(chat_pb2.SubmitRatingRequest(session_id=sid, empathy=5, relevance=5, fluency=5)),
        stub.SubmitPostSurvey(chat_pb2.SubmitPostSurveyRequest(session_id=sid, survey=survey)),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "submit the post-survey and rating before EndSession" in (error.details() or "")

    async def message() -> AsyncIterator[chat_pb2.ConverseRequest]:
        yield chat_pb2.ConverseRequest(session_id=sid, user_message=chat_pb2.UserMessage(text="hello again"))

    with pytest.raises(grpc.aio.AioRpcError) as exc:
        [r async for r in stub.Converse(message())]
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has ended" in (exc.value.details() or "")
