"""The loop simulation study's pure parts: feedback noise, intervals, decisions, the report, the CLI group."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from emili_pipeline.gate import Evidence, judge, load_policy
from emili_pipeline.simulator import SimulatedUser
from emili_pipeline.simulator.personas import builtin_personas
from emili_pipeline.simulator.run import SimulatorSettings
from emili_pipeline.simulator.user import noise_quality
from emili_pipeline.study_sim import (
    OFFLINE_STUDY,
    SIMULATION_GATE,
    SIMULATION_PIPELINE,
    OfflineCanary,
    ScopedStateStore,
    StudyActions,
    build_report,
    canary_decision,
    compare_arms,
    condition_pipeline,
    decision_summary,
    difference,
    interval,
    paired_interval,
    pooled_difference,
    render_markdown,
    session_items,
    write_report,
)

GOOD = "That sounds so hard, I'm sorry. It makes sense you feel that way. How are you feeling now?"
BAD = "Calm down, whatever, it's not a big deal. As an AI I don't care. You should just get over it."


def _persona() -> Any:
    return next(p for p in builtin_personas() if p.emotion == "sad")


def _hear(user: SimulatedUser, reply: str, turns: int = 4) -> SimulatedUser:
    for turn in range(turns):
        user.message(turn)
        user.hear(reply)
    return user


# --- feedback noise ---------------------------------------------------------------------------------------------


def test_state_feedback_is_unchanged_by_the_noise_option() -> None:
    plain, explicit = SimulatedUser(_persona(), 7), SimulatedUser(_persona(), 7, feedback="state")
    _hear(plain, GOOD), _hear(explicit, GOOD)
    assert plain.state.current == explicit.state.current
    assert plain.shown == plain.state.current and plain.decoy is None
    assert plain.reading() == explicit.reading()


def test_noise_face_ignores_the_replies_while_the_real_state_follows_them() -> None:
    good, bad = SimulatedUser(_persona(), 3, feedback="noise"), SimulatedUser(_persona(), 3, feedback="noise")
    _hear(good, GOOD), _hear(bad, BAD)
    # The face (decoy) moves the same whatever was said: it depends on the seed alone.
    assert good.shown == bad.shown
    assert good.reading() == bad.reading()
    # The real state, which surveys, ratings and the study's delta-v read, still follows reply quality.
    assert good.state.valence_change > bad.state.valence_change
    assert good.shown != good.state.current


def test_noise_face_starts_where_the_user_starts() -> None:
    user = SimulatedUser(_persona(), 11, feedback="noise")
    assert user.shown == user.state.start


def test_noise_qualities_span_the_range_and_do_not_depend_on_anything_but_the_generator() -> None:
    scores = [noise_quality(np.random.default_rng(0)).score for _ in range(3)]
    assert len(set(scores)) == 1
    rng = np.random.default_rng(1)
    draws = np.array([noise_quality(rng).score for _ in range(2000)])
    assert draws.min() >= -1 and draws.max() <= 1
    assert abs(draws.mean()) < 0.05 and draws.min() < -0.9 and draws.max() > 0.9


def test_simulator_settings_carry_the_feedback_mode() -> None:
    assert SimulatorSettings().feedback == "state"
    assert SimulatorSettings.model_validate({"feedback": "noise"}).feedback == "noise"
    with pytest.raises(ValueError):
        SimulatorSettings.model_validate({"feedback": "other"})


# --- items, intervals, decisions ------------------------------------------------------------------------------------


@dataclass
class _Turn:
    quality: float | None
    reply: str = "I hear you, that sounds hard."


@dataclass
class _Outcome:
    start: float
    end: float
    ratings: dict[str, int] = field(default_factory=dict)
    qualities: tuple[float, ...] = ()
    ok: bool = True
    seed: int = 0  # The simulated user.

    @property
    def start_state(self) -> dict[str, float]:
        return {"valence": self.start}

    @property
    def end_state(self) -> dict[str, float]:
        return {"valence": self.end}

    @property
    def turns(self) -> list[_Turn]:
        return [_Turn(q) for q in self.qualities]


def test_session_items_read_the_hidden_valence_change_ratings_and_quality() -> None:
    items = session_items(
        [
            _Outcome(-0.5, -0.2, {"empathy": 4, "relevance": 3, "fluency": 5}, (0.2, 0.4)),
            _Outcome(-0.5, -0.6, {}, ()),
            _Outcome(0.0, 1.0, {"empathy": 1, "relevance": 1, "fluency": 1}, (1.0,), ok=False),
        ]
    )
    assert items["delta_v"] == pytest.approx([0.3, -0.1])
    assert items["rating"] == [4.0] and items["empathy"] == [4.0]
    assert items["reply_quality"] == pytest.approx([0.3])
    assert items["reply_words"] == [6.0]  # Words per reply, a session's mean.


def test_paired_differences_compare_each_user_with_themself() -> None:
    from emili_pipeline.study_sim import paired_differences, pooled_paired, session_users

    sessions = [_Outcome(-0.5, -0.2, seed=7), _Outcome(0.0, 1.0, ok=False, seed=8), _Outcome(-0.1, 0.0, seed=9)]
    assert session_users(sessions)["delta_v"] == [7, 9]  # The failed session's user has no value.
    with pytest.raises(ValueError, match="two sessions on one arm"):
        paired_differences([1.0, 2.0], [7, 7], [0.0, 5.0], [7, 8])
    # User 8 completed only on the candidate, user 5 only on base: neither is a pair.
    assert paired_differences([0.5, 0.2, 0.1], [7, 8, 9], [0.1, 0.0, 0.3], [9, 5, 7]) == pytest.approx([0.2, 0.0])
    # Users far apart, each gaining 0.1 on the candidate: unpaired the gain drowns, paired it is certain.
    rng = np.random.default_rng(1)
    base = list(rng.normal(0.0, 1.0, 20))
    candidate = [b + 0.1 + float(rng.normal(0.0, 0.01)) for b in base]
    assert difference(candidate, base)["ci95"][0] < 0
    paired = pooled_paired([paired_differences(candidate, range(20), base, range(20))])
    assert paired["n_pairs"] == 20 and 0.09 < paired["ci95"][0] < paired["difference"] < paired["ci95"][1] < 0.11
    # Pooled over iterations: the mean of the iterations' mean differences.
    two = pooled_paired([[0.1] * 5, [0.3] * 10, []])
    assert two["iterations"] == 2 and two["difference"] == pytest.approx(0.2) and two["ci95"] == [0.2, 0.2]


def test_interval_and_difference() -> None:
    assert interval([]) == {"n": 0, "mean": None, "ci95": None}
    one = interval([0.1, 0.2, 0.3, 0.4])
    assert one["n"] == 4 and one["mean"] == pytest.approx(0.25)
    assert one["ci95"][0] <= 0.25 <= one["ci95"][1]
    d = difference([1.0, 1.1, 0.9, 1.0], [0.0, 0.1, -0.1, 0.0])
    assert d["difference"] == pytest.approx(1.0) and d["ci95"][0] > 0.8
    assert difference([], [1.0])["ci95"] is None
    # One value has no spread: no interval, rather than a point read as certainty.
    assert interval([0.3]) == {"n": 1, "mean": 0.3, "ci95": None}
    single = difference([0.2], [0.1, 0.0])
    assert single["difference"] == pytest.approx(0.15) and single["ci95"] is None
    assert paired_interval([0.05]) == {"n_pairs": 1, "difference": 0.05, "ci95": None}


def test_pooled_difference_averages_iterations_and_resamples_within_each() -> None:
    assert pooled_difference([])["ci95"] is None and pooled_difference([([], [1.0])])["iterations"] == 0
    one = pooled_difference([([1.0, 1.1, 0.9, 1.0], [0.0, 0.1, -0.1, 0.0])])
    assert one["difference"] == pytest.approx(1.0) and one["iterations"] == 1 and one["ci95"][0] > 0.8
    # A gain of 0.4 in one iteration and none in the other pool to 0.2, whatever the arms' sizes.
    rng = np.random.default_rng(0)
    noisy = [list(rng.normal(0.0, 0.1, 30)) for _ in range(4)]
    pooled = pooled_difference([([v + 0.4 for v in noisy[0]], noisy[1]), (noisy[2][:10], noisy[3])])
    assert pooled["difference"] == pytest.approx(
        (np.mean(noisy[0]) + 0.4 - np.mean(noisy[1]) + np.mean(noisy[2][:10]) - np.mean(noisy[3])) / 2, abs=1e-4
    )
    assert pooled["n_candidate"] == 40 and pooled["ci95"][0] < pooled["difference"] < pooled["ci95"][1]
    # Resampled within each iteration: iterations that differ, each without spread, leave no doubt at all (pooling
    # their sessions before resampling would mix the two gains into a wide interval).
    fixed = pooled_difference([([1.0] * 5, [0.0] * 5), ([3.0] * 5, [0.0] * 5)])
    assert fixed["difference"] == pytest.approx(2.0) and fixed["ci95"] == [pytest.approx(2.0), pytest.approx(2.0)]


def test_base_against_base_is_called_an_aa_check_only_when_both_bases_read_real_faces() -> None:
    from emili_pipeline.study_sim import _base_against_base_table

    same = {"n_candidate": 4, "n_baseline": 4, "difference": 0.0, "ci95": [-0.1, 0.1]}
    checks = {"delta_v": {"iterations": {1: same}, "pooled": same}}
    aa = "\n".join(_base_against_base_table({"options": {"noise_faces": "training"}, "base_against_base": checks}))
    assert "Base against base" in aa and "| delta_v | 1 | 4 / 4 |" in aa
    for options in ({"noise_faces": "everywhere"}, {}):  # {}: a report from before the option had its default.
        decoy = "\n".join(_base_against_base_table({"options": options, "base_against_base": checks}))
        assert "Base under real faces against base under decoy faces" in decoy and "not an A/A check" in decoy


def test_compare_arms_has_every_metric() -> None:
    compared = compare_arms({"delta_v": [0.2, 0.3]}, {"delta_v": [0.0, 0.1]})
    assert compared["delta_v"]["difference"]["difference"] == pytest.approx(0.2)
    assert compared["rating"]["candidate"]["n"] == 0


def test_canary_promotes_only_on_a_clear_gain() -> None:
    better = {"delta_v": [0.5, 0.6, 0.55, 0.52, 0.58], "rating": [4.0, 4.0, 4.5, 4.0, 4.0]}
    same = {"delta_v": [0.0, 0.1, -0.1, 0.05, -0.05], "rating": [4.0, 4.0, 4.5, 4.0, 4.0]}
    assert canary_decision(better, same, min_sessions=5)["outcome"] == "promoted"
    # Five sessions an arm are too few by default, however clear the interval looks.
    too_few = canary_decision(better, same)
    assert too_few["outcome"] == "rolled_back" and "too few" in too_few["reason"]
    # Merely "not worse" (noise): rolled back.
    assert canary_decision(same, same, min_sessions=5)["outcome"] == "rolled_back"
    worse_rating = {**better, "rating": [1.0, 1.0, 1.5, 1.0, 1.0]}
    decision = canary_decision(worse_rating, same, min_sessions=5)
    assert decision["outcome"] == "rolled_back" and "rating" in decision["reason"]
    assert canary_decision({"delta_v": [1.0]}, same, min_sessions=1)["outcome"] == "rolled_back"
    # A clear Δv gain with nobody's rating is no evidence that the rating is not worse.
    unrated = canary_decision({"delta_v": better["delta_v"]}, {"delta_v": same["delta_v"]}, min_sessions=5)
    assert unrated["outcome"] == "rolled_back" and "rated" in unrated["reason"]


def _iteration(n: int, *, passed: bool | None, canary: str | None, production: str = "base") -> dict[str, Any]:
    record: dict[str, Any] = {
        "iteration": n,
        "collected": {"ok": 4},
        "sessions_used": 4 * n,
        "new_sessions": 4,
        "loop_outcome": "gate failed",
        "production_after": production,
        "wall_s": 12.0,
        "errors": [],
    }
    if passed is not None:
        record["candidate"] = f"v{n}"
        record["gate"] = {
            "passed": passed,
            "checks": [
                {
                    "name": "delta_v_gain",
                    "kind": "superior",
                    "n": 4,
                    "estimate": 0.1,
                    "ci": [-0.1, 0.3],
                    "passed": passed,
                    "reason": "why",
                },
            ],
        }
        record["canary"] = {"outcome": canary}
        record["evaluation"] = {"candidate_vs_base": compare_arms({"delta_v": [0.2, 0.3]}, {"delta_v": [0.0, 0.1]})}
    return record


def test_decision_summary_counts_gates_canaries_and_sessions() -> None:
    summary = decision_summary(
        [
            _iteration(1, passed=False, canary=None),
            _iteration(2, passed=True, canary="promoted", production="v2"),
            _iteration(3, passed=None, canary=None, production="v2"),
        ]
    )
    assert summary["iterations"] == 3 and summary["candidates"] == 2
    assert summary["gate_passed"] == 1 and summary["gate_failed"] == 1
    assert summary["promoted"] == 1 and summary["rolled_back"] == 0
    assert summary["sessions_collected"] == 12 and summary["sessions_used_last"] == 12
    assert summary["final_production"] == "v2" and summary["promoted_versions"] == ["v2"]
    assert decision_summary([])["final_production"] is None


def test_report_says_synthetic_everywhere_and_flags_a_noise_promotion(tmp_path: Path) -> None:
    conditions = {
        "feedback": [_iteration(1, passed=True, canary="promoted", production="v1")],
        "noise": [_iteration(1, passed=False, canary=None)],
    }
    report = build_report({"iterations": 1}, conditions, 90.0)
    assert report["synthetic"] is True and report["noise_promoted"] is False
    text = render_markdown(report)
    titles = [line for line in text.splitlines() if line.startswith("#")]
    assert titles and all("SYNTHETIC" in t or "simulated" in t.lower() for t in titles)
    assert "human" not in text.lower() and "participant" not in text.lower()
    assert "OFFLINE" in text and "promoted nothing" in text
    json_path, md_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["decisions"]["feedback"]["promoted"] == 1
    assert md_path.read_text() == text
    noisy = build_report({}, {"noise": [_iteration(1, passed=True, canary="promoted")]}, 1.0)
    assert noisy["noise_promoted"] is True and "failed this check" in render_markdown(noisy)
    assert build_report({}, {"feedback": [], "noise": []}, 1.0)["noise_promoted"] is None


# --- the simulation gate requires a gain ------------------------------------------------------------------------------


POWERED_GATE = SIMULATION_GATE.with_name("gate-simulation-powered.yaml")


def _evidence(gain: float, users: int = 12, contexts: int = 8, empathy_loss: float = 0.0) -> dict[str, Evidence]:
    rng = np.random.default_rng(0)
    base = list(rng.normal(0.0, 0.05, users))
    epitome = list(rng.choice([0.0, 1 / 3, 2 / 3, 1.0], contexts))
    return {
        "delta_v": Evidence([v + gain for v in base], base),
        "diff_epitome_mean": Evidence([v + empathy_loss for v in epitome], epitome, paired=True),
        "reply_words": Evidence([20.0] * contexts, [20.0] * contexts, paired=True),
        "negative_reaction": Evidence([0.0] * 2 * users, [0.0] * 2 * users),
    }


@pytest.mark.parametrize(("gate", "users", "contexts"), [(SIMULATION_GATE, 12, 8), (POWERED_GATE, 48, 28)])
def test_simulation_gates_fail_a_candidate_that_is_only_not_worse(gate: Path, users: int, contexts: int) -> None:
    policy = load_policy(gate)
    assert judge(policy, _evidence(0.3, users, contexts)).passed
    verdict = judge(policy, _evidence(0.0, users, contexts))
    assert not verdict.passed
    assert [c.name for c in verdict.checks if not c.passed] == ["delta_v_gain"]


def test_powered_gate_fails_a_clear_empathy_loss_and_too_few_users() -> None:
    policy = load_policy(POWERED_GATE)
    lost = judge(policy, _evidence(0.3, 48, 28, empathy_loss=0.5))
    assert [c.name for c in lost.checks if not c.passed] == ["empathy_not_worse"]
    few = judge(policy, _evidence(0.3, 12, 28))
    assert {c.name for c in few.checks if not c.passed} == {"delta_v_gain", "delta_v_not_worse"}


REACTIONS_GATE = SIMULATION_GATE.with_name("gate-simulation-reactions.yaml")


def test_reactions_gate_needs_a_gain_in_the_face_and_surveys_not_worse() -> None:
    """A gain in the face's reaction passes; the same gain with the surveys' Δv clearly worse fails on the surveys;
    no gain in the face fails on the face, however good the surveys look; and every gain fails when the training
    users' faces did not predict their surveys."""
    from emili_pipeline.config import load_config
    from emili_pipeline.loop import undersized_checks

    policy = load_policy(REACTIONS_GATE)
    rng = np.random.default_rng(1)
    faces = list(rng.normal(0.0, 20.0, 48))

    # The pipeline's own users: their faces' mean reactions and their surveys' Δv.
    training_faces = rng.normal(0.0, 20.0, 72)
    predicted = training_faces / 100 + rng.normal(0.0, 0.2, 72)
    unrelated = rng.normal(0.0, 0.2, 72)
    moods = rng.choice([-0.5, 0.0, 0.5], 72)  # The users' pre-chat valence, which the check blocks by.

    def evidence(face_gain: float, delta_v_gain: float, surveys: np.ndarray = predicted) -> dict[str, Evidence]:
        signal = Evidence(list(training_faces), list(surveys), paired=True, covariate=list(moods))
        return _evidence(delta_v_gain, 48, 28) | {
            "reaction": Evidence([v + face_gain for v in faces], faces, True),
            "reaction_predicts_delta_v": signal,
        }

    assert judge(policy, evidence(10.0, 0.0)).passed
    worse = judge(policy, evidence(10.0, -0.3))
    assert [c.name for c in worse.checks if not c.passed] == ["delta_v_not_worse"]
    flat = judge(policy, evidence(0.0, 0.3))
    assert [c.name for c in flat.checks if not c.passed] == ["reaction_gain"]
    # Feedback that predicts nothing the same people reported: the candidate's gains are not credited to it.
    noise = judge(policy, evidence(10.0, 0.3, unrelated))
    assert [c.name for c in noise.checks if not c.passed] == ["feedback_predicts_surveys"]
    # The study's pipeline gives every check enough evidence.
    for pipeline in ("loop-simulation-reactions.yaml", "loop-simulation-personas.yaml"):
        assert undersized_checks(load_config(SIMULATION_GATE.with_name(pipeline)), policy) == []


# --- the loop's surroundings ----------------------------------------------------------------------------------------


def test_condition_pipeline_sets_the_feedback_and_absolute_recipes(tmp_path: Path) -> None:
    from emili_pipeline.config import load_config

    path = condition_pipeline(SIMULATION_PIPELINE, "noise", tmp_path)
    data = yaml.safe_load(path.read_text())
    assert data["simulator"]["feedback"] == "noise" and data["name"].endswith("-noise")
    assert all(Path(v).is_absolute() and Path(v).is_file() for v in data["recipes"].values())
    assert load_config(path).simulator_settings().feedback == "noise"


class _Store:
    def __init__(self) -> None:
        self.objects: dict[tuple[Any, str], Any] = {}

    def get_json(self, bucket: Any, key: str) -> Any:
        return self.objects[(bucket, key)]

    def put_json(self, bucket: Any, key: str, value: Any) -> str:
        self.objects[(bucket, key)] = value
        return key

    def exists(self, bucket: Any, key: str) -> bool:
        return (bucket, key) in self.objects


def test_scoped_store_keeps_the_study_loop_state_apart() -> None:
    store = _Store()
    scoped = ScopedStateStore(store, "study-simulations/x/noise/loop-state.json")
    scoped.put_json("models", "loop/state.json", {"phase": "idle"})
    scoped.put_json("models", "gates/v1.json", {"passed": False})
    assert ("models", "loop/state.json") not in store.objects
    assert store.objects[("models", "study-simulations/x/noise/loop-state.json")] == {"phase": "idle"}
    assert scoped.get_json("models", "loop/state.json") == {"phase": "idle"}
    assert scoped.exists("models", "gates/v1.json")


class _System:
    def eligible_sessions(self, include_synthetic: bool) -> list[str]:
        return ["a", "b", "other"]


def test_study_actions_see_only_the_condition_sessions_and_run_the_canary_offline() -> None:
    compared: list[str] = []

    def compare(candidate: str) -> dict[str, Any]:
        compared.append(candidate)
        return {"outcome": "rolled_back", "reason": "no clear gain"}

    actions = StudyActions(_System(), OfflineCanary(compare), {"a", "b", "c"})
    assert actions.eligible_sessions(True) == ["a", "b"]
    assert actions.canary_outcome("v1") == "missing"
    assert actions.start_canary("v1", "base", 0.1, None, True) == [OFFLINE_STUDY]
    assert actions.canary_outcome("v1") == "rolled_back" and compared == ["v1"]


def test_emili_study_has_simulate_and_keeps_the_gateway_commands() -> None:
    import typer

    from emili_pipeline.study_cli import commands

    group = typer.main.get_command(commands)
    study = group.commands["study"]  # type: ignore[attr-defined]
    assert {"simulate", "combine", "pool", "power", "gate-replies", "canary-power"} <= set(study.commands)
    if list(entry_points(group="emili.cli", name="study")):  # The gateway is installed: its commands stay.
        assert {"create", "invite", "export"} <= set(study.commands)


# --- the study's driver around the real Loop, with fake users, pipelines and storage ---------------------------------


class _NotFoundStore(_Store):
    def get_json(self, bucket: Any, key: str) -> Any:
        from emili_core.errors import NotFound

        if (bucket, key) not in self.objects:
            raise NotFound(key)
        return self.objects[(bucket, key)]

    def get_bytes(self, bucket: Any, key: str) -> bytes:
        return bytes(self.get_json(bucket, key))


GOOD_REPLY = "I'm so sorry, that sounds really hard. How are you holding up?"
BAD_REPLY = "Calm down, whatever. You should just get over it and try to move on with your life already."


def _pair(chosen: str, rejected: str, user: str = "My dog died last week.") -> dict[str, Any]:
    return {
        "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": user}],
        "chosen": chosen,
        "rejected": rejected,
    }


@dataclass
class _FakeStudyStack:
    """Fake users, pipelines and storage around the real Loop; they outlive a study run, as the stack does."""

    stack: Any
    recorded: list[str] = field(default_factory=list)
    pipelines: dict[str, int] = field(default_factory=dict)  # Pipelines started per condition ("f", "n").
    collected: int = 0  # Users who talked to the production arm to be recorded (role "collect").
    interrupt_once: bool = False  # The next pipeline_outcome raises KeyboardInterrupt, as a stopped study would.
    interrupt_users: str | None = None  # Users with this subject prefix raise KeyboardInterrupt (once).
    faces: dict[str, set[str]] = field(default_factory=dict)  # Per role ("collect", an arm's): what the faces showed.
    datasets: bool = False  # Pipelines publish a state with a DPO dataset (study_signal reads it).
    arms: dict[str, str] = field(default_factory=dict)  # Session id -> the arm its user talked to.
    positive: dict[str, float] = field(default_factory=dict)  # Per arm: the share of replies flagged positive (0.5).
    labelled: list[str] = field(default_factory=list)  # Sessions the fake labeler was asked to label.
    fail_users: str | None = None  # The first user with this subject prefix fails (once).
    running_polls: int = 0  # The next pipelines answer "running" this many times before they are done.

    def send_task(self, name: str, args: list[str]) -> Any:
        """The labeler's ``labeler.label_session`` on the Celery producer: a label whose 4 replies' reactions were
        read, the arm's share of them flagged positive."""
        assert name == "labeler.label_session"
        (session_id,) = args
        self.labelled.append(session_id)
        flagged = round(4 * self.positive.get(self.arms[session_id], 0.5))
        turns = [{"delta": 0.1, "flagged": i < flagged} for i in range(4)]
        label = {"session_id": session_id, "gold": {"delta": {"valence": 0.02}}, "turns": turns}
        return type("Result", (), {"get": lambda self, timeout: label})()


@pytest.fixture
def fake_study(monkeypatch: pytest.MonkeyPatch) -> _FakeStudyStack:
    import emili_pipeline.loop_actions as loop_actions
    import emili_pipeline.simulator as simulator
    from emili_pipeline.simulator.run import SessionOutcome, TurnResult
    from emili_pipeline.study_sim import Stack

    fake = _FakeStudyStack(Stack(store=_NotFoundStore(), celery=None, chat_target="chat", token_for=lambda s: "t"))
    fake.stack.celery = fake

    async def users(n: int, concurrency: int, target: str, personas: Any, settings: Any, seed: int, **_: Any) -> Any:
        # Trained versions of the feedback condition lift valence by 0.3; everything else changes nothing.
        gain = 0.3 if settings.model_arm.startswith("v") and settings.feedback == "state" else 0.0
        if settings.subject_prefix == fake.interrupt_users:
            fake.interrupt_users = None
            raise KeyboardInterrupt
        fake.collected += n if "collect" in settings.subject_prefix else 0
        role = "collect" if "collect" in settings.subject_prefix else "arm"
        fake.faces.setdefault(role, set()).add(settings.feedback)
        rng = np.random.default_rng(seed)
        outcomes = []
        for i in range(n):
            outcome = SessionOutcome("p", seed * 1000 + i, session_id=f"s{len(fake.recorded)}")  # A user per seed.
            fake.recorded.append(outcome.session_id)
            fake.arms[outcome.session_id] = settings.model_arm
            outcome.start_state = {"valence": -0.5}
            outcome.end_state = {"valence": -0.5 + gain + float(rng.normal(0.0, 0.05))}
            outcome.ratings = {"empathy": 4, "relevance": 3, "fluency": 4}
            outcome.turns = [TurnResult("hi", quality=0.3)]
            if fake.fail_users is not None and settings.subject_prefix.startswith(fake.fail_users):
                fake.fail_users, outcome.errors = None, ["chat: no text for 30 s"]
            outcomes.append(outcome)
        return outcomes

    class System:
        def __init__(self, store: Any, celery: Any, path: Path, fetch_recipe: Any = None) -> None:
            self.kind = "n" if "noise" in path.name else "f"

        def eligible_sessions(self, include_synthetic: bool) -> list[str]:
            return list(fake.recorded)

        def start_pipeline(self, session_ids: Any, baseline: str) -> str:
            from emili_core.keys import pipeline_state_key
            from emili_core.objectstore import Bucket

            fake.pipelines[self.kind] = fake.pipelines.get(self.kind, 0) + 1
            pipeline_id = f"pl-{fake.pipelines[self.kind]}{self.kind}"
            if fake.datasets:  # Feedback's pair prefers the better reply, noise's the worse.
                pair = _pair(GOOD_REPLY, BAD_REPLY) if self.kind == "f" else _pair(BAD_REPLY, GOOD_REPLY)
                key = f"dpo_feedback/{pipeline_id}/data.jsonl"
                fake.stack.store.objects[(Bucket.DATASETS, key)] = (json.dumps(pair) + "\n").encode()
                outputs = {"dpo": {"kind": "dpo_feedback", "key": key}}
                state = {"steps": {"datasets": {"outputs": outputs}}}
                fake.stack.store.objects[(Bucket.MODELS, pipeline_state_key(pipeline_id))] = state
            return pipeline_id

        def pipeline_outcome(self, pipeline_id: str) -> Any:
            if fake.interrupt_once:
                fake.interrupt_once = False
                raise KeyboardInterrupt
            if fake.running_polls > 0:
                fake.running_polls -= 1
                return "running", None, {}
            base = [0.0, 0.05, -0.05, 0.02, -0.02]
            gain = 0.0 if self.kind == "n" else 0.3
            evidence = {
                "delta_v": Evidence([v + gain for v in base], base),
                "diff_epitome_mean": Evidence([0.3] * 5, [0.3] * 5, paired=True),
                "reply_words": Evidence([20.0] * 5, [20.0] * 5, paired=True),
                "negative_reaction": Evidence([0.0] * 10, [0.0] * 10),
            }
            return "done", f"v{pipeline_id.removeprefix('pl-')}", evidence

    monkeypatch.setattr(simulator, "run_users", users)
    monkeypatch.setattr(loop_actions, "SystemActions", System)
    monkeypatch.setattr(loop_actions, "eligible_session_ids", lambda store, include_synthetic: list(fake.recorded))
    return fake


def _options(out: Path, iterations: int, **changes: Any) -> Any:
    from emili_pipeline.study_sim import StudyOptions

    settings: dict[str, Any] = {"sessions": 3, "eval_users": 5, "canary_min_sessions": 5, "out": out, "poll_s": 0.0}
    settings |= {"canary_rule": "dv-gain"} | changes  # The gateway rule has tests of its own (below).
    return StudyOptions(iterations=iterations, **settings)


def test_run_study_promotes_a_real_gain_and_nothing_under_noise(fake_study: _FakeStudyStack, tmp_path: Path) -> None:
    from emili_pipeline.study_sim import run_study

    report = run_study(fake_study.stack, _options(tmp_path, 2))

    feedback, noise = report["decisions"]["feedback"], report["decisions"]["noise"]
    # Iteration 2's candidate is no better than the promoted v1f: its canary rolls it back.
    assert feedback["promoted_versions"] == ["v1f"] and feedback["rolled_back"] == 1
    assert noise["promoted"] == 0 and noise["gate_failed"] == 2 and noise["final_production"] == "base"
    assert report["noise_promoted"] is False
    first = report["conditions"]["feedback"][0]
    assert first["sessions_used"] == 3 and first["canary"]["mode"].startswith("offline")
    assert first["evaluation"]["candidate_vs_base"]["delta_v"]["difference"]["ci95"][0] > 0
    assert report["conditions"]["feedback"][1]["sessions_used"] == 6  # The loop trains on every session so far.
    pooled = report["pooled_candidate_vs_base"]
    assert pooled["feedback"]["delta_v"]["iterations"] == 2 and pooled["feedback"]["delta_v"]["ci95"][0] > 0
    # Every arm meets the same users (same seeds): paired, iteration by iteration and pooled.
    assert first["evaluation"]["candidate_vs_base"]["delta_v"]["paired"]["n_pairs"] == 5
    assert pooled["feedback"]["delta_v"]["paired"]["n_pairs"] == 10
    assert pooled["feedback"]["delta_v"]["paired"]["ci95"][0] > 0
    assert pooled["noise"]["delta_v"]["ci95"][0] < 0 < pooled["noise"]["delta_v"]["ci95"][1]
    # The fake users on base react alike in both conditions (same seeds, nothing trained): the A/A check reads 0.
    same = report["base_against_base"]["delta_v"]
    assert set(same["iterations"]) == {1, 2} and same["pooled"]["difference"] == pytest.approx(0.0)
    # Under the default decoy faces everywhere, noise's base reads other faces: the table must not call it an A/A.
    markdown = (tmp_path / "study.md").read_text()
    assert "Base under real faces against base under decoy faces" in markdown and "Base against base" not in markdown
    assert (tmp_path / "study.json").is_file() and "SYNTHETIC" in (tmp_path / "study.md").read_text()


def test_a_loop_that_does_not_settle_stops_its_condition_for_a_resume_not_the_next_iteration(
    fake_study: _FakeStudyStack, tmp_path: Path
) -> None:
    from emili_pipeline.study_sim import run_study

    # Run N (BENCHMARKS.md): an iteration that timed out was counted as done, and its canary's outcome became the
    # next iteration's, which then trained nothing.
    fake_study.running_polls = 10**6  # Feedback's first pipeline never finishes within the timeout.
    report = run_study(fake_study.stack, _options(tmp_path, 2, conditions=("feedback",), iteration_timeout_s=0.0))
    assert report["conditions"]["feedback"] == [] and fake_study.pipelines == {"f": 1}
    assert "feedback iteration 1: the loop did not settle" in report["stopped"]["feedback"]
    assert "--resume" in (tmp_path / "study.md").read_text()
    # Resumed once the pipeline is done: the same iteration goes on without collecting again, then iteration 2.
    fake_study.running_polls, collected = 0, fake_study.collected
    report = run_study(fake_study.stack, _options(tmp_path, 2, conditions=("feedback",)), resume=True)
    feedback = report["conditions"]["feedback"]
    assert [it["iteration"] for it in feedback] == [1, 2] and "stopped" not in report
    assert feedback[0]["resumed"] is True and feedback[0]["candidate"] == "v1f"
    assert fake_study.collected == collected + 3 and fake_study.pipelines == {"f": 2}


def test_a_resumed_study_carries_on_its_sessions_candidates_and_an_interrupted_iteration(
    fake_study: _FakeStudyStack, tmp_path: Path
) -> None:
    from emili_pipeline.study_sim import run_study

    first = run_study(fake_study.stack, _options(tmp_path, 1))
    fake_study.interrupt_once = True  # Stopped in feedback iteration 2, after its users were collected.
    with pytest.raises(KeyboardInterrupt):
        run_study(fake_study.stack, _options(tmp_path, 2), resume=True)
    collected = fake_study.collected
    report = run_study(fake_study.stack, _options(tmp_path, 2), resume=True)

    assert report["options"]["run_id"] == first["options"]["run_id"]
    feedback = report["conditions"]["feedback"]
    assert [it["iteration"] for it in feedback] == [1, 2] and len(report["conditions"]["noise"]) == 2
    # The interrupted iteration went on from where its loop was, without collecting again; only noise collected.
    assert feedback[1]["resumed"] is True and fake_study.collected == collected + 3
    assert feedback[1]["sessions_used"] == 6  # Iteration 1's sessions were restored, not forgotten.
    assert feedback[1]["production_before"] == "v1f" and feedback[1]["canary"]["outcome"] == "rolled_back"
    assert fake_study.pipelines == {"f": 2, "n": 2}  # No second pipeline for the interrupted iteration.


def test_a_study_stopped_after_its_canary_settled_keeps_the_decision(
    fake_study: _FakeStudyStack, tmp_path: Path
) -> None:
    from emili_pipeline.study_sim import run_study

    # Feedback iteration 2: v2f's canary against the promoted v1f rolls it back; the stop comes after, while users
    # talk to base for the iteration's record. Only the loop's state (not the report) has seen the canary settle.
    fake_study.interrupt_users = "sim-feedb-2-base"
    with pytest.raises(KeyboardInterrupt):
        run_study(fake_study.stack, _options(tmp_path, 2, conditions=("feedback",)))
    report = run_study(fake_study.stack, _options(tmp_path, 2, conditions=("feedback",)), resume=True)

    second = report["conditions"]["feedback"][1]
    assert second["resumed"] is True and second["candidate"] == "v2f"
    assert second["canary"]["outcome"] == "rolled_back" and report["decisions"]["feedback"]["rolled_back"] == 1
    assert fake_study.pipelines == {"f": 2}


def test_resume_refuses_a_stack_that_lost_the_study_or_another_run(fake_study: _FakeStudyStack, tmp_path: Path) -> None:
    import json

    from emili_pipeline.study_sim import StudyResumeError, run_study

    run_study(fake_study.stack, _options(tmp_path, 1, conditions=("noise",)))
    progress = tmp_path / "noise" / "progress.json"
    saved = json.loads(progress.read_text())
    progress.write_text(json.dumps({**saved, "run_id": "another"}))
    with pytest.raises(StudyResumeError, match="belongs to run another"):
        run_study(fake_study.stack, _options(tmp_path, 2, conditions=("noise",)), resume=True)
    progress.write_text(json.dumps(saved))
    fake_study.stack.store.objects.clear()  # What make clean does to the object store.
    with pytest.raises(StudyResumeError, match="saved state is gone"):
        run_study(fake_study.stack, _options(tmp_path, 2, conditions=("noise",)), resume=True)


def test_resume_refuses_other_options_or_no_study(fake_study: _FakeStudyStack, tmp_path: Path) -> None:
    from emili_pipeline.study_sim import StudyResumeError, run_study

    with pytest.raises(StudyResumeError, match="nothing to resume"):
        run_study(fake_study.stack, _options(tmp_path, 1), resume=True)
    alone = run_study(fake_study.stack, _options(tmp_path, 1, conditions=("noise",)))
    assert alone["base_against_base"] == {}  # Nothing to check it against.
    with pytest.raises(StudyResumeError, match="seed was 0, now 1"):
        run_study(fake_study.stack, _options(tmp_path, 2, conditions=("noise",), seed=1), resume=True)


def test_resume_ignores_comments_in_the_config_but_not_a_changed_check(
    fake_study: _FakeStudyStack, tmp_path: Path
) -> None:
    from emili_pipeline.study_sim import SIMULATION_GATE, StudyResumeError, byte_config_digest, run_study

    gate = tmp_path / "gate.yaml"
    gate.write_text(SIMULATION_GATE.read_text())
    options = _options(tmp_path / "out", 1, conditions=("noise",), gate=gate)
    run_study(fake_study.stack, options)
    gate.write_text("# A comment added after the study began.\n" + gate.read_text())
    assert len(run_study(fake_study.stack, replace(options, iterations=2), resume=True)["conditions"]["noise"]) == 2
    # A study recorded before the digest parsed its files resumes when they are byte for byte as they were.
    report_path = tmp_path / "out" / "study.json"
    report = json.loads(report_path.read_text())
    report["options"]["config_sha256"] = byte_config_digest(options.pipeline, gate)
    report_path.write_text(json.dumps(report))
    assert len(run_study(fake_study.stack, replace(options, iterations=3), resume=True)["conditions"]["noise"]) == 3
    checks = yaml.safe_load(gate.read_text())
    checks["gate"]["checks"][0]["min_n"] += 1
    gate.write_text(yaml.safe_dump(checks))
    with pytest.raises(StudyResumeError, match="config_sha256 was"):
        run_study(fake_study.stack, replace(options, iterations=4), resume=True)


def test_noise_faces_training_shows_the_decoy_only_where_the_loop_learns(
    fake_study: _FakeStudyStack, tmp_path: Path
) -> None:
    from emili_pipeline.study_sim import StudyResumeError, run_study

    options = _options(tmp_path, 1, conditions=("noise",), noise_faces="training")
    report = run_study(fake_study.stack, options)
    assert report["options"]["noise_faces"] == "training"
    assert fake_study.faces == {"collect": {"noise"}, "arm": {"state"}}
    pipeline = yaml.safe_load((tmp_path / "noise" / "pipeline-noise.yaml").read_text())
    assert pipeline["simulator"]["feedback"] == "state"  # The gate's evaluation users read real faces.
    with pytest.raises(StudyResumeError, match="noise_faces was 'training', now 'everywhere'"):
        run_study(fake_study.stack, _options(tmp_path, 2, conditions=("noise",)), resume=True)


def test_a_study_from_before_noise_faces_resumes_with_the_default(fake_study: _FakeStudyStack, tmp_path: Path) -> None:
    import json

    from emili_pipeline.study_sim import run_study

    run_study(fake_study.stack, _options(tmp_path, 1, conditions=("noise",)))
    assert fake_study.faces == {"collect": {"noise"}, "arm": {"noise"}}  # The default: the decoy everywhere.
    path = tmp_path / "study.json"
    report = json.loads(path.read_text())
    del report["options"]["noise_faces"]
    path.write_text(json.dumps(report))
    resumed = run_study(fake_study.stack, _options(tmp_path, 2, conditions=("noise",)), resume=True)
    assert len(resumed["conditions"]["noise"]) == 2


# --- what the loop learned from (study_signal) -----------------------------------------------------------------------


def test_pair_gaps_and_turn_qualities_score_replies_as_the_user_heard_them() -> None:
    from emili_pipeline.simulator.state import word_count
    from emili_pipeline.study_signal import pair_gaps, turn_lengths, turn_qualities

    gaps = pair_gaps([_pair(GOOD_REPLY, BAD_REPLY) | {"context": "a"}, _pair(BAD_REPLY, GOOD_REPLY) | {"context": "a"}])
    assert list(gaps) == ["a"] and gaps["a"][0] > 0.5 and gaps["a"][1] == pytest.approx(-gaps["a"][0])
    # Scored against the user message before each reply: reflecting *that* message's words counts.
    echo = pair_gaps([_pair("Your puppy?", "Your kitten?", user="My puppy died.")])
    assert next(iter(echo.values()))[0] > 0
    example = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "My dog died last week."},
            {"role": "assistant", "content": GOOD_REPLY, "weight": 1},
            {"role": "system", "content": "Right now, user looks SAD (60)"},
            {"role": "user", "content": "Thanks."},
            {"role": "assistant", "content": BAD_REPLY, "weight": 0},
        ]
    }
    flagged, unflagged = turn_qualities([example])
    assert len(flagged) == len(unflagged) == 1 and flagged[0] > unflagged[0]
    assert turn_lengths([example]) == {
        "trained_words": float(word_count(GOOD_REPLY)),
        "other_words": float(word_count(BAD_REPLY)),
    }


def test_training_signal_reads_the_pipeline_datasets() -> None:
    from emili_core.objectstore import Bucket
    from emili_pipeline.simulator.state import word_count
    from emili_pipeline.study_signal import training_signal

    store = _NotFoundStore()
    pairs = [_pair(GOOD_REPLY, BAD_REPLY)] * 3 + [_pair(BAD_REPLY, GOOD_REPLY)]
    store.objects[(Bucket.DATASETS, "d")] = "".join(json.dumps(p) + "\n" for p in pairs).encode()
    signal = training_signal(store, {"dpo": {"kind": "dpo_feedback", "key": "d"}})
    assert signal["pairs"]["n"] == 4 and signal["pairs"]["chosen_better"] == 0.75 and signal["pairs"]["mean"] > 0
    assert signal["pairs"]["groups"] == 4 and signal["pairs"]["ci95"] is None  # Without a context: their own.
    # Lengths: a preference for shorter replies would show here under noise (BENCHMARKS.md, run M).
    good, bad = word_count(GOOD_REPLY), word_count(BAD_REPLY)
    assert signal["pairs"]["chosen_words"] == round((3 * good + bad) / 4, 1)
    assert signal["pairs"]["rejected_words"] == round((good + 3 * bad) / 4, 1)
    assert signal["pairs"]["chosen_shorter"] == (0.75 if good < bad else 0.25)
    assert "turns" not in signal
    # EmPO's pairs are not the users' feedback: nothing to read there.
    assert training_signal(store, {"dpo": {"kind": "dpo_empathetic", "key": "d"}}) == {}


def test_the_study_records_and_reports_what_each_candidate_learned_from(
    fake_study: _FakeStudyStack, tmp_path: Path
) -> None:
    from emili_pipeline.study_sim import run_study

    fake_study.datasets = True
    report = run_study(fake_study.stack, _options(tmp_path, 1))

    feedback, noise = report["conditions"]["feedback"][0], report["conditions"]["noise"][0]
    assert feedback["training_signal"]["pairs"]["mean"] > 0 > noise["training_signal"]["pairs"]["mean"]
    text = (tmp_path / "study.md").read_text()
    assert "What the loop learned from" in text and "| feedback | 1 | 1 |" in text


def test_no_pipeline_state_no_training_signal_table(fake_study: _FakeStudyStack, tmp_path: Path) -> None:
    from emili_pipeline.study_sim import run_study

    report = run_study(fake_study.stack, _options(tmp_path, 1))
    assert report["conditions"]["feedback"][0]["training_signal"] == {}
    assert "What the loop learned from" not in (tmp_path / "study.md").read_text()


def test_the_pairs_interval_resamples_contexts_not_pairs() -> None:
    from emili_pipeline.study_signal import cluster_interval

    # Five contexts of 10 identical gaps each: as 50 independent pairs the interval would be about ±0.15; resampling
    # contexts it is several times wider.
    groups = [[g] * 10 for g in (1.0, -0.2, 0.4, 0.8, -0.5)]
    found = cluster_interval(groups)
    assert found["n"] == 50 and found["groups"] == 5 and found["mean"] == pytest.approx(0.3)
    low, high = found["ci95"]
    assert low < 0.3 - 0.3 and high > 0.3 + 0.3
    # Two contexts give no interval at all: resampling them can only pick between their two means.
    assert cluster_interval(groups[:2]) == {"n": 20, "groups": 2, "mean": pytest.approx(0.4), "ci95": None}
    assert cluster_interval([])["ci95"] is None


def test_paired_quality_differences_draw_by_draw_and_resamples_contexts() -> None:
    from emili_pipeline.study_signal import paired_quality

    baseline = {str(c): [0.1 * c, 0.1 * c - 0.2] for c in range(6)}
    # The arm is 0.3 better on every draw of every context: the shared per-context level cancels out.
    arm = {c: [s + 0.3 for s in scores] for c, scores in baseline.items()}
    found = paired_quality(arm, baseline)
    assert found["n"] == 12 and found["groups"] == 6
    assert found["mean"] == pytest.approx(0.3) and found["ci95"] == [pytest.approx(0.3), pytest.approx(0.3)]
    # A context or draw only one side has is left out, not paired with something else.
    found = paired_quality(arm | {"extra": [1.0]}, baseline | {"5": [0.5]})
    assert found["n"] == 11 and found["mean"] == pytest.approx((10 * 0.3 + (0.8 - 0.5)) / 11)
    assert paired_quality({}, baseline)["n"] == 0


# --- the offline canary with the gateway's rule ----------------------------------------------------------------------


def _rows(n: int, rating: float, positive: float = 0.5, completed: float = 1.0) -> list[dict[str, float | None]]:
    rng = np.random.default_rng(int(rating * 10 + positive * 100))
    return [
        {
            "rating": rating + float(rng.normal(0, 0.3)) if completed else None,
            "completed": completed,
            "delta_v": float(rng.normal(0.0, 0.05)),
            "positive_reaction": positive + float(rng.normal(0, 0.1)),
        }
        for _ in range(n)
    ]


def test_the_gateway_rule_promotes_a_candidate_shown_not_worse_at_the_planned_size() -> None:
    from emili_pipeline.study_sim import gateway_canary_decision

    decision = gateway_canary_decision(_rows(20, 3.4), _rows(20, 3.3), planned_sessions=20)
    assert decision["outcome"] == "promoted" and decision["rule"] == "gateway" and decision["looks"] == 20
    rating = decision["outcomes"][0]
    assert rating["outcome"] == "rating" and rating["n_candidate"] == 20 and rating["lower_bound"] > -0.25
    # A slightly lower rating, too little for the harm test but not shown within the margin at the planned size.
    lower = gateway_canary_decision(_rows(20, 3.2), _rows(20, 3.3), planned_sessions=20)
    assert lower["outcome"] == "rolled_back" and "not shown to be as good" in lower["reason"]
    assert lower["looks"] == 20
    # Fewer rated sessions than planned: the canary never reached its analysis.
    short = gateway_canary_decision(_rows(12, 3.4), _rows(12, 3.3), planned_sessions=20)
    assert short["outcome"] == "rolled_back" and "fewer than the planned 20" in short["reason"]


def test_the_gateway_rule_rolls_back_early_on_harm_to_any_outcome() -> None:
    from emili_pipeline.study_sim import gateway_canary_decision

    harmful = gateway_canary_decision(_rows(20, 3.3, positive=0.1), _rows(20, 3.3, positive=0.6), planned_sessions=20)
    assert harmful["outcome"] == "rolled_back" and "positive_reaction" in harmful["reason"]
    assert 10 <= harmful["looks"] < 20  # Called at a look after the burn-in, before the planned size.
    # A candidate that loses its users (no rating, not completed) is harm on completion.
    abandoned = _rows(10, 3.3) + _rows(10, 3.3, completed=0.0)
    assert "completed" in gateway_canary_decision(abandoned, _rows(20, 3.3), planned_sessions=20)["reason"]


def test_canary_outcomes_read_ratings_and_the_labels() -> None:
    from emili_pipeline.simulator.run import SessionOutcome
    from emili_pipeline.study_sim import canary_outcomes

    rated = SessionOutcome("p", 1, session_id="a", ratings={"empathy": 4, "relevance": 3, "fluency": 5})
    failed = SessionOutcome("p", 2, session_id="b", errors=["chat down"])
    turns = [{"delta": 0.2, "flagged": True}, {"delta": -0.1, "flagged": False}, {"delta": None, "flagged": None}]
    labels = {"a": {"gold": {"delta": {"valence": 0.1}}, "turns": turns}}
    assert canary_outcomes([rated, failed], labels) == [
        {"rating": 4.0, "completed": 1.0, "delta_v": 0.1, "positive_reaction": 0.5},
        {"rating": None, "completed": 0.0, "delta_v": None, "positive_reaction": None},
    ]


def test_a_study_with_the_gateway_rule_labels_its_canary_sessions_and_promotes_what_is_not_worse(
    fake_study: _FakeStudyStack, tmp_path: Path
) -> None:
    from emili_pipeline.study_sim import run_study

    report = run_study(fake_study.stack, _options(tmp_path, 2, conditions=("feedback",), canary_rule=None))

    assert report["options"]["canary_rule"] == "gateway" and "gateway's rule" in report["canary_note"]
    first, second = report["conditions"]["feedback"]
    assert first["canary"]["outcome"] == "promoted" and first["canary"]["rule"] == "gateway"
    # The product's canary asks for no harm, not a gain: v2f, as good as v1f, replaces it too.
    assert second["production_before"] == "v1f" and second["canary"]["outcome"] == "promoted"
    assert report["decisions"]["feedback"]["final_production"] == "v2f"
    # Both arms' sessions were labelled for the canary: 5 users each on the candidate and on production.
    assert {fake_study.arms[s] for s in fake_study.labelled} == {"v1f", "v2f", "base"}
    text = (tmp_path / "study.md").read_text()
    assert "gateway's rule" in text and "| feedback | 2 | v2f | v1f | gateway | promoted | 5 |" in text


def test_a_study_with_the_gateway_rule_rolls_back_a_candidate_that_harms_reactions(
    fake_study: _FakeStudyStack, tmp_path: Path
) -> None:
    from emili_pipeline.study_sim import run_study

    fake_study.positive = {"v1f": 0.0, "base": 1.0}
    options = _options(tmp_path, 1, conditions=("feedback",), canary_rule="gateway", eval_users=12)
    report = run_study(fake_study.stack, options)
    canary = report["conditions"]["feedback"][0]["canary"]
    assert canary["outcome"] == "rolled_back" and "positive_reaction" in canary["reason"]
    assert report["decisions"]["feedback"]["final_production"] == "base"


def test_resume_keeps_the_canary_rule_and_changes_it_only_before_any_canary(
    fake_study: _FakeStudyStack, tmp_path: Path
) -> None:
    import json

    from emili_pipeline.study_sim import StudyResumeError, run_study

    noise_only = tmp_path / "noise-only"
    run_study(fake_study.stack, _options(noise_only, 1, conditions=("noise",)))  # dv-gain; the gate failed.
    path = noise_only / "study.json"
    report = json.loads(path.read_text())
    del report["options"]["canary_rule"]  # A study from before the option: the dv-gain rule.
    path.write_text(json.dumps(report))
    kept = run_study(fake_study.stack, _options(noise_only, 2, conditions=("noise",), canary_rule=None), resume=True)
    assert kept["options"]["canary_rule"] == "dv-gain"
    # No canary decided yet: it may go on with the gateway's rule.
    switched = run_study(
        fake_study.stack, _options(noise_only, 3, conditions=("noise",), canary_rule="gateway"), resume=True
    )
    assert switched["options"]["canary_rule"] == "gateway" and "gateway's rule" in switched["canary_note"]

    decided = tmp_path / "decided"
    run_study(fake_study.stack, _options(decided, 1, conditions=("feedback",)))  # v1f promoted under dv-gain.
    with pytest.raises(StudyResumeError, match="decided canaries with the dv-gain rule"):
        run_study(fake_study.stack, _options(decided, 2, conditions=("feedback",), canary_rule="gateway"), resume=True)


def test_a_study_stopped_between_conditions_evens_them_out_when_resumed(
    fake_study: _FakeStudyStack, tmp_path: Path
) -> None:
    from emili_pipeline.study_sim import run_study

    fake_study.interrupt_users = "sim-noise-1-collect"  # Stopped after feedback iteration 1, in noise's first.
    with pytest.raises(KeyboardInterrupt):
        run_study(fake_study.stack, _options(tmp_path, 1))
    finished: list[tuple[str, int]] = []
    report = run_study(
        fake_study.stack,
        _options(tmp_path, 2),
        lambda r: finished.append((r["condition"], r["iteration"])),
        resume=True,
    )
    assert finished == [("noise", 1), ("feedback", 2), ("noise", 2)]
    assert [len(report["conditions"][c]) for c in ("feedback", "noise")] == [2, 2]


def test_the_gateway_rule_canary_tops_up_an_arm_that_lost_a_session(
    fake_study: _FakeStudyStack, tmp_path: Path
) -> None:
    from emili_pipeline.study_sim import run_study

    fake_study.fail_users = "sim-feedb-1-base"  # Base's first user after the loop fails: 4 rated of the planned 5.
    report = run_study(fake_study.stack, _options(tmp_path, 1, conditions=("feedback",), canary_rule="gateway"))
    canary = report["conditions"]["feedback"][0]["canary"]
    # As the gateway waits for more participants, one more user met base, and the canary decided at its planned size.
    assert canary["topped_up"] == [0, 1] and canary["outcome"] == "promoted"
    assert canary["outcomes"][0]["n_production"] == 5


def test_resume_sees_a_canary_decided_in_an_interrupted_iteration(fake_study: _FakeStudyStack, tmp_path: Path) -> None:
    import json

    from emili_pipeline.study_sim import StudyResumeError, run_study

    # v1f's canary decided, but the iteration's record not written (stopped in between): only progress.json knows.
    run_study(fake_study.stack, _options(tmp_path, 1, conditions=("feedback",)))
    path = tmp_path / "study.json"
    report = json.loads(path.read_text())
    report["conditions"]["feedback"][0]["canary"] = {}
    path.write_text(json.dumps(report))
    assert json.loads((tmp_path / "feedback" / "progress.json").read_text())["canary_decisions"]
    with pytest.raises(StudyResumeError, match="decided canaries with the dv-gain rule"):
        run_study(fake_study.stack, _options(tmp_path, 1, conditions=("feedback",), canary_rule="gateway"), resume=True)
    (tmp_path / "feedback" / "progress.json").write_text("{")
    with pytest.raises(StudyResumeError, match="cannot be read"):
        run_study(fake_study.stack, _options(tmp_path, 1, conditions=("feedback",), canary_rule="gateway"), resume=True)


# --- one study from its conditions run apart -----------------------------------------------------------------------


def test_conditions_run_apart_combine_into_one_study(fake_study: _FakeStudyStack, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from emili_pipeline.study_cli import commands
    from emili_pipeline.study_sim import run_study

    for condition in ("noise", "feedback"):
        run_study(fake_study.stack, _options(tmp_path / condition, 2, conditions=(condition,)))
    out = tmp_path / "both"
    result = CliRunner().invoke(
        commands,
        ["study", "combine", str(tmp_path / "noise"), str(tmp_path / "feedback" / "study.json"), "--out", str(out)],
    )

    assert result.exit_code == 0, result.output
    report = json.loads((out / "study.json").read_text())
    assert list(report["conditions"]) == ["feedback", "noise"] and report["options"]["conditions"] == "feedback+noise"
    assert report["decisions"]["feedback"]["promoted_versions"] == ["v1f"] and report["noise_promoted"] is False
    # Both parts' base arms met the same simulated users: the A/A check is there, and reads 0 for these fake users.
    same = report["base_against_base"]["delta_v"]
    assert set(same["iterations"]) == {"1", "2"} and same["pooled"]["difference"] == pytest.approx(0.0)
    assert [p["conditions"] for p in report["parts"]] == ["noise", "feedback"]
    assert "Combined from 2 runs" in (out / "study.md").read_text() and "SYNTHETIC" in (out / "study.md").read_text()


def test_combine_refuses_parts_that_are_not_one_study(fake_study: _FakeStudyStack, tmp_path: Path) -> None:
    from emili_pipeline.study_combine import StudyCombineError, combine_reports, read_part
    from emili_pipeline.study_sim import run_study

    noise = run_study(fake_study.stack, _options(tmp_path / "n", 1, conditions=("noise",)))
    feedback = run_study(fake_study.stack, _options(tmp_path / "f", 1, conditions=("feedback",)))
    other_seed = run_study(fake_study.stack, _options(tmp_path / "s", 1, conditions=("feedback",), seed=3))
    unfinished = {**feedback, "options": {**feedback["options"], "iterations": 2}}
    with pytest.raises(StudyCombineError, match="two or more"):
        combine_reports({"n": noise})
    with pytest.raises(StudyCombineError, match=r"seed 0 in n, 3 here"):
        combine_reports({"n": noise, "s": other_seed})
    with pytest.raises(StudyCombineError, match="condition noise is in another part too"):
        combine_reports({"n": noise, "again": noise})
    with pytest.raises(StudyCombineError, match="iterations 1 in n, 2 here"):
        combine_reports({"n": noise, "f": unfinished})
    with pytest.raises(StudyCombineError, match="has 1 of 2 iterations"):
        combine_reports({"f": unfinished, "n": {**noise, "options": {**noise["options"], "iterations": 2}}})
    with pytest.raises(StudyCombineError, match=r"no study\.json"):
        read_part(tmp_path / "missing")


def test_combined_wall_time_counts_overlap_once() -> None:
    from emili_pipeline.study_combine import _span

    def part(run_id: str, wall_s: float) -> dict[str, Any]:
        return {"options": {"run_id": run_id}, "wall_s": wall_s}

    together = [part("20261203T000000Z", 3600.0), part("20261203T000010Z", 3000.0)]
    apart = [part("20261203T000000Z", 600.0), part("20261203T010000Z", 600.0)]
    assert _span(together) == 3600.0 and _span(apart) == 1200.0
