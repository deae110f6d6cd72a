"""SFT examples, feedback preference pairs, ids, hashes and manifests built from recorded sessions."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from emili_core.errors import NotFound
from emili_core.objectstore import Bucket
from emili_labeler import jobs, pipeline_steps
from emili_labeler.datasets import (
    DatasetManifest,
    SessionInput,
    TurnLabel,
    content_id,
    feedback_pairs,
    jsonl_bytes,
    plain_reply,
    sft_delta_cutoff,
    sft_examples,
    trim_to_sentence,
    write_jsonl,
)
from emili_labeler.runtime import build_runtime
from emili_labeler.settings import LabelerSettings
from emili_pipeline.config import PipelineConfig
from emili_session.conversation import conversation_messages

SYSTEM = "You are EMILI, an Emotionally Intelligent Listener."


class Recorder:
    """Builds an event list the way the chat service records it."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = [
            {"event_id": "e0", "kind": "session_created", "time_ms": 0, "model_arm": "a", "model_id": "m"}
        ]

    def add(self, kind: str, **fields: Any) -> Recorder:
        n = len(self.events)
        self.events.append({"event_id": f"e{n}", "kind": kind, "time_ms": 1000 * n, **fields})
        return self

    def readout(self, text: str = "Right now, user looks HAPPY (46)") -> Recorder:
        return self.add("readout_injected", text=text, cadence="before_user_message")

    def user(self, text: str) -> Recorder:
        return self.add("user_message", text=text)

    def reply(self, turn_id: str, text: str, unprompted: bool = False) -> Recorder:
        return self.add("assistant_message", text=text, turn_id=turn_id, unprompted=unprompted, model_id="m")


def session(session_id: str, user: str, reply: str, flagged: bool | None, face: str = "HAPPY (40)") -> SessionInput:
    events = Recorder().readout(f"Right now, user looks {face}").user(user).reply(f"{session_id}-t1", reply).events
    return SessionInput(session_id, SYSTEM, events, {f"{session_id}-t1": TurnLabel(flagged, 1.0 if flagged else -1.0)})


# --- conversation ---------------------------------------------------------------------------------------


def test_conversation_messages_order_roles_and_turn_ids() -> None:
    rec = Recorder().readout().add("reminder", text="short").user("hi").reply("t1", "Hello!")
    rec.add("post_response_reading", turn_id="t1", scores={}).reply("t2", "You look happy.", unprompted=True)
    assert conversation_messages(SYSTEM, rec.events) == [
        {"role": "system", "content": SYSTEM},
        {"role": "system", "content": "Right now, user looks HAPPY (46)"},
        {"role": "system", "content": "short"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!", "turn_id": "t1"},
        {"role": "assistant", "content": "You look happy.", "turn_id": "t2"},
    ]


def test_conversation_messages_accepts_store_payloads_and_rejects_missing_turn_id() -> None:
    events = [
        {"event_id": "a", "kind": "user_message", "time_ms": 1, "payload": {"text": "hi"}},
        {"event_id": "b", "kind": "assistant_message", "time_ms": 2, "payload": {"text": "yo", "turn_id": "t"}},
    ]
    assert [m["content"] for m in conversation_messages("", events)] == ["hi", "yo"]
    with pytest.raises(ValueError, match="turn_id"):
        conversation_messages(SYSTEM, [{"event_id": "x", "kind": "assistant_message", "time_ms": 1, "text": "a"}])


# --- SFT ------------------------------------------------------------------------------------------------


def _weights(example: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("weight")) for m in example["messages"]]


def test_sft_only_flagged_assistant_turns_get_weight_one() -> None:
    rec = Recorder().readout().user("hi").reply("t1", "Hello!").readout().user("meh").reply("t2", "Oh?")
    rec.user("ok").reply("t3", "Right.").user("bye").reply("t4", "Bye!")
    labels = {"t1": TurnLabel(True, 0.5), "t2": TurnLabel(False, -0.2), "t3": TurnLabel(None, None)}  # t4 unlabelled
    (example,) = sft_examples("s1", SYSTEM, rec.events, labels)
    assistant = [m for m in example["messages"] if m["role"] == "assistant"]
    assert [m["weight"] for m in assistant] == [1, 0, 0, 0]
    assert example["flagged_turns"] == ["t1"]
    for message in example["messages"]:
        if message["role"] != "assistant":
            assert "weight" not in message  # User and system messages are never trained on.
        assert set(message) <= {"role", "content", "weight"}
    assert example["session_id"] == "s1"
    assert sum(1 for m in example["messages"] if m["role"] == "system") == 3  # Prompt + two readouts.


def test_sft_sessions_without_flags_produce_nothing() -> None:
    rec = Recorder().user("hi").reply("t1", "Hello!").user("so").reply("t2", "So?")
    assert sft_examples("s", SYSTEM, rec.events, {"t1": TurnLabel(False, -1.0), "t2": TurnLabel(None)}) == []
    assert sft_examples("s", SYSTEM, rec.events, {}) == []
    assert sft_examples("s", SYSTEM, Recorder().events, {}) == []


def test_sft_empty_reply_is_never_weighted() -> None:
    rec = Recorder().user("hi").reply("t1", "   ")
    assert sft_examples("s", SYSTEM, rec.events, {"t1": TurnLabel(True, 1.0)}) == []


def test_sft_without_readouts_drops_them_and_unprompted_turns_lose_weight() -> None:
    rec = Recorder().readout().add("reminder", text="short").user("hi").reply("t1", "Hello!")
    rec.readout("Change in emotions detected!").reply("t2", "You look surprised!", unprompted=True)
    labels = {"t1": TurnLabel(True, 1.0), "t2": TurnLabel(True, 1.0)}
    (with_faces,) = sft_examples("s", SYSTEM, rec.events, labels)
    (without,) = sft_examples("s", SYSTEM, rec.events, labels, include_readouts=False)
    assert _weights(with_faces) == [
        ("system", None),
        ("system", None),
        ("system", None),
        ("user", None),
        ("assistant", 1),
        ("system", None),
        ("assistant", 1),
    ]
    assert _weights(without) == [("system", None), ("user", None), ("assistant", 1), ("assistant", 0)]
    assert with_faces["id"] != without["id"]
    # Only an unprompted turn flagged: without its trigger there is nothing to train on.
    assert sft_examples("s", SYSTEM, rec.events, {"t2": TurnLabel(True, 1.0)}, include_readouts=False) == []


def test_sft_ids_are_deterministic_and_content_addressed() -> None:
    rec = Recorder().user("hi").reply("t1", "Hello!")
    labels = {"t1": TurnLabel(True, 1.0)}
    a = sft_examples("s", SYSTEM, rec.events, labels)
    b = sft_examples("s", SYSTEM, [dict(e) for e in rec.events], {"t1": TurnLabel(True, 1.0)})
    assert a == b and len(a[0]["id"]) == 64
    assert sft_examples("other", SYSTEM, rec.events, labels)[0]["id"] != a[0]["id"]
    assert sft_examples("s", SYSTEM + "!", rec.events, labels)[0]["id"] != a[0]["id"]


# --- feedback pairs -------------------------------------------------------------------------------------


def test_feedback_pairs_positive_vs_negative_in_the_same_context_only() -> None:
    sessions = [
        session("s1", "I had a rough day.", "That sounds hard.", True, face="SAD (60)"),
        session("s2", "I had a rough day.", "Cheer up!", False, face="Neutral (30)"),  # Other face, same context.
        session("s3", "I got a puppy!", "Nice.", False),  # Other context: nothing to pair it with.
        session("s4", "I got a puppy!", "Tell me about it.", None),  # Unflaggable.
    ]
    (pair,) = feedback_pairs(sessions)
    assert (pair["chosen"], pair["rejected"]) == ("That sounds hard.", "Cheer up!")
    assert (pair["chosen_delta"], pair["rejected_delta"]) == (1.0, -1.0)
    assert pair["sessions"] == ["s1", "s2"] and pair["turns"] == ["s1-t1", "s2-t1"]
    assert pair["source"] == "feedback"
    assert pair["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "I had a rough day."}]


def test_feedback_context_includes_system_prompt_and_earlier_replies() -> None:
    base = session("s1", "hello", "Hi there.", True)
    other = session("s2", "hello", "Go away.", False)
    assert len(feedback_pairs([base, other])) == 1
    other_prompt = SessionInput(other.session_id, "Another prompt.", other.events, other.labels)
    assert feedback_pairs([base, other_prompt]) == []

    # Second turns after different first replies are different contexts; after the same one, the same.
    def two_turns(sid: str, first: str, second: str, flagged: bool) -> SessionInput:
        events = Recorder().user("hello").reply(f"{sid}-a", first).user("how are you?").reply(f"{sid}-b", second)
        return SessionInput(sid, SYSTEM, events.events, {f"{sid}-b": TurnLabel(flagged, 0.0)})

    assert feedback_pairs([two_turns("x", "Hi!", "Good.", True), two_turns("y", "Hey.", "Bad.", False)]) == []
    (pair,) = feedback_pairs([two_turns("x", "Hi!", "Good.", True), two_turns("y", " Hi!\n", "Bad.", False)])
    assert [m["role"] for m in pair["prompt"]] == ["system", "user", "assistant", "user"]


def test_feedback_pairs_same_sign_or_unprompted_or_identical_replies_are_not_paired() -> None:
    assert feedback_pairs([session("a", "hi", "Hello.", True), session("b", "hi", "Hey!", True)]) == []
    assert feedback_pairs([session("a", "hi", "Hello.", False), session("b", "hi", "Hey!", False)]) == []
    assert feedback_pairs([session("a", "hi", "Hello.", True), session("b", "hi", " Hello. ", False)]) == []
    # Not flagged and no delta: the labeller could not read the face, which is not a negative reaction.
    unread = session("b", "hi", "Hey!", False)
    unread = SessionInput("b", SYSTEM, unread.events, {"b-t1": TurnLabel(False, None)})
    assert feedback_pairs([session("a", "hi", "Hello.", True), unread]) == []
    unread = SessionInput("b", SYSTEM, unread.events, {"b-t1": TurnLabel(False, float("nan"))})
    assert feedback_pairs([session("a", "hi", "Hello.", True), unread]) == []
    # An unprompted remark answers a face, not the user, even right after a user message (failed reply).
    unprompted = Recorder().user("hi").readout().reply("u-1", "You look sad.", unprompted=True)
    labels = {"u-1": TurnLabel(False, -1.0)}
    assert (
        feedback_pairs([session("a", "hi", "Hello.", True), SessionInput("u", SYSTEM, unprompted.events, labels)]) == []
    )


def test_feedback_pairs_have_no_role_tags_and_prompt_ends_with_user() -> None:
    sessions = [
        session("a", "hi", "Assistant: Hello!", True),
        session("b", "hi", "<|assistant|>\nGo away.<|eot_id|>", False),
    ]
    (pair,) = feedback_pairs(sessions, include_readouts=True)
    assert (pair["chosen"], pair["rejected"]) == ("Hello!", "Go away.")
    assert pair["prompt"][-1] == {"role": "user", "content": "hi"}
    assert all(m["role"] != "assistant" for m in pair["prompt"])
    assert pair["prompt"][1]["content"].startswith("Right now, user looks")  # include_readouts keeps the face.
    assert plain_reply("<|im_start|>assistant\nEMILI: Hi<|im_end|>") == "Hi"
    assert plain_reply("Assistants are great.") == "Assistants are great."


def _crowd(n_pos: int, n_neg: int) -> list[SessionInput]:
    return [session(f"p{i}", "hi", f"good {i}", True) for i in range(n_pos)] + [
        session(f"n{i}", "hi", f"bad {i}", False) for i in range(n_neg)
    ]


def test_feedback_pairs_cap_seed_and_input_order() -> None:
    sessions = _crowd(4, 5)
    pairs = feedback_pairs(sessions, max_pairs_per_context=3, seed=7)
    assert len(pairs) == 3
    assert all(p["chosen"].startswith("good") and p["rejected"].startswith("bad") for p in pairs)
    shuffled = list(sessions)
    random.Random(1).shuffle(shuffled)
    assert feedback_pairs(shuffled, max_pairs_per_context=3, seed=7) == pairs
    draws = {tuple(p["id"] for p in feedback_pairs(sessions, max_pairs_per_context=3, seed=s)) for s in range(6)}
    assert len(draws) > 1  # The seed chooses which of the 20 combinations are kept.
    assert len(feedback_pairs(sessions, max_pairs_per_context=100)) == 20
    assert [p["id"] for p in pairs] == sorted(p["id"] for p in pairs)
    with pytest.raises(ValueError):
        feedback_pairs(sessions + sessions[:1])
    with pytest.raises(ValueError, match="margin, random"):
        feedback_pairs(sessions, selection="best")  # type: ignore[arg-type]


def _reacted(
    session_id: str, reply: str, delta: float | None, flagged: bool = True, session_user: str = "hi"
) -> SessionInput:
    events = Recorder().user(session_user).reply(f"{session_id}-t1", reply).events
    return SessionInput(session_id, SYSTEM, events, {f"{session_id}-t1": TurnLabel(flagged, delta)})


def test_feedback_pairs_keep_the_widest_reaction_margins_first() -> None:
    sessions = [
        _reacted("p-strong", "good strong", 9.0),
        _reacted("p-weak", "good weak", 1.0),
        _reacted("p-unmeasured", "good unmeasured", None),  # Flagged without a delta: no margin to rank by.
        _reacted("n-strong", "bad strong", -8.0, flagged=False),
        _reacted("n-weak", "bad weak", -0.5, flagged=False),
    ]
    top = feedback_pairs(sessions, max_pairs_per_context=2, selection="margin")
    # Margins 17, 9.5 (strong - weak) and 9 (weak - strong): the first two are kept.
    assert {(p["chosen"], p["rejected"]) for p in top} == {("good strong", "bad strong"), ("good strong", "bad weak")}
    (widest,) = feedback_pairs(sessions, max_pairs_per_context=1)  # Margin is the default.
    assert (widest["chosen_delta"], widest["rejected_delta"]) == (9.0, -8.0)
    every = feedback_pairs(sessions, max_pairs_per_context=100, selection="margin")
    assert len(every) == 6  # The cap, not the ranking, decides how many; unmeasured pairs come last.
    assert feedback_pairs(list(reversed(sessions)), max_pairs_per_context=2) == top
    # Random selection ignores the margins: over seeds it keeps other combinations too.
    draws = {
        frozenset(p["chosen"] for p in feedback_pairs(sessions, max_pairs_per_context=2, seed=s, selection="random"))
        for s in range(8)
    }
    assert len(draws) > 1


def test_a_margin_share_keeps_the_widest_margins_of_every_context_together() -> None:
    def crowd(context: str, good: float, bad: float) -> list[SessionInput]:
        return [
            _reacted(f"{context}-p", f"good {context}", good, session_user=context),
            _reacted(f"{context}-n", f"bad {context}", bad, flagged=False, session_user=context),
        ]

    # Three contexts, one combination each: margins 10, 4 and 2.
    sessions = crowd("wide", 6.0, -4.0) + crowd("middle", 2.0, -2.0) + crowd("narrow", 1.0, -1.0)
    assert len(feedback_pairs(sessions)) == 3
    (widest,) = feedback_pairs(sessions, margin_share=0.3)  # ceil(0.3 x 3) = 1 combination.
    assert widest["chosen"] == "good wide"
    assert {p["chosen"] for p in feedback_pairs(sessions, margin_share=0.5)} == {"good wide", "good middle"}
    # A share applies to random selection too, and never keeps an unmeasured combination.
    assert len(feedback_pairs(sessions, margin_share=0.5, selection="random")) == 2
    # A positive flag without a measured delta has no margin: kept without a share, never by one.
    unmeasured = [
        _reacted("unmeasured-p", "good unmeasured", None, session_user="unmeasured"),
        _reacted("unmeasured-n", "bad unmeasured", -1.0, flagged=False, session_user="unmeasured"),
    ]
    assert len(feedback_pairs(sessions + unmeasured)) == 4
    assert len(feedback_pairs(sessions + unmeasured, margin_share=0.99)) == 3
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="margin_share"):
            feedback_pairs(sessions, margin_share=share)


def test_a_delta_share_trains_only_the_flagged_replies_with_the_largest_reactions() -> None:
    sessions = [
        _reacted("strong", "that must be hard", 9.0),
        _reacted("middle", "tell me more", 4.0),
        _reacted("weak", "ok", 0.5),
        _reacted("unmeasured", "hmm", None),  # Flagged without a delta: kept without a share, never by one.
        _reacted("negative", "calm down", -6.0, flagged=False),
    ]

    def trained(share: float) -> set[str]:
        cutoff = sft_delta_cutoff(sessions, share)
        examples = [
            e for s in sessions for e in sft_examples(s.session_id, SYSTEM, s.events, s.labels, min_delta=cutoff)
        ]
        return {e["session_id"] for e in examples}

    assert trained(1.0) == {"strong", "middle", "weak", "unmeasured"}
    assert trained(0.5) == {"strong", "middle"}  # ceil(0.5 x 4 flagged) = 2.
    assert trained(0.1) == {"strong"}
    assert trained(0.99) == {"strong", "middle", "weak"}
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match="delta_share"):
            sft_delta_cutoff(sessions, share)


def _reply_session(session_id: str, text: str, flagged: bool, at_limit: bool | None) -> SessionInput:
    events = Recorder().user("I lost my job").reply(f"{session_id}-t1", text).events
    events[-1]["at_limit"] = at_limit
    return SessionInput(session_id, SYSTEM, events, {f"{session_id}-t1": TurnLabel(flagged, 2.0 if flagged else -2.0)})


def test_a_reply_cut_off_at_the_token_limit_is_never_trained_on_nor_chosen() -> None:
    reply_session = _reply_session
    cut = reply_session("cut", "That sounds so hard, and I keep thinking about how", True, True)
    whole = reply_session("whole", "That sounds so hard. How are you?", True, False)
    unknown = reply_session("unknown", "Oh no. What happened?", True, None)  # Recorded before at_limit existed.
    negative = reply_session("negative", "Calm down.", False, False)
    negative_cut = reply_session("negative-cut", "Well, at least you have more time for", False, True)
    sessions = [cut, whole, unknown, negative, negative_cut]
    trained = {e["session_id"] for s in sessions for e in sft_examples(s.session_id, SYSTEM, s.events, s.labels)}
    assert trained == {"whole", "unknown"}
    assert sft_delta_cutoff(sessions, 0.5) == 2.0  # Cut replies do not count toward a share either.
    # Never the chosen side of a pair (it would teach the stop), but the rejected side: the user did not like it.
    pairs = feedback_pairs(sessions, max_pairs_per_context=100)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        ("That sounds so hard. How are you?", "Calm down."),
        ("Oh no. What happened?", "Calm down."),
        ("That sounds so hard. How are you?", "Well, at least you have more time for"),
        ("Oh no. What happened?", "Well, at least you have more time for"),
    }


def test_trim_to_sentence_keeps_up_to_the_last_complete_sentence() -> None:
    assert trim_to_sentence("That is hard. I keep thinking about how") == "That is hard."
    assert trim_to_sentence('Really? "Yes!" and then') == 'Really? "Yes!"'
    assert trim_to_sentence("One. Two... three") == "One. Two..."
    assert trim_to_sentence("no sentence ends here") == ""


def test_trimmed_cut_replies_are_trained_on_and_paired_on_either_side() -> None:
    cut = _reply_session("cut", "That sounds so hard. I keep thinking about how", True, True)
    whole = _reply_session("whole", "Oh no. What happened?", True, False)
    negative = _reply_session("negative", "Calm down.", False, False)
    negative_cut = _reply_session("negative-cut", "Well. At least you have more time for", False, True)
    no_sentence = _reply_session("no-sentence", "And at least you have more time for", True, True)
    sessions = [cut, whole, negative, negative_cut, no_sentence]
    examples = [
        e for s in sessions for e in sft_examples(s.session_id, SYSTEM, s.events, s.labels, cut_replies="trimmed")
    ]
    assert {e["session_id"] for e in examples} == {"cut", "whole"}  # Nothing is left of no-sentence.
    trained = [m["content"] for e in examples for m in e["messages"] if m.get("weight") == 1]
    assert sorted(trained) == ["Oh no. What happened?", "That sounds so hard."]
    assert sft_delta_cutoff(sessions, 0.5, cut_replies="trimmed") == 2.0
    pairs = feedback_pairs(sessions, max_pairs_per_context=100, cut_replies="trimmed")
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        ("That sounds so hard.", "Calm down."),
        ("Oh no. What happened?", "Calm down."),
        ("That sounds so hard.", "Well."),
        ("Oh no. What happened?", "Well."),
    }
    with pytest.raises(ValueError, match="cut_replies"):
        feedback_pairs(sessions, cut_replies="kept")  # type: ignore[arg-type]


def test_open_end_trains_cut_replies_as_generated_and_pairs_them_trimmed() -> None:
    cut = _reply_session("cut", "That sounds so hard. I keep thinking about how", True, True)
    whole = _reply_session("whole", "Oh no. What happened?", True, False)
    negative_cut = _reply_session("negative-cut", "Well. At least you have more time for", False, True)
    no_sentence = _reply_session("no-sentence", "And at least you have more time for", True, True)
    sessions = [cut, whole, negative_cut, no_sentence]
    trained = {
        m["content"]: m.get("open_end", False)
        for s in sessions
        for e in sft_examples(s.session_id, SYSTEM, s.events, s.labels, cut_replies="open_end")
        for m in e["messages"]
        if m.get("weight") == 1
    }
    # Every flagged reply as the model said it; only the cut ones open-ended (no stop learned after them).
    assert trained == {
        "That sounds so hard. I keep thinking about how": True,
        "Oh no. What happened?": False,
        "And at least you have more time for": True,
    }
    pairs = feedback_pairs(sessions, max_pairs_per_context=100, cut_replies="open_end")
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        ("That sounds so hard.", "Well."),
        ("Oh no. What happened?", "Well."),
    }


# --- ids, files, manifests ------------------------------------------------------------------------------


def test_content_id_is_canonical() -> None:
    assert content_id({"b": 1, "a": [1, "é"]}) == content_id({"a": [1, "é"], "b": 1})
    assert content_id({"a": 1}) != content_id({"a": 2})
    expected = hashlib.sha256(b'{"a":[1,"\xc3\xa9"],"b":1}').hexdigest()
    assert content_id({"b": 1, "a": [1, "é"]}) == expected
    with pytest.raises(ValueError):
        content_id({"x": float("nan")})


def test_write_jsonl_hash_matches_file_and_is_deterministic(tmp_path: Path) -> None:
    records: list[dict[str, Any]] = [{"id": "1", "z": 1, "a": "é"}, {"id": "2"}]
    h1 = write_jsonl(records, tmp_path / "a.jsonl")
    h2 = write_jsonl([{"a": "é", "z": 1, "id": "1"}, {"id": "2"}], tmp_path / "b.jsonl")
    data = (tmp_path / "a.jsonl").read_bytes()
    assert h1 == h2 == hashlib.sha256(data).hexdigest()
    assert data == jsonl_bytes(records)
    assert [json.loads(line) for line in data.decode().splitlines()] == records
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]  # No temporary files left.


def test_manifests_count_and_identify_content(tmp_path: Path) -> None:
    rec = Recorder().user("hi").reply("t1", "Hello!").user("and?").reply("t2", "And so on.")
    sft = sft_examples("s1", SYSTEM, rec.events, {"t1": TurnLabel(True, 1.0)})
    manifest = DatasetManifest.build("sft", sft, {"threshold": 0.0}, {"built_at": "now"})
    assert manifest.content_hash == write_jsonl(sft, tmp_path / "sft.jsonl")
    assert manifest.counts == {"examples": 1, "sessions": 1, "assistant_turns": 2, "flagged_turns": 1}
    assert manifest.source_sessions == ["s1"]
    # The id ignores created_from but follows content and label settings.
    assert DatasetManifest.build("sft", sft, {"threshold": 0.0}, {"built_at": "later"}).id == manifest.id
    assert DatasetManifest.build("sft", sft, {"threshold": 0.1}).id != manifest.id
    assert json.loads(json.dumps(manifest.to_dict()))["kind"] == "sft"

    pairs = feedback_pairs(_crowd(2, 2))
    dpo = DatasetManifest.build("dpo_feedback", pairs, {})
    assert dpo.counts == {"examples": 4, "pairs": 4, "sessions": 4, "prompts": 1}
    assert dpo.source_sessions == ["n0", "n1", "p0", "p1"]
    with pytest.raises(ValueError):
        DatasetManifest.build("rlhf", pairs, {})  # type: ignore[arg-type]


# --- EmPO's SFT stage: EmpatheticDialogues as an SFT dataset (object storage, integration) -----------------------

ED_HEADER = "conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags\n"


def _write_ed(path: Path, prefix: str, emotions: tuple[str, ...] = ("afraid", "angry", "sad", "joyful")) -> None:
    rows = [
        f"{prefix}:{i},{turn},{emotion},situation {i},{turn % 2},{'story' if turn % 2 else 'reply'} {i} {turn},,"
        for i, emotion in enumerate(emotions * 2)
        for turn in (1, 2, 3, 4)
    ]
    path.write_text(ED_HEADER + "\n".join(rows) + "\n", encoding="utf-8")


@pytest.mark.integration
def test_empathetic_sft_dataset_and_its_split(s3_settings: Any, tmp_path: Path) -> None:
    _write_ed(tmp_path / "valid.csv", "v")
    settings = LabelerSettings(s3=s3_settings)
    options = settings.labeler.model_copy(update={"oov_method": "none", "empathetic_dialogues": tmp_path})
    runtime = build_runtime(settings.model_copy(update={"labeler": options}))

    valid_only = jobs.build_sft_dataset(runtime, source="empathetic")
    assert valid_only["kind"] == "sft" and valid_only["counts"]["examples"] == 8
    assert valid_only["counts"]["flagged_turns"] == 16  # Both listener turns of each dialogue are trained.
    assert valid_only["label_settings"] == {
        "source": "empathetic",
        "split": "valid",
        "split_requested": "auto",
        "train_split_available": False,
    }
    assert valid_only["source_sessions"] == []  # A corpus: no one's session, nothing to withdraw or trace.
    records = [json.loads(line) for line in runtime.store.get_bytes(Bucket.DATASETS, valid_only["key"]).splitlines()]
    assert all(m.get("weight") == (1 if m["role"] == "assistant" else None) for r in records for m in r["messages"])

    _write_ed(tmp_path / "train.csv", "t")  # Once the folder holds a train split, it is the one trained on.
    config = PipelineConfig(sft_source="empathetic", dpo_source="empathetic", recipes={"dpo_epochs": 2})
    state = {"config": config.model_dump(), "train_sessions": [], "steps": {}}
    result = pipeline_steps.datasets(runtime, state)  # type: ignore[arg-type]
    assert result["sft"]["source"] == "empathetic" and result["sft"]["split"] == "train"
    assert result["dpo"]["source"] == "empathetic" and result["dpo"]["split"] == "train"
    assert result["dpo"]["counts"]["pairs"] == 16  # 8 dialogues, a rejected draw for each of 2 epochs.
    with pytest.raises(NotFound, match="no test split"):
        jobs.build_sft_dataset(runtime, source="empathetic", split="test")
