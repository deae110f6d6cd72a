"""The evaluation gate's evidence for the candidate against the production arm: offline items paired by context
or question, online items from each arm's sessions (real and synthetic never pooled), what is missing and why,
the evaluate step's outputs and the report's section."""

from __future__ import annotations

from typing import Any

import pytest

from emili_pipeline.gate import evidence_from_json, judge, load_policy
from emili_trainer.evaluation.gate_evidence import ArmItems, gate_evidence, mmlu_pairs, reply_words, summarize
from emili_trainer.evaluation.report import build_report, render_markdown
from emili_trainer.pipeline_steps import gate_outputs

OK = {"status": "ok", "mean": 0.5}


def _items(replies: list[str], per_row: list[float] | None) -> ArmItems:
    items = ArmItems()
    items.add(replies, {**OK, "per_row": per_row} if per_row is not None else {"status": "unavailable", "reason": "no"})
    return items


def _mmlu(correct: dict[str, list[int]]) -> dict[str, Any]:
    return {"acc": 0.5, "correct": correct}


ONLINE = {
    "cand": {
        "synthetic": {
            "sessions": 2,
            "delta_v": [0.2, 0.1],
            "reaction": [3.0, -1.0],
            "negative_reaction": [0.0, 1.0, 0.0],
            "negative_reaction_rate": [0.0, 0.5],
        }
    },
    "prod": {
        "synthetic": {
            "sessions": 1,
            "delta_v": [0.0],
            "reaction": [-2.0],
            "negative_reaction": [1.0],
            "negative_reaction_rate": [1.0],
        },
        "real": {
            "sessions": 1,
            "delta_v": [0.3],
            "reaction": [0.5],
            "negative_reaction": [0.0],
            "negative_reaction_rate": [0.0],
        },
    },
}


def test_reply_words_count_as_the_reply_metrics_do() -> None:
    assert reply_words(["I'm so sorry, that's hard!", "", "ok ok"]) == [5.0, 0.0, 2.0]


def test_items_add_up_over_sources_and_one_unscored_source_drops_diff_epitome() -> None:
    items = ArmItems()
    items.add(["a b", "c"], {**OK, "per_row": [0.0, 1.0]})
    items.add(["d e f"], {**OK, "per_row": [2.0 / 3]})
    assert items.reply_words == [2.0, 1.0, 3.0] and items.diff_epitome == [0.0, 1.0, pytest.approx(2 / 3)]
    items.add(["g"], {"status": "unavailable", "reason": "no EPITOME classifiers found"})
    items.add(["h"], {**OK, "per_row": [0.0]})
    assert items.diff_epitome is None and items.diff_epitome_reason == "no EPITOME classifiers found"
    assert len(items.reply_words) == 5


def test_evidence_pairs_offline_items_and_keeps_online_origins_apart() -> None:
    offline = {
        "base": _items(["x"] * 3, [0.0, 0.0, 0.0]),
        "prod": _items(["one two", "three", "four five six"], [1.0, 0.0, 0.5]),
        "cand": _items(["a", "b c", "d e f g"], [0.5, 0.0, 0.0]),
    }
    mmlu = {
        "prod": _mmlu({"anatomy": [1, 0, 1], "virology": [1, 1]}),
        "cand": _mmlu({"anatomy": [1, 1, 0], "virology": [0]}),  # virology: another number of questions.
    }
    found = gate_evidence("cand", "prod", offline, mmlu, ONLINE)
    assert found.missing == {}
    ev = found.evidence
    assert ev["reply_words"].candidate == [1.0, 2.0, 4.0] and ev["reply_words"].baseline == [2.0, 1.0, 3.0]
    assert ev["diff_epitome_mean"].paired and ev["diff_epitome_mean"].candidate == [0.5, 0.0, 0.0]
    assert (ev["mmlu_correct"].candidate, ev["mmlu_correct"].baseline) == ([1.0, 1.0, 0.0], [1.0, 0.0, 1.0])
    # The baseline has real sessions, the candidate only synthetic ones: both sides are synthetic.
    assert ev["delta_v"].candidate == [0.2, 0.1] and ev["delta_v"].baseline == [0.0] and not ev["delta_v"].paired
    assert ev["negative_reaction"].baseline == [1.0] and ev["reaction"].baseline == [-2.0]
    assert ev["negative_reaction_rate"].candidate == [0.0, 0.5]  # One item per session.
    assert found.origins == {
        "reply_words": "contexts",
        "diff_epitome_mean": "contexts",
        "mmlu_correct": "questions",
        "delta_v": "synthetic",
        "reaction": "synthetic",
        "negative_reaction": "synthetic",
        "negative_reaction_rate": "synthetic",
    }
    # The JSON form is the gate's: it reads back and can be judged (too few items here: every check fails).
    data = found.to_json()
    assert data["candidate"] == "cand" and data["baseline"] == "prod"
    evidence = evidence_from_json(data["evidence"])
    assert evidence["mmlu_correct"].paired and len(evidence["negative_reaction"].candidate) == 3
    verdict = judge(load_policy(), evidence)
    judged = [c for c in verdict.checks if c.metric in evidence]
    assert not verdict.passed and judged and all("not enough evidence" in c.reason for c in judged)


def test_real_sessions_are_preferred_when_both_arms_have_them() -> None:
    online = {**ONLINE, "cand": {**ONLINE["cand"], "real": {"sessions": 1, "delta_v": [0.5], "negative_reaction": []}}}
    found = gate_evidence("cand", "prod", {"cand": ArmItems(), "prod": ArmItems()}, None, online)
    assert found.origins["delta_v"] == "real" and found.evidence["delta_v"].candidate == [0.5]
    assert found.origins["negative_reaction"] == "synthetic"  # No real reply of the candidate had a reaction.


def test_what_cannot_be_computed_is_absent_and_says_why() -> None:
    offline = {"base": _items(["a"], None), "cand": _items(["b c"], [0.0])}
    found = gate_evidence("cand", "base", offline, {"skipped": "no local MMLU copy"}, None)
    assert set(found.evidence) == {"reply_words"}
    assert found.missing["diff_epitome_mean"] == "no"
    assert found.missing["mmlu_correct"] == "MMLU was skipped: no local MMLU copy"
    assert "delta_table step gave no gate items" in found.missing["delta_v"]
    assert "negative_reaction" in found.missing

    only_base = {"base": {"synthetic": {"delta_v": [0.1], "negative_reaction": [0.0]}}}
    found = gate_evidence("cand", "base", offline, None, only_base)
    assert found.missing["mmlu_correct"] == "MMLU did not run"
    assert found.missing["delta_v"].endswith("(candidate: none; baseline: synthetic)")

    found = gate_evidence("cand", "prod", offline, None, None)
    assert "did not answer its contexts with the baseline" in found.missing["reply_words"]

    nothing = gate_evidence(None, "base", offline, None, ONLINE)
    assert nothing.evidence == {} and len(nothing.missing) == 7 and nothing.candidate is None


def test_mmlu_pairs_need_per_question_results_of_both_arms() -> None:
    assert mmlu_pairs(_mmlu({"a": [1]}), None) == "MMLU did not run for the baseline"
    assert "skipped" in str(mmlu_pairs({"skipped": "x"}, _mmlu({"a": [1]})))
    assert "per-question" in str(mmlu_pairs({"acc": 0.3}, _mmlu({"a": [1]})))
    assert "no MMLU subject" in str(mmlu_pairs(_mmlu({"a": [1]}), _mmlu({"b": [1]})))


def test_the_evaluate_steps_outputs_and_the_report_section() -> None:
    offline = {"base": _items(["a b"] * 2, [0.0, 1.0]), "cand": _items(["c d e", "f"], [0.0, 0.0])}
    gate = {**gate_evidence("cand", "base", offline, None, ONLINE | {"base": ONLINE["prod"]}).to_json()}
    gate["context_sources"] = ["empathetic", "synthetic sessions"]
    outputs = gate_outputs({"gate": gate}, "cand", "base")
    assert outputs["candidate"] == "cand" and outputs["baseline"] == "base"
    assert set(outputs["gate_evidence"]) == {
        "reply_words",
        "diff_epitome_mean",
        "delta_v",
        "reaction",
        "negative_reaction",
        "negative_reaction_rate",
    }
    assert outputs["gate_evidence_missing"] == {"mmlu_correct": "MMLU did not run"}
    assert evidence_from_json(outputs["gate_evidence"])["reply_words"].candidate == [3.0, 1.0]
    old = gate_outputs({"title": "a report from before"}, "cand", "base")
    assert old["gate_evidence"] == {} and len(old["gate_evidence_missing"]) == 7 and old["candidate"] == "cand"

    rows = {row["metric"]: row for row in summarize(gate)}
    assert rows["reply_words"]["n_candidate"] == 2 and rows["reply_words"]["mean_candidate"] == 2.0
    assert rows["delta_v"]["mean_baseline"] == pytest.approx(0.0) and rows["mmlu_correct"]["missing"]

    report = build_report({"title": "t", "gate": gate})
    assert build_report(report)["gate"] == gate  # Building is idempotent.
    markdown = render_markdown(report)
    section = markdown[markdown.index("## Evaluation gate evidence") :]
    assert "Candidate cand against the production arm base" in section
    assert "| delta_v | independent, synthetic sessions (simulated users) | 2 | 1 | 0.150 | 0.000 |" in section
    assert "| reply_words | paired, contexts (empathetic, synthetic sessions) | 2 | 2 | 2.000 | 2.000 |" in section
    assert "- mmlu_correct: not computed: MMLU did not run" in section
    assert "holds no person's reaction" in section and "simulated users" in section
    assert "Evaluation gate evidence" not in render_markdown(build_report({"title": "no gate"}))


def _synthetic(values: list[float], users: list[str]) -> dict[str, Any]:
    return {"synthetic": {"sessions": len(values), "delta_v": values, "delta_v_users": users, "negative_reaction": []}}


def test_synthetic_reactions_are_paired_by_user_like_delta_v() -> None:
    def arm(reactions: list[float], users: list[str]) -> dict[str, Any]:
        return {"synthetic": {"sessions": 3, "reaction": reactions, "reaction_users": users, "negative_reaction": []}}

    online = {"cand": arm([5.0, 1.0], ["u1", "u0"]), "base": arm([0.0, 2.0, 4.0], ["u0", "u1", "u2"])}
    found = gate_evidence("cand", "base", {"cand": ArmItems(), "base": ArmItems()}, None, online)
    assert found.origins["reaction"] == "synthetic"
    reaction = found.evidence["reaction"]
    assert reaction.paired and reaction.candidate == [1.0, 5.0] and reaction.baseline == [0.0, 2.0]


def test_synthetic_delta_v_is_paired_by_simulated_user_and_real_never() -> None:
    offline = {"cand": ArmItems(), "base": ArmItems()}
    online = {
        "cand": _synthetic([0.3, 0.1, 0.5], ["u2", "u0", "u9"]),
        "base": _synthetic([0.0, 0.2, 0.4], ["u0", "u1", "u2"]),
    }
    paired = gate_evidence("cand", "base", offline, None, online).evidence["delta_v"]
    # The users both arms have (u0, u2), in user order; u1 and u9 had one arm only.
    assert paired.paired and paired.candidate == [0.1, 0.3] and paired.baseline == [0.0, 0.4]
    # Without users (an older labeler), or with a user twice on one arm: independent arms.
    for cand in (_synthetic([0.3, 0.1], ["", ""]), _synthetic([0.3, 0.1], ["u0", "u0"])):
        found = gate_evidence("cand", "base", offline, None, {**online, "cand": cand}).evidence["delta_v"]
        assert not found.paired and found.candidate == [0.3, 0.1] and found.baseline == [0.0, 0.2, 0.4]
    # Too few shared users to speak for the arms: independent.
    few = _synthetic([0.3, 0.1, 0.2], ["u0", "x1", "x2"])
    assert not gate_evidence("cand", "base", offline, None, {**online, "cand": few}).evidence["delta_v"].paired
    # Real sessions: different people, never paired, even when user ids repeat.
    real = {arm: {"real": items["synthetic"]} for arm, items in online.items()}
    found = gate_evidence("cand", "base", offline, None, real)
    assert found.origins["delta_v"] == "real" and not found.evidence["delta_v"].paired
