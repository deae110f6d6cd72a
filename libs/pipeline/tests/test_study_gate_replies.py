"""What the gate's simulated users heard: hidden quality, length penalty and cut-off share per arm, paired by user."""

from __future__ import annotations

import json
from typing import Any

import pytest

from emili_core.errors import NotFound
from emili_core.keys import pipeline_arm_sessions_key, session_record_keys
from emili_core.objectstore import Bucket
from emili_pipeline.simulator.state import reply_quality
from emili_pipeline.study_gate_replies import compare, gate_replies, gate_replies_table, reply_values

GOOD = "I'm so sorry, that sounds really hard. How are you?"
# Long enough (against an 8-word message) for the full length penalty.
LONG = " ".join(["I think that you should maybe consider many other things"] * 5)


def _events(replies: list[tuple[str, bool | None]], user: str = "My dog died last week.") -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {"event_id": "1-0", "kind": "session_created", "time_ms": 1, "system_prompt": "Be kind.", "synthetic": True}
    ]
    for i, (text, at_limit) in enumerate(replies):
        t = 10 * (i + 1)
        events.append({"event_id": f"{t}-0", "kind": "user_message", "time_ms": t, "text": user})
        events.append(
            {
                "event_id": f"{t}-1",
                "kind": "assistant_message",
                "time_ms": t + 1,
                "text": text,
                "turn_id": f"turn-{i}",
                "at_limit": at_limit,
            }
        )
    # An unprompted remark answers a face, not a message: not counted.
    events.append(
        {
            "event_id": "99-0",
            "kind": "assistant_message",
            "time_ms": 99,
            "text": "Hm?",
            "turn_id": "x",
            "unprompted": True,
        }
    )
    return events


def test_each_reply_is_scored_against_the_message_it_answers() -> None:
    rows = reply_values(_events([(GOOD, False), (LONG, True)]))
    assert len(rows) == 2
    assert rows[0] == pytest.approx(
        {
            "quality": reply_quality(GOOD, "My dog died last week.").score,
            "length_penalty": 0.0,
            "cut_off": 0.0,
            "words": 10,
        }
    )
    assert rows[1]["length_penalty"] == 1.0 and rows[1]["cut_off"] == 1.0 and rows[1]["quality"] < rows[0]["quality"]


def test_compare_pairs_users_who_met_both_arms() -> None:
    production = {"u1": {"quality": 0.0, "length_penalty": 1.0, "cut_off": 1.0, "words": 80.0}}
    production["u2"] = dict(production["u1"])
    candidate = {
        "u1": {"quality": 0.2, "length_penalty": 0.5, "cut_off": 0.0, "words": 40.0},
        "u3": {"quality": 0.9, "length_penalty": 0.0, "cut_off": 0.0, "words": 10.0},  # Never met production.
    }
    result = compare(candidate, production)
    assert result["sessions"] == {"candidate": 2, "production": 2}
    assert result["quality"]["candidate"] == pytest.approx(0.55)  # Each arm's mean is over all its sessions ...
    assert result["quality"]["paired"]["n_pairs"] == 1  # ... the difference only over users in both.
    assert result["quality"]["paired"]["difference"] == pytest.approx(0.2)
    assert result["cut_off"]["paired"]["difference"] == pytest.approx(-1.0)


class _Store:
    def __init__(self) -> None:
        self.objects: dict[tuple[Any, str], bytes] = {}

    def put(self, bucket: Any, key: str, value: Any) -> None:
        self.objects[(bucket, key)] = value if isinstance(value, bytes) else json.dumps(value).encode()

    def get_bytes(self, bucket: Any, key: str) -> bytes:
        if (bucket, key) not in self.objects:
            raise NotFound(key)
        return self.objects[(bucket, key)]

    def get_json(self, bucket: Any, key: str) -> Any:
        return json.loads(self.get_bytes(bucket, key))


def _session(store: _Store, session_id: str, user: str, replies: list[tuple[str, bool | None]]) -> None:
    keys = session_record_keys(session_id)
    store.put(Bucket.SESSIONS, keys["session.json"], {"session_id": session_id, "user_id": user})
    lines = "\n".join(json.dumps(e) for e in _events(replies))
    store.put(Bucket.SESSIONS, keys["events.jsonl"], lines.encode())


def test_gate_replies_reads_the_pipelines_arm_sessions_and_renders_a_synthetic_table() -> None:
    store = _Store()
    ids = {arm: [f"{arm}-{i}" for i in range(6)] for arm in ("a", "b")}
    for i in range(6):
        _session(store, ids["a"][i], f"u{i}", [(LONG, True), (LONG, True)])
        _session(store, ids["b"][i], f"u{i}", [(GOOD, False), (LONG, True)])
    store.put(Bucket.SESSIONS, session_record_keys("b-broken")["session.json"], {"user_id": "u9"})
    store.put(Bucket.SESSIONS, session_record_keys("b-broken")["events.jsonl"], b"{not json")
    store.put(
        Bucket.MODELS,
        pipeline_arm_sessions_key("pl-1"),
        {
            "arms": {"base": ids["a"], "dpo": [*ids["b"], "b-lost", "b-broken"]},  # Two records cannot be read.
            "versions": {"base": "base", "dpo": "dpo-1"},
        },
    )
    heard = gate_replies(store, "pl-1", "dpo-1")
    assert heard["sessions"] == {"candidate": 6, "production": 6} and heard["unreadable"] == 2
    assert heard["cut_off"]["production"] == 1.0 and heard["cut_off"]["candidate"] == 0.5
    assert heard["cut_off"]["paired"]["difference"] == pytest.approx(-0.5)
    assert heard["quality"]["paired"]["difference"] > 0
    assert gate_replies(store, "pl-1", "dpo-2") == {}  # Not a version the step ran.
    table = gate_replies_table({"noise": [{"iteration": 1, "gate_replies": heard}, {"iteration": 2}]})
    assert "SYNTHETIC" in table[0] and len([r for r in table if r.startswith("| noise |")]) == 1
    assert "| 1.00 / 0.50 (-0.50" in table[-1] and "6 / 6 (2 unreadable)" in table[-1]
    assert gate_replies_table({"noise": [{"iteration": 1}]}) == []


def test_gate_replies_command_rewrites_only_a_studys_report(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from emili_pipeline.study_cli import commands

    other = tmp_path / "other.json"
    other.write_text("{}")
    result = CliRunner().invoke(commands, ["study", "gate-replies", str(other)])
    assert result.exit_code == 2 and "study.json" in result.output
    assert other.read_text() == "{}"
