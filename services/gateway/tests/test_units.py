"""The gateway's pure parts, without servers: error mapping, vocabularies, codes, export formats, settings."""

from __future__ import annotations

import csv
import io

import pytest
from pydantic import ValidationError

from emili_core import errors
from emili_gateway.app import error_body
from emili_gateway.chat_client import ChatEvent
from emili_gateway.errors import CanaryNotFound, Gone, PayloadTooLarge, RateLimited
from emili_gateway.export import CSV_COLUMNS, export_row, to_csv, to_jsonl
from emili_gateway.models import DEFAULT_DESIRED_FEELINGS, SessionRecord, Study, StudyPublic, StudySpec
from emili_gateway.ratelimit import TokenBucket
from emili_gateway.settings import GatewaySettings
from emili_gateway.studies import check_feelings, new_withdraw_code, withdraw_hash


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (errors.InvalidInput("x"), 400, "invalid_input"),
        (PayloadTooLarge("x"), 413, "payload_too_large"),
        (errors.Unauthenticated("x"), 401, "unauthenticated"),
        (errors.PermissionDenied("x"), 403, "permission_denied"),
        (errors.NotFound("x"), 404, "not_found"),
        (CanaryNotFound("x"), 404, "canary_not_found"),
        (errors.FailedPrecondition("x"), 409, "conflict"),
        (Gone("x"), 410, "gone"),
        (errors.Overloaded("x"), 429, "overloaded"),
        (RateLimited("x", 3), 429, "rate_limited"),
        (errors.DependencyUnavailable("x"), 503, "unavailable"),
        (errors.NotReady("x"), 503, "not_ready"),
    ],
)
def test_each_domain_error_has_one_http_status(exc: Exception, status: int, code: str) -> None:
    assert error_body(exc) == (status, {"error": code, "detail": "x"})


def test_unexpected_errors_show_only_an_id(caplog: pytest.LogCaptureFixture) -> None:
    status, body = error_body(KeyError("secret internals"))
    assert status == 500 and "secret" not in body["detail"] and "error id" in body["detail"]
    assert "unexpected error" in caplog.text


def test_feelings_come_from_the_vocabulary_in_its_spelling() -> None:
    vocabulary = ["Happy", "Sad", "Tired"]
    assert check_feelings(["happy", "TIRED"], vocabulary, "current feelings") == ["Happy", "Tired"]
    with pytest.raises(errors.InvalidInput, match=r"\['Bored'\] are not offered"):
        check_feelings(["Bored"], vocabulary, "current feelings")
    with pytest.raises(errors.InvalidInput, match="must not repeat"):
        check_feelings(["Sad", "sad"], vocabulary, "current feelings")


def test_withdraw_codes_are_read_forgivingly() -> None:
    code = new_withdraw_code()
    assert len(code) == 19 and code.count("-") == 3
    assert withdraw_hash(code) == withdraw_hash(code.lower().replace("-", " ")) != withdraw_hash(new_withdraw_code())


def test_study_defaults_follow_the_emili_forms_and_the_public_view_hides_arms() -> None:
    spec = StudySpec(name="s", arms=[{"arm": "base"}], consent_text="c")  # type: ignore[list-item]
    assert spec.desired_feelings == list(DEFAULT_DESIRED_FEELINGS) and spec.max_turns == 10
    study = Study(**spec.model_dump(), study_id="st-0123456789ab", created_ms=1, created_by="r")
    public = StudyPublic.of(study).model_dump()
    assert "arms" not in public and public["likert_labels"] == {1: "Not at all", 3: "Somewhat", 5: "Very much"}
    with pytest.raises(ValidationError, match="max_turns or time_limit_seconds"):
        StudySpec(name="s", arms=[{"arm": "base"}], consent_text="c", max_turns=None)  # type: ignore[list-item]


def test_export_rows_and_csv_neutralise_formulas() -> None:
    study = Study(
        name="s", arms=[{"arm": "base"}], consent_text="c", study_id="st-0123456789ab", created_ms=1, created_by="r"
    )  # type: ignore[list-item]
    record = SessionRecord(
        session_id="s1",
        study_id=study.study_id,
        participant_id="p-0",
        arm="base",
        created_ms=1,
        camera=True,
        store_frames=False,
        use_for_training=True,
        turns=1,
    )
    events = [
        ChatEvent("1", 1, "pre_survey", {"current_feelings": ["Sad"], "desired_feelings": [], "text": "-low"}),
        ChatEvent("2", 2, "user_message", {"text": "hi"}),
        ChatEvent("3", 3, "assistant_message", {"text": "hello", "turn_id": "t", "model_id": "m+v1"}),
        ChatEvent("4", 4, "fer_reading", {"face_found": True}),
        ChatEvent("5", 5, "rating", {"empathy": 5, "relevance": 4, "fluency": 3, "comment": "@cmd"}),
    ]
    row = export_row(study, record, events)
    assert row["model_ids"] == ["m+v1"] and [t["kind"] for t in row["transcript"]] == [
        "user_message",
        "assistant_message",
    ]
    assert to_jsonl([row]).count("\n") == 1
    table = list(csv.DictReader(io.StringIO(to_csv([row]))))
    assert list(table[0]) == list(CSV_COLUMNS)
    assert table[0]["pre_text"] == "'-low" and table[0]["comment"] == "'@cmd" and table[0]["empathy"] == "5"


def test_token_bucket_drops_what_exceeds_the_rate() -> None:
    bucket = TokenBucket(2.0)
    assert [bucket.take() for _ in range(3)] == [True, True, False]


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory) -> None:
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]
    monkeypatch.setenv("EMILI_GATEWAY__SERVER__HTTP_PORT", "9000")
    monkeypatch.setenv("EMILI_GATEWAY__LIMITS__MAX_FRAME_BYTES", "65536")
    monkeypatch.setenv("EMILI_GATEWAY__CHAT_TARGET", "chat:50052")
    settings = GatewaySettings()
    assert settings.gateway.server.http_port == 9000 and settings.gateway.server.metrics_port == 9105
    assert settings.gateway.limits.max_frame_bytes == 65536 and settings.gateway.chat_target == "chat:50052"
    monkeypatch.setenv("EMILI_GATEWAY__LIMITS__MAX_MESSAGE_CHARS", "5000")
    with pytest.raises(ValidationError):
        GatewaySettings()
