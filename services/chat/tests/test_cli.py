"""``emili chat`` with the participant's steps: driven by options and by typed answers, against a real chat server
(in-process, scripted model) with real Redis; the recorded session must hold what training needs."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest
from typer.testing import CliRunner

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_chat.cli import app
from emili_chat.main import build_app
from emili_chat.participant import parse_feelings, parse_rating
from emili_chat.settings import ChatSettings
from emili_core.grpc_client import make_channel
from emili_core.grpc_server import start_server
from emili_session.surveys import CURRENT_FEELINGS, DESIRED_FEELINGS
from emili_testing.chat import ScriptedBackend
from emili_testing.loop import BackgroundLoop
from emili_testing.plugin import token

T = TypeVar("T")
REPLY = "That sounds like a long day. What was the hardest part?"


@pytest.fixture
def chat_target(stack_env: dict[str, str]) -> Iterator[str]:
    settings = ChatSettings()
    options = settings.chat.model_copy(
        update={
            "server": settings.chat.server.model_copy(update={"grpc_port": 0, "metrics_port": 0}),
            "readout": settings.chat.readout.model_copy(update={"post_response_reading_s": 0.0}),
        }
    )
    settings = settings.model_copy(update={"chat": options})
    loop = BackgroundLoop()

    async def start() -> Any:
        server = await start_server(build_app(settings, ScriptedBackend(REPLY)), settings, settings.chat.server)
        await asyncio.wait_for(server.ready.wait(), 60)
        return server

    server = loop.run(start())
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        loop.run(server.stop())
        loop.close()


def transcript(target: str, session_id: str) -> tuple[chat_pb2.Session, list[dict[str, Any]]]:
    async def get() -> tuple[chat_pb2.Session, list[chat_pb2.TranscriptEvent]]:
        async with make_channel(target, token(["chat"], "cli-user")) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            events: list[chat_pb2.TranscriptEvent] = []
            page_token = ""
            while True:  # Every page.
                response: chat_pb2.GetTranscriptResponse = await stub.GetTranscript(
                    chat_pb2.GetTranscriptRequest(session_id=session_id, page_token=page_token)
                )
                events.extend(response.events)
                if not (page_token := response.next_page_token):
                    return response.session, events

    session, events = asyncio.run(get())
    return session, [{"kind": e.kind, **json.loads(e.payload_json)} for e in events]


def session_id_of(output: str) -> str:
    match = re.search(r"session\s+([0-9a-f]{32})\s+ended", output)
    assert match, output
    return match.group(1)


def one(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [e for e in events if e["kind"] == kind]
    assert len(found) == 1, (kind, [e["kind"] for e in events])
    return found[0]


# --- parsing ------------------------------------------------------------------------------------------------


def test_feelings_by_number_or_name_in_the_vocabulary_spelling() -> None:
    assert parse_feelings("4, tired,ANXIOUS 4", CURRENT_FEELINGS) == ["Happy", "Tired", "Anxious"]
    assert parse_feelings("", DESIRED_FEELINGS) == []
    assert parse_feelings("6,12", DESIRED_FEELINGS) == ["Hopeful", "Determined"]
    with pytest.raises(ValueError, match="1 to 7"):
        parse_feelings("8", CURRENT_FEELINGS)
    with pytest.raises(ValueError, match="'Bored' is not offered"):
        parse_feelings("Bored", CURRENT_FEELINGS)


def test_rating_is_three_likert_scores() -> None:
    assert parse_rating("4,4,5") == {"empathy": 4, "relevance": 4, "fluency": 5}
    assert parse_rating(" 1 3 5 ") == {"empathy": 1, "relevance": 3, "fluency": 5}
    for bad in ("4,4", "4,4,6", "0,3,3", "a,b,c", "4,4,5,5"):
        with pytest.raises(ValueError):
            parse_rating(bad)


def test_bad_options_are_refused_before_anything_is_created() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["--simulate", "--target", "127.0.0.1:1", "--rating", "4,4,9"])
    assert result.exit_code == 2 and "--rating" in result.output
    result = runner.invoke(app, ["--simulate", "--target", "127.0.0.1:1", "--feelings", "Bored"])
    assert result.exit_code == 2 and "--feelings" in result.output


# --- against a chat server ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_scripted_session_holds_surveys_rating_and_consent(chat_target: str) -> None:
    args = [
        "--simulate",
        "--target",
        chat_target,
        "--no-consent-training",
        "--feelings",
        "4,tired",
        "--desired-feelings",
        "Hopeful, 10",
        "--pre-survey-text",
        "I am tired after a long week but glad it is Friday.",
        "--post-feelings",
        "happy",
        "--post-survey-text",
        "I feel calmer and a bit more cheerful now.",
        "--rating",
        "4,4,5",
        "--comment",
        "It listened.",
    ]
    result = CliRunner().invoke(app, args, input="I had a long day at work\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "What was the hardest part?" in result.output
    assert "will not be used for training" in result.output
    session, events = transcript(chat_target, session_id_of(result.output))

    assert session.consent.use_for_training is False and session.consent.store_frames is False
    assert session.state == chat_pb2.SESSION_STATE_ENDED and session.user_id == "cli-user"
    pre = one(events, "pre_survey")
    assert pre["current_feelings"] == ["Happy", "Tired"] and pre["desired_feelings"] == ["Hopeful", "Content"]
    assert pre["text"] == "I am tired after a long week but glad it is Friday."
    post = one(events, "post_survey")
    assert post["current_feelings"] == ["Happy"] and post["text"] == "I feel calmer and a bit more cheerful now."
    rating = one(events, "rating")
    assert (rating["empathy"], rating["relevance"], rating["fluency"], rating["comment"]) == (4, 4, 5, "It listened.")
    kinds = [e["kind"] for e in events]
    assert kinds.index("pre_survey") < kinds.index("user_message") < kinds.index("assistant_message")
    assert kinds.index("assistant_message") < kinds.index("post_survey") < kinds.index("rating")
    assert kinds[-1] == "session_ended"
    assert one(events, "user_message")["text"] == "I had a long day at work"
    assert "readout_injected" in kinds


@pytest.mark.integration
def test_typed_answers_are_asked_again_until_valid(chat_target: str) -> None:
    typed = [
        "maybe",  # Training consent: not y/n, asked again.
        "yes",
        "9",  # Current feelings: no 9th, asked again.
        "sad, 3",
        "",  # Desired feelings: none.
        "",  # Pre-chat text: required, asked again.
        "Worried about an exam tomorrow.",
        "Hello EMILI",
        "/quit",
        "2",  # Post-chat current feelings.
        "Still a little tired, but less worried.",
        "5",
        "six",  # Relevance: not a number, asked again.
        "4",
        "3",
        "",  # No comment (optional; the end of input would do too).
    ]
    result = CliRunner().invoke(
        app, ["--simulate", "--no-readouts", "--target", chat_target], input="\n".join(typed) + "\n"
    )
    assert result.exit_code == 0, result.output
    assert "Please answer y (yes) or n (no)." in result.output
    assert "not one of the numbers 1 to 7" in result.output
    assert "Please write at least a few words." in result.output
    assert "Please answer with a whole number from 1 to 5." in result.output
    assert "did the responses show understanding?" in result.output
    session, events = transcript(chat_target, session_id_of(result.output))

    assert session.consent.use_for_training is True and session.consent.store_frames is False
    pre = one(events, "pre_survey")
    assert pre["current_feelings"] == ["Sad", "Anxious"] and pre["desired_feelings"] == []
    assert pre["text"] == "Worried about an exam tomorrow."
    post = one(events, "post_survey")
    assert post["current_feelings"] == ["Tired"] and post["text"] == "Still a little tired, but less worried."
    rating = one(events, "rating")
    assert (rating["empathy"], rating["relevance"], rating["fluency"], rating["comment"]) == (5, 4, 3, "")
    assert [e["kind"] for e in events][-1] == "session_ended"


@pytest.mark.integration
def test_input_ending_after_the_chat_still_ends_the_session(chat_target: str) -> None:
    args = ["--simulate", "--target", chat_target, "--consent-training", "--feelings", "", "--desired-feelings", ""]
    args += ["--pre-survey-text", "Fine, thanks."]
    result = CliRunner().invoke(app, args, input="Hi\n")  # Input ends during the chat: no post-chat answers.
    assert result.exit_code == 0, result.output
    assert "remaining questions were skipped" in result.output
    session, events = transcript(chat_target, session_id_of(result.output))
    kinds = [e["kind"] for e in events]
    assert "pre_survey" in kinds and "post_survey" not in kinds and "rating" not in kinds
    assert session.state == chat_pb2.SESSION_STATE_ENDED and kinds[-1] == "session_ended"


@pytest.mark.integration
def test_no_surveys_is_a_plain_chat(chat_target: str) -> None:
    args = ["--simulate", "--target", chat_target, "--no-surveys", "--no-consent-training"]
    result = CliRunner().invoke(app, args, input="Hi\n/quit\n")
    assert result.exit_code == 0, result.output
    _, events = transcript(chat_target, session_id_of(result.output))
    kinds = [e["kind"] for e in events]
    assert "pre_survey" not in kinds and "rating" not in kinds and "assistant_message" in kinds
