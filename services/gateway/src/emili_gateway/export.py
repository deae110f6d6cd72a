"""Researchers' export of a study's sessions: one row per session, as JSON lines or CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from typing import Any

from emili_gateway.chat_client import ChatEvent
from emili_gateway.models import SessionRecord, Study
from emili_session.events import EventKind

CSV_COLUMNS = (
    "study_id",
    "session_id",
    "participant_id",
    "arm",
    "synthetic",
    "model_ids",
    "state",
    "created_ms",
    "ended_ms",
    "consent_camera",
    "consent_store_frames",
    "consent_use_for_training",
    "turns",
    "pre_current_feelings",
    "pre_desired_feelings",
    "pre_text",
    "post_current_feelings",
    "post_desired_feelings",
    "post_text",
    "empathy",
    "relevance",
    "fluency",
    "comment",
    "transcript_json",
)
# Spreadsheets run cells starting with these as formulas; participants' free text must not be able to.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# What researchers get of the conversation: the messages and the readouts EMILI saw.
_CONVERSATION = frozenset({EventKind.USER_MESSAGE, EventKind.ASSISTANT_MESSAGE, EventKind.READOUT_INJECTED})


def _last(events: list[ChatEvent], kind: str) -> dict[str, Any] | None:
    found = [e.payload for e in events if e.kind == kind]
    return found[-1] if found else None


def export_row(study: Study, record: SessionRecord, events: list[ChatEvent]) -> dict[str, Any]:
    """A session for researchers (unblinded): the gateway's record, surveys, rating and the conversation."""
    transcript = []
    model_ids = set()
    for event in events:
        text = event.payload.get("text")
        if event.kind in _CONVERSATION and isinstance(text, str):
            entry: dict[str, Any] = {"kind": event.kind, "time_ms": event.time_ms, "text": text}
            if event.kind == EventKind.ASSISTANT_MESSAGE:
                entry["unprompted"] = bool(event.payload.get("unprompted", False))
                model_ids.add(str(event.payload.get("model_id", "")))
            transcript.append(entry)
    rating = _last(events, EventKind.RATING)
    return {
        "study_id": study.study_id,
        "session_id": record.session_id,
        "participant_id": record.participant_id,
        "arm": record.arm,
        "synthetic": record.synthetic,  # A simulated participant's session: never to be read as a person's.
        "model_ids": sorted(m for m in model_ids if m),
        "state": record.state,
        "created_ms": record.created_ms,
        "ended_ms": record.ended_ms,
        "consent": {
            "camera": record.camera,
            "store_frames": record.store_frames,
            "use_for_training": record.use_for_training,
        },
        "turns": record.turns,
        "pre_survey": _last(events, EventKind.PRE_SURVEY),
        "post_survey": _last(events, EventKind.POST_SURVEY),
        "rating": (
            {k: rating.get(k) for k in ("empathy", "relevance", "fluency", "comment")} if rating is not None else None
        ),
        "transcript": transcript,
    }


def _text(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _survey_cells(prefix: str, survey: dict[str, Any] | None) -> dict[str, Any]:
    survey = survey or {}
    return {
        f"{prefix}_current_feelings": ";".join(survey.get("current_feelings", [])),
        f"{prefix}_desired_feelings": ";".join(survey.get("desired_feelings", [])),
        f"{prefix}_text": _text(survey.get("text", "")),
    }


def to_jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def to_csv(rows: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        rating = row["rating"] or {}
        consent = row["consent"]
        writer.writerow(
            {
                **{k: row[k] for k in ("study_id", "session_id", "participant_id", "arm", "state", "turns")},
                "synthetic": row["synthetic"],
                "model_ids": ";".join(row["model_ids"]),
                "created_ms": row["created_ms"],
                "ended_ms": row["ended_ms"],
                "consent_camera": consent["camera"],
                "consent_store_frames": consent["store_frames"],
                "consent_use_for_training": consent["use_for_training"],
                **_survey_cells("pre", row["pre_survey"]),
                **_survey_cells("post", row["post_survey"]),
                "empathy": rating.get("empathy", ""),
                "relevance": rating.get("relevance", ""),
                "fluency": rating.get("fluency", ""),
                "comment": _text(rating.get("comment", "")),
                "transcript_json": json.dumps(row["transcript"]),
            }
        )
    return out.getvalue()
