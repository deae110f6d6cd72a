"""Pooling loop simulation studies across runs (``emili study pool``) on reports built here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from emili_pipeline.study_pool import FEEDBACK_AGAINST_NOISE, StudyPoolError, group_runs, pool_runs

USERS = 20


def _iteration(seed: int, iteration: int, condition: str, gain: float, users: list[int]) -> dict[str, Any]:
    """An iteration's evaluation as `emili study simulate` records it: per arm, each user's values and who they were
    (the candidate's users listed in another order, as nothing promises the same order). The base arm depends on
    the seed and iteration only, as in the study; each condition's candidate answers differently."""
    base = np.random.default_rng([seed, iteration]).normal(-0.1, 0.1, size=len(users))
    answers = np.random.default_rng([seed, iteration, len(condition)]).normal(0.0, 0.05, size=len(users))
    candidate = base + gain + answers
    order = list(reversed(range(len(users))))
    return {
        "iteration": iteration + 1,
        "sessions_used": 72 * (iteration + 1),  # The loop trains on every session so far.
        "evaluation": {
            "items": {
                "base": {"delta_v": base.tolist()},
                "candidate": {"delta_v": [float(candidate[i]) for i in order]},
            },
            "users": {"base": {"delta_v": users}, "candidate": {"delta_v": [users[i] for i in order]}},
        },
    }


def _report(seed: int, gains: dict[str, list[float]], **options: Any) -> dict[str, Any]:
    users = [seed * 1000 + i for i in range(USERS)]
    base_options = {"seed": seed, "pipeline": "/a/clone/loop.yaml", "sessions_per_iteration": 72}
    base_options |= {"eval_users_per_arm": USERS, "noise_faces": "training", "config_sha256": "abc"}
    conditions = {
        condition: [_iteration(seed, i, condition, gain, users) for i, gain in enumerate(per_iteration)]
        for condition, per_iteration in gains.items()
    }
    return {"options": base_options | options, "conditions": conditions}


def _row(report: dict[str, Any], comparison: str, iteration: int = 1) -> dict[str, Any]:
    (row,) = [r for r in report["rows"] if r["comparison"] == comparison and r["iteration"] == iteration]
    return row


def test_a_real_gain_pools_above_zero_and_noise_around_it() -> None:
    reports = {f"run-{s}": _report(s, {"feedback": [0.2, 0.2], "noise": [0.0, 0.0]}) for s in (1, 2, 3, 4)}
    report = pool_runs(group_runs(reports), metrics=["delta_v"])

    feedback, noise = _row(report, "feedback candidate - base"), _row(report, "noise candidate - base")
    assert feedback["pooled"]["runs"] == 4 and feedback["pooled"]["ci95"][0] > 0.1
    assert noise["pooled"]["ci95"][0] < 0 < noise["pooled"]["ci95"][1]
    assert _row(report, FEEDBACK_AGAINST_NOISE)["pooled"]["ci95"][0] > 0.1
    # Each run's estimate is its users' mean paired difference, matched by user not by position: the spread is that
    # of the candidate's own answers (matched by position it would be the base arm's users' spread too).
    for estimate in feedback["runs"]:
        answers = np.random.default_rng([estimate["seed"], 0, len("feedback")]).normal(0.0, 0.05, size=USERS)
        assert estimate["variance"] == pytest.approx(answers.var(ddof=1) / USERS)
        assert abs(estimate["mean"] - 0.2) < 0.05 and estimate["n"] == estimate["listed"] == USERS
    assert [r["seed"] for r in report["runs"]] == [1, 2, 3, 4] and report["synthetic"] is True
    assert {(r["iteration"], tuple(r["sessions_used"])) for r in report["rows"]} == {(1, (72,)), (2, (144,))}


def test_a_runs_conditions_given_apart_are_one_run() -> None:
    parts = {
        "s1-feedback": _report(1, {"feedback": [0.2]}),
        "s1-noise": _report(1, {"noise": [0.0]}, pipeline="/another/clone/loop.yaml"),
        "s2": _report(2, {"feedback": [0.2], "noise": [0.0]}),
    }
    runs = group_runs(parts)
    assert [(r.seed, sorted(r.conditions)) for r in runs] == [(1, ["feedback", "noise"]), (2, ["feedback", "noise"])]
    assert _row(pool_runs(runs, metrics=["delta_v"]), FEEDBACK_AGAINST_NOISE)["pooled"]["runs"] == 2


def test_runs_of_another_loop_or_the_same_run_twice_are_refused() -> None:
    with pytest.raises(StudyPoolError, match="sessions_per_iteration 144"):
        group_runs(
            {"a": _report(1, {"feedback": [0.1]}), "b": _report(2, {"feedback": [0.1]}, sessions_per_iteration=144)}
        )
    with pytest.raises(StudyPoolError, match="seed 1's feedback condition is also in a"):
        group_runs({"a": _report(1, {"feedback": [0.1]}), "b": _report(1, {"feedback": [0.1]})})
    with pytest.raises(StudyPoolError, match="at least 2 different seeds"):
        group_runs({"a": _report(1, {"feedback": [0.1], "noise": [0.0]})})


def test_a_run_without_spread_is_left_out_and_says_why() -> None:
    flat = _report(3, {"feedback": [0.2]})
    items = flat["conditions"]["feedback"][0]["evaluation"]["items"]
    users = flat["conditions"]["feedback"][0]["evaluation"]["users"]
    by_user = dict(zip(users["base"]["delta_v"], items["base"]["delta_v"], strict=True))
    items["candidate"]["delta_v"] = [by_user[u] + 0.2 for u in users["candidate"]["delta_v"]]
    report = pool_runs(group_runs({"a": _report(1, {"feedback": [0.2]}), "b": flat}), metrics=["delta_v"])

    row = _row(report, "feedback candidate - base")
    # One run left is not pooled: its interval would cover its users only, nothing across runs.
    assert row["pooled"] == {"runs": 1, "mean": None, "ci95": None, "between_runs_sd": None}
    (left_out,) = [e for e in row["runs"] if e["left_out"]]
    assert left_out["seed"] == 3 and "no spread" in left_out["left_out"]


def test_iterations_without_a_candidate_or_users_are_left_out_and_say_which() -> None:
    no_candidate, no_users = _report(3, {"feedback": [0.2]}), _report(4, {"feedback": [0.2]})
    del no_candidate["conditions"]["feedback"][0]["evaluation"]
    del no_users["conditions"]["feedback"][0]["evaluation"]["users"]
    reports = {"a": _report(1, {"feedback": [0.2]}), "b": _report(2, {"feedback": [0.2]})}
    report = pool_runs(group_runs(reports | {"c": no_candidate, "d": no_users}), metrics=["delta_v"])

    row = _row(report, "feedback candidate - base")
    assert row["pooled"]["runs"] == 2
    why = {e["seed"]: e["left_out"] for e in row["runs"]}
    assert why[1] is None and why[3] == "no candidate was evaluated in this iteration"
    assert "did not record its users" in why[4]


def test_a_damaged_or_seedless_report_or_nothing_finished_is_refused() -> None:
    damaged = _report(2, {"feedback": [0.2]})
    damaged["conditions"]["feedback"][0]["evaluation"]["users"]["base"]["delta_v"].pop()
    with pytest.raises(StudyPoolError, match="lists 20 values for 19 users"):
        pool_runs(group_runs({"a": _report(1, {"feedback": [0.2]}), "b": damaged}), metrics=["delta_v"])
    seedless = _report(2, {"feedback": [0.2]})
    del seedless["options"]["seed"]
    with pytest.raises(StudyPoolError, match="b: its options name no seed"):
        group_runs({"a": _report(1, {"feedback": [0.2]}), "b": seedless})
    with pytest.raises(StudyPoolError, match="none of the studies has a finished iteration"):
        group_runs({"a": _report(1, {"feedback": []}), "b": _report(2, {})})


def test_emili_study_pool_writes_a_synthetic_report(tmp_path: Path) -> None:
    from emili_pipeline.study_cli import commands

    for seed in (1, 2):
        folder = tmp_path / f"study-{seed}"
        folder.mkdir()
        (folder / "study.json").write_text(json.dumps(_report(seed, {"feedback": [0.2], "noise": [0.0]})))
    out = tmp_path / "pool"
    result = CliRunner().invoke(
        commands, ["study", "pool", str(tmp_path / "study-1"), str(tmp_path / "study-2"), "--out", str(out)]
    )

    assert result.exit_code == 0, result.output
    assert json.loads((out / "pool.json").read_text())["synthetic"] is True
    markdown = (out / "pool.md").read_text()
    assert "SYNTHETIC" in markdown and "| feedback candidate - base | 1 (72) | delta_v | 2 |" in markdown
    refused = CliRunner().invoke(
        commands, ["study", "pool", str(tmp_path / "study-1"), str(tmp_path / "nothing")], env={"COLUMNS": "300"}
    )
    assert refused.exit_code == 2 and "no study.json" in refused.output


def _gate_replies(report: dict[str, Any], production: str, difference: float | None, half: float = 0.05) -> None:
    """What `emili study gate-replies` records: the gate's users' hidden reply quality, candidate - production."""
    replies: dict[str, Any] = {"production_version": production}
    if difference is not None:
        replies["quality"] = {
            "paired": {"n_pairs": 96, "difference": difference, "ci95": [difference - half, difference + half]}
        }
    report["conditions"]["feedback"][0]["gate_replies"] = replies


def test_the_gates_hidden_quality_pools_from_its_recorded_interval() -> None:
    from scipy import stats

    reports = {s: _report(s, {"feedback": [0.2]}) for s in (1, 2, 3, 4)}
    _gate_replies(reports[1], "base", 0.10)
    _gate_replies(reports[2], "base", None)
    _gate_replies(reports[3], "dpo-first", 0.3)
    _gate_replies(reports[4], "base", 0.08, half=0.04)
    report = pool_runs(group_runs({f"run-{s}": r for s, r in reports.items()}), metrics=["gate_quality"])

    (row,) = report["rows"]
    assert row["comparison"] == "feedback candidate - base" and row["pooled"]["runs"] == 2
    by_seed = {e["seed"]: e for e in row["runs"]}
    t = stats.t.ppf(0.975, 95)
    assert by_seed[1]["variance"] == pytest.approx((0.05 / t) ** 2)
    assert "no gate replies" in by_seed[2]["left_out"] and "compared it with dpo-first" in by_seed[3]["left_out"]
    # The two runs agree within their noise (tau 0): weighed by precision alone.
    assert row["pooled"]["between_runs_sd"] == 0.0
    assert row["pooled"]["mean"] == pytest.approx((0.10 / 0.05**2 + 0.08 / 0.04**2) / (1 / 0.05**2 + 1 / 0.04**2))
