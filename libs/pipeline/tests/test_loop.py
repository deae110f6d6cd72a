"""The loop's scheduler against real Redis (its lease) and S3 (its state), with the pipeline and the gateway
faked: one instance acts at a time; a restart at any point carries on without starting a second candidate; a
candidate that fails the gate is never given to a canary; a passed one is, and the decision closes the round."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import yaml

from emili_core.keys import model_withdrawal_key, pipeline_state_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_pipeline.config import PipelineConfig
from emili_pipeline.gate import VERDICT_HEADING, Evidence
from emili_pipeline.loop import (
    NO_CANARY,
    NO_CANDIDATE,
    STATE_KEY,
    WAITING,
    CanaryRefused,
    Loop,
    LoopPolicy,
    NoStudyForCanary,
    RedisLease,
)
from emili_pipeline.pipeline import new_state
from emili_session.loop_records import gate_key

pytestmark = pytest.mark.integration

GOOD = {
    "diff_epitome_mean": Evidence([0.5] * 40, [0.6] * 40, paired=True),
    "mmlu_correct": Evidence([1.0, 0.0] * 60, [1.0, 0.0] * 60, paired=True),
    "reply_words": Evidence([20.0] * 40),
    "delta_v": Evidence([0.3, 0.4] * 10, [0.1, 0.2] * 10),  # A clear gain: the gate requires one.
    "negative_reaction": Evidence([0.0, 1.0, 0.0] * 400, [0.0, 1.0, 0.0] * 400),
    "negative_reaction_rate": Evidence([0.0, 0.5] * 20, [0.0, 0.5] * 20, paired=True),
    # The training users' faces predicted their surveys (the shipped gate asks for it first).
    "reaction_predicts_delta_v": Evidence(
        [float(i) for i in range(40)], [0.01 * i for i in range(40)], paired=True, covariate=[0.0, 0.5] * 20
    ),
}
BAD = {**GOOD, "mmlu_correct": Evidence([0.0] * 120, [1.0, 0.0] * 60, paired=True)}


@dataclass
class FakeSystem:
    sessions: list[str]
    evidence: dict[str, Evidence]
    pipelines: list[tuple[str, ...]] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)
    finished: bool = False
    canaries: list[str] = field(default_factory=list)
    canary_productions: list[str | None] = field(default_factory=list)  # What each canary stands in for.
    decision: str = "running"
    outcome: tuple[str, str | None] = ("done", "cand-1")  # Once finished: the pipeline's outcome and candidate.
    refusal: str | None = None  # The gateway refuses every canary, saying this.
    no_study: bool = False  # No study can take a canary now.
    canary_studies: list[Sequence[str] | None] = field(default_factory=list)  # Where each was asked to run.

    def eligible_sessions(self, include_synthetic: bool) -> list[str]:
        return list(self.sessions)

    def start_pipeline(self, session_ids: Sequence[str], baseline: str) -> str:
        self.pipelines.append(tuple(session_ids))
        self.baselines.append(baseline)
        return f"pl-{len(set(self.pipelines))}"

    def pipeline_outcome(self, pipeline_id: str) -> tuple[str, str | None, dict[str, Evidence]]:
        return (*self.outcome, self.evidence) if self.finished else ("running", None, {})

    def start_canary(
        self, candidate: str, production: str, share: float, studies: Sequence[str] | None, synthetic: bool
    ) -> list[str]:
        self.canary_studies.append(studies)
        if self.refusal:
            raise CanaryRefused(self.refusal)
        if self.no_study:
            raise NoStudyForCanary("HTTP 409 no study can take a canary of cand-1 now")
        self.canaries.append(candidate)
        self.canary_productions.append(production)
        return list(studies or ["st-a", "st-b"])

    def canary_outcome(self, candidate: str) -> str:
        return self.decision if self.canaries else "missing"


@pytest.fixture
def store(object_store: ObjectStore) -> ObjectStore:
    object_store.delete(Bucket.MODELS, STATE_KEY)
    return object_store


def make(store: ObjectStore, redis_url: str, system: FakeSystem, owner: str, **policy: object) -> Loop:
    where: dict[str, object] = {"canary_in": "study", "study_id": "st-0123456789ab"}
    options = LoopPolicy.model_validate({"enabled": True, "interval_s": 5, "min_new_sessions": 3} | where | policy)
    return Loop(options, store, RedisLease(redis.Redis.from_url(redis_url)), system, owner)


def test_one_round_restarts_and_a_second_instance(store: ObjectStore, isolated_redis_url: str) -> None:
    system = FakeSystem(sessions=["s1", "s2"], evidence=GOOD)
    second = make(store, isolated_redis_url, system, "second")
    assert second.tick() is not None and second.state().phase == "idle"  # Two sessions: not enough.
    # "second" holds the lease: another instance does nothing until it lapses.
    assert make(store, isolated_redis_url, system, "first").tick() is None
    system.sessions.append("s3")
    assert (second.tick() or pytest.fail()).phase == "training"
    assert system.pipelines == [("s1", "s2", "s3")]

    # A restart (a new process, same owner name after a crash, or another one once the lease lapsed).
    restarted = make(store, isolated_redis_url, system, "second")
    for _ in range(3):
        assert (restarted.tick() or pytest.fail()).phase == "training"
    assert system.pipelines == [("s1", "s2", "s3")]  # Never a second candidate.

    system.finished = True
    assert (restarted.tick() or pytest.fail()).phase == "gating"
    state = restarted.tick() or pytest.fail()
    assert state.phase == "canary" and system.canaries == ["cand-1"]
    assert system.canary_productions == ["base"]  # The canary stands in for what the gate judged it against.
    verdict = store.get_json(Bucket.MODELS, gate_key("cand-1"))
    assert verdict["passed"] and verdict["pipeline_id"] == "pl-1" and verdict["sessions"] == 3

    system.decision = "promoted"
    done = restarted.tick() or pytest.fail()
    assert done.phase == "idle" and done.used_sessions == ["s1", "s2", "s3"]
    assert [h["event"] for h in done.history] == [
        "enough new sessions",
        "pipeline started",
        "candidate trained",
        "gate passed",
        "canary started",
        "canary promoted",
    ]
    # The same sessions never make another candidate.
    assert (restarted.tick() or pytest.fail()).phase == "idle" and len(system.pipelines) == 1
    assert done.production == "cand-1" and system.baselines == ["base"]

    # The next candidate is compared with the promoted version, not with the base model.
    system.sessions += ["s4", "s5", "s6"]
    system.finished = False
    assert (restarted.tick() or pytest.fail()).phase == "training"
    assert system.baselines == ["base", "cand-1"] and restarted.state().history[-1]["baseline"] == "cand-1"
    # Its canary stands in for the promoted version too, so the gate and the canary judge against the same one.
    system.outcome, system.finished, system.decision, system.canaries = ("done", "cand-2"), True, "running", []
    assert (restarted.tick() or pytest.fail()).phase == "gating"
    assert (restarted.tick() or pytest.fail()).phase == "canary"
    assert system.canaries == ["cand-2"] and system.canary_productions == ["base", "cand-1"]


def test_a_stopped_instance_hands_the_lease_over(store: ObjectStore, isolated_redis_url: str) -> None:
    system = FakeSystem(sessions=["a"], evidence=GOOD)
    first, second = (make(store, isolated_redis_url, system, name) for name in ("first", "second"))
    assert first.tick() is not None and second.tick() is None
    second.release()  # Not the holder: nothing changes.
    assert second.tick() is None
    first.release()
    assert second.tick() is not None and first.tick() is None


def test_a_tick_that_outlives_its_lease_writes_nothing(store: ObjectStore, isolated_redis_url: str) -> None:
    """The lease lapses while a tick waits on the pipeline and another instance takes it: the late tick must not
    write its state over the successor's."""
    system = FakeSystem(sessions=["a", "b", "c"], evidence=GOOD)
    slow, successor = (make(store, isolated_redis_url, system, name) for name in ("slow", "successor"))
    client = redis.Redis.from_url(isolated_redis_url)

    def hang_then_start(session_ids: Sequence[str], baseline: str) -> str:
        system.start_pipeline = lambda ids, base: FakeSystem.start_pipeline(system, ids, base)  # type: ignore[method-assign]
        client.delete("emili:loop:lease")  # The lease lapsed meanwhile...
        assert successor.tick() is not None  # ...and the successor acted on the saved "training" state.
        return "pl-late"  # What the late tick learns, after the successor saved its own pipeline.

    system.start_pipeline = hang_then_start  # type: ignore[method-assign]
    assert slow.tick() is None  # Lost its lease mid-tick: reports it did not act.
    state = slow.state()
    # The successor's "pipeline started" stands; the late tick's is not saved over it.
    assert state.phase == "training" and state.pipeline_id == "pl-1"
    assert [h.get("pipeline_id") for h in state.history] == [None, "pl-1"]
    assert client.get("emili:loop:lease") == b"successor"


def test_a_candidate_failing_the_gate_gets_no_canary(store: ObjectStore, isolated_redis_url: str) -> None:
    system = FakeSystem(sessions=["a", "b", "c"], evidence=BAD, finished=True)
    loop = make(store, isolated_redis_url, system, "only")
    phases = [(loop.tick() or pytest.fail()).phase for _ in range(3)]
    assert phases == ["training", "gating", "idle"] and system.canaries == []
    verdict = store.get_json(Bucket.MODELS, gate_key("cand-1"))
    assert not verdict["passed"]
    failed = [c["name"] for c in verdict["checks"] if not c["passed"]]
    assert failed == ["knowledge_kept"]
    assert loop.state().history[-1]["failed_checks"] == ["knowledge_kept"]


@pytest.mark.parametrize(("outcome", "event"), [(("done", None), NO_CANDIDATE), (("failed", None), "pipeline failed")])
def test_a_round_without_a_candidate_is_told_apart_from_a_failed_one(
    store: ObjectStore, isolated_redis_url: str, outcome: tuple[str, str | None], event: str
) -> None:
    system = FakeSystem(sessions=["a", "b", "c"], evidence=GOOD, finished=True, outcome=outcome)
    loop = make(store, isolated_redis_url, system, "only")
    phases = [(loop.tick() or pytest.fail()).phase for _ in range(2)]
    assert phases == ["training", "idle"] and system.canaries == []
    last = loop.state().history[-1]
    assert last["event"] == event and last["pipeline_id"] == "pl-1"
    assert ("why" in last) == (event == NO_CANDIDATE)
    assert "step" not in last  # The failed pipeline left no readable state: the failure is recorded all the same.
    # The sessions count as used: the next round waits for new ones, then trains on all of them.
    assert (loop.tick() or pytest.fail()).phase == "idle" and len(system.pipelines) == 1
    system.sessions += ["d", "e", "f"]
    assert (loop.tick() or pytest.fail()).phase == "training" and system.pipelines[-1] == tuple("abcdef")


def test_a_retired_production_version_is_replaced_without_the_withdrawn_sessions(
    store: ObjectStore, isolated_redis_url: str
) -> None:
    system = FakeSystem(sessions=["a", "b", "c"], evidence=GOOD, finished=True, decision="promoted")
    loop = make(store, isolated_redis_url, system, "only")
    for _ in range(4):
        loop.tick()
    assert loop.state().production == "cand-1" and loop.state().phase == "idle"
    assert (loop.tick() or pytest.fail()).phase == "idle"  # Not retired: no new sessions, nothing to do.

    # The person behind "b" withdraws: the labeler deletes the session and retires the versions that learned from it.
    store.put_json(Bucket.MODELS, model_withdrawal_key("cand-1"), {"version": "cand-1", "retired": True})
    system.sessions.remove("b")
    state = loop.tick() or pytest.fail()
    assert state.phase == "training" and state.production is None
    assert system.pipelines[-1] == ("a", "c") and system.baselines[-1] == "base"  # At once, without new sessions.
    retired, retraining = state.history[-3:-1]
    assert retired["event"] == "production retired" and retired["retired"] == "cand-1"
    assert retired["production"] == "base" and retraining["replaces"] == "cand-1"


def test_a_marked_production_version_is_replaced_without_the_withdrawn_sessions(
    store: ObjectStore, isolated_redis_url: str
) -> None:
    """retention.withdrawn_models: mark keeps the version serving; the loop trains its replacement at once, once per
    withdrawal (a later withdrawal, a newer mark, starts another), unless the policy waits for new sessions."""
    system = FakeSystem(sessions=["a", "b", "c"], evidence=GOOD, finished=True, decision="promoted")
    loop = make(store, isolated_redis_url, system, "only")
    for _ in range(4):
        loop.tick()
    assert loop.state().production == "cand-1" and len(system.pipelines) == 1

    mark = {"version": "cand-1", "withdrawn_sessions": ["b"], "withdrawn_ms": 10, "updated_ms": 10, "retired": False}
    store.put_json(Bucket.MODELS, model_withdrawal_key("cand-1"), mark)
    system.sessions.remove("b")
    state = loop.tick() or pytest.fail()
    assert state.phase == "training" and state.production == "cand-1"  # Still serving until a replacement wins.
    assert system.pipelines[-1] == ("a", "c") and system.baselines[-1] == "cand-1"
    assert state.history[-2]["event"] == "retraining without the withdrawn sessions"
    system.decision = "rolled_back"  # The replacement is not promoted: the marked version goes on serving.
    for _ in range(3):
        loop.tick()
    assert loop.state().phase == "idle" and (loop.tick() or pytest.fail()).phase == "idle"  # Once per mark.
    assert len(system.pipelines) == 2

    store.put_json(Bucket.MODELS, model_withdrawal_key("cand-1"), mark | {"updated_ms": 15})  # Rewritten, nothing new.
    assert (loop.tick() or pytest.fail()).phase == "idle" and len(system.pipelines) == 2
    store.put_json(
        Bucket.MODELS, model_withdrawal_key("cand-1"), mark | {"withdrawn_sessions": ["b", "c"]} | {"updated_ms": 20}
    )
    system.sessions.remove("c")
    assert (loop.tick() or pytest.fail()).phase == "training" and system.pipelines[-1] == ("a",)

    waits = make(store, isolated_redis_url, system, "only", retrain_on_withdrawal=False)
    state = waits.state()
    state.phase, state.retrained_for = "idle", []
    store.put_json(Bucket.MODELS, STATE_KEY, state.model_dump(mode="json"))
    assert (waits.tick() or pytest.fail()).phase == "idle" and len(system.pipelines) == 3


def test_a_candidate_retired_during_its_canary_is_replaced_without_the_withdrawn_sessions(
    store: ObjectStore, isolated_redis_url: str
) -> None:
    """The person behind "b" withdraws while cand-1's canary runs: the gateway rolls it back (retired), and the loop
    trains its replacement at once, once, on the sessions that remain; a candidate the gate rejected is not."""
    system = FakeSystem(sessions=["a", "b", "c"], evidence=GOOD, finished=True)
    loop = make(store, isolated_redis_url, system, "only")
    assert [(loop.tick() or pytest.fail()).phase for _ in range(3)] == ["training", "gating", "canary"]
    store.put_json(Bucket.MODELS, model_withdrawal_key("cand-1"), {"version": "cand-1", "retired": True})
    system.sessions.remove("b")
    system.decision = "rolled_back"
    assert (loop.tick() or pytest.fail()).phase == "idle"
    state = loop.tick() or pytest.fail()
    assert state.phase == "training" and state.production is None
    assert system.pipelines[-1] == ("a", "c") and system.baselines[-1] == "base"
    assert state.history[-2]["event"] == "retraining without the withdrawn sessions"
    assert state.history[-2]["replaces"] == "cand-1"

    # Its replacement fails the gate and is retired too: no second retrain (the withdrawal did not end its round).
    system.outcome, system.evidence = ("done", "cand-2"), BAD
    assert [(loop.tick() or pytest.fail()).phase for _ in range(2)] == ["gating", "idle"]
    store.put_json(Bucket.MODELS, model_withdrawal_key("cand-2"), {"version": "cand-2", "retired": True})
    assert (loop.tick() or pytest.fail()).phase == "idle" and len(system.pipelines) == 2


def test_a_stop_before_the_canary_started_starts_it_on_restart(store: ObjectStore, isolated_redis_url: str) -> None:
    system = FakeSystem(sessions=["a", "b", "c"], evidence=GOOD, finished=True)
    loop = make(store, isolated_redis_url, system, "only")
    loop.tick()
    assert (loop.tick() or pytest.fail()).phase == "gating" and system.canaries == []
    # As if the process had died right after saving "gate passed": the canary never started.
    state = loop.state()
    state.phase = "canary"
    store.put_json(Bucket.MODELS, STATE_KEY, state.model_dump(mode="json"))
    assert (loop.tick() or pytest.fail()).history[-1]["event"] == "canary started" and system.canaries == ["cand-1"]


def test_a_refused_canary_ends_the_round(store: ObjectStore, isolated_redis_url: str) -> None:
    """E.g. the candidate was retired while it was evaluated: asking again would be refused again, so the round
    ends, saying why, and new sessions start the next one (it had stalled in "canary" for good)."""
    system = FakeSystem(sessions=["a", "b", "c"], evidence=GOOD, finished=True, refusal="HTTP 409 cand-1 was retired")
    loop = make(store, isolated_redis_url, system, "only")
    phases = [(loop.tick() or pytest.fail()).phase for _ in range(3)]
    assert phases == ["training", "gating", "idle"] and system.canaries == []
    last = loop.state().history[-1]
    assert last["event"] == "canary refused" and "retired" in last["why"] and last["candidate"] == "cand-1"
    system.sessions += ["d", "e", "f"]
    system.refusal = None
    assert (loop.tick() or pytest.fail()).phase == "training" and len(system.pipelines) == 2


def test_the_canary_runs_in_every_study_and_waits_while_none_can_take_it(
    store: ObjectStore, isolated_redis_url: str
) -> None:
    """The shipped default (``canary_in: running_studies``): the gateway is asked for every study the production
    version serves; while none can take the canary, the candidate waits (recorded once) and is asked again each tick."""
    system = FakeSystem(sessions=["a", "b", "c"], evidence=GOOD, finished=True, no_study=True)
    loop = make(store, isolated_redis_url, system, "only", canary_in="running_studies", study_id="")
    phases = [(loop.tick() or pytest.fail()).phase for _ in range(4)]
    assert phases == ["training", "gating", "canary", "canary"] and system.canary_studies == [None, None]
    waited = [h for h in loop.state().history if h["event"] == WAITING]
    assert len(waited) == 1 and "no study can take" in waited[0]["why"]
    system.no_study = False
    state = loop.tick() or pytest.fail()
    assert state.history[-1]["event"] == "canary started" and state.history[-1]["studies"] == ["st-a", "st-b"]
    system.decision = "promoted"
    assert (loop.tick() or pytest.fail()).production == "cand-1"


def test_a_waiting_canary_gives_up_when_production_is_retired_or_after_its_maximum_wait(
    store: ObjectStore, isolated_redis_url: str
) -> None:
    system = FakeSystem(sessions=["a", "b", "c"], evidence=GOOD, finished=True, no_study=True)
    loop = make(store, isolated_redis_url, system, "only", canary_in="running_studies", max_canary_wait_s=0.05)
    assert [(loop.tick() or pytest.fail()).phase for _ in range(3)] == ["training", "gating", "canary"]
    time.sleep(0.1)
    state = loop.tick() or pytest.fail()
    assert state.phase == "idle" and state.history[-1]["event"] == "canary refused"
    assert "no study took its canary" in state.history[-1]["why"]

    # Production was retired (people it learned from withdrew) while the next candidate waited: the round ends, and
    # the idle loop goes back to the policy's production arm.
    state.production, state.phase, state.candidate = "cand-0", "canary", "cand-1"
    store.put_json(Bucket.MODELS, STATE_KEY, state.model_dump(mode="json"))
    mark = {"version": "cand-0", "withdrawn_sessions": ["a"], "withdrawn_ms": 1, "updated_ms": 1, "retired": True}
    store.put_json(Bucket.MODELS, model_withdrawal_key("cand-0"), mark)
    try:
        ended = loop.tick() or pytest.fail()
        assert ended.phase == "idle" and "cand-0" in ended.history[-1]["why"] and "retired" in ended.history[-1]["why"]
        events = [h["event"] for h in (loop.tick() or pytest.fail()).history[-3:]]
        assert events == ["production retired", "retraining without the withdrawn sessions", "pipeline started"]
    finally:
        store.delete(Bucket.MODELS, model_withdrawal_key("cand-0"))


def test_where_the_canary_runs_by_default() -> None:
    """A policy naming a study meant its canary ran there before canaries spanned studies; it still does."""
    assert LoopPolicy().canary_in == "running_studies" and LoopPolicy().canary_studies() is None
    assert LoopPolicy(study_id="st-mine").canary_in == "study"
    assert LoopPolicy(study_id="st-mine").canary_studies() == ["st-mine"]
    assert LoopPolicy(study_id="st-mine", canary_in="running_studies").canary_studies() is None


@pytest.mark.parametrize(
    ("where", "why"), [({"canary_in": "none"}, "canary_in: none"), ({"study_id": ""}, "no study_id")]
)
def test_without_a_canary_a_passed_candidate_stops_at_the_gate(
    store: ObjectStore, isolated_redis_url: str, where: dict[str, str], why: str
) -> None:
    system = FakeSystem(sessions=["a", "b", "c"], evidence=GOOD, finished=True)
    loop = make(store, isolated_redis_url, system, "only", **where)
    assert [(loop.tick() or pytest.fail()).phase for _ in range(3)] == ["training", "gating", "idle"]
    last = loop.state().history[-1]
    assert last["event"] == NO_CANARY and why in last["why"] and system.canary_studies == []


def test_the_verdict_goes_into_the_candidates_evaluation_report(store: ObjectStore, isolated_redis_url: str) -> None:
    pipeline_id = f"pl-report-{secrets.token_hex(4)}"
    prefix = f"evaluations/ev-{pipeline_id}/report"
    evaluated = {"state": "done", "outputs": {"report_prefix": prefix}}
    store.put_json(Bucket.MODELS, pipeline_state_key(pipeline_id), {"steps": {"evaluate": evaluated}})
    store.put_json(Bucket.MODELS, f"{prefix}/report.json", {"title": "Evaluation"})
    store.put_bytes(Bucket.MODELS, f"{prefix}/report.md", b"# Evaluation\n\nTable 1\n")
    system = FakeSystem(sessions=["a", "b", "c"], evidence=BAD, finished=True)
    system.start_pipeline = lambda ids, baseline: pipeline_id  # type: ignore[method-assign]
    loop = make(store, isolated_redis_url, system, "only")
    assert [(loop.tick() or pytest.fail()).phase for _ in range(3)] == ["training", "gating", "idle"]

    markdown = store.get_bytes(Bucket.MODELS, f"{prefix}/report.md").decode()
    assert markdown.startswith("# Evaluation\n\nTable 1\n\n" + VERDICT_HEADING)
    assert f"Candidate cand-1 failed gate 'default' (pipeline {pipeline_id}, 3 sessions)" in markdown
    assert "| knowledge_kept | mmlu_correct | non_inferior | 120 |" in markdown and "**failed**" in markdown
    assert "| reply_length_sane | reply_words | within | 40 | 20 (mean) | n/a | - | 30 | passed |" in markdown
    report = store.get_json(Bucket.MODELS, f"{prefix}/report.json")
    stored = store.get_json(Bucket.MODELS, gate_key("cand-1"))
    assert report["title"] == "Evaluation" and report["gate_verdict"] == stored

    # Judged again (a restart between the verdict and the next state): the section is replaced, not repeated.
    loop._verdict_into_report(pipeline_id, {**report["gate_verdict"], "policy": "again"})
    markdown = store.get_bytes(Bucket.MODELS, f"{prefix}/report.md").decode()
    assert markdown.count(VERDICT_HEADING) == 1 and "failed gate 'again'" in markdown


def test_unreadable_evidence_fails_the_gate(store: ObjectStore, isolated_redis_url: str) -> None:
    """Evidence the gate cannot read fails it (recorded, never served) instead of stalling the loop in "gating"."""
    malformed = {**GOOD, "delta_v": Evidence([0.3] * 20, [0.1] * 19, paired=True)}
    system = FakeSystem(sessions=["a", "b", "c"], evidence=malformed, finished=True)
    loop = make(store, isolated_redis_url, system, "only")
    phases = [(loop.tick() or pytest.fail()).phase for _ in range(3)]
    assert phases == ["training", "gating", "idle"] and system.canaries == []
    verdict = store.get_json(Bucket.MODELS, gate_key("cand-1"))
    assert not verdict["passed"] and all("unreadable evidence" in c["reason"] for c in verdict["checks"])
    assert loop.state().history[-1]["event"] == "gate failed"


def test_the_policy_file(tmp_path: Path) -> None:
    from emili_pipeline.loop import load_loop_policy

    path = tmp_path / "loop.yaml"
    path.write_text("loop:\n  enabled: true\n  min_new_sessions: 20\n")
    assert load_loop_policy(path).min_new_sessions == 20
    path.write_text("loop:\n  min_new_sesions: 20\n")
    with pytest.raises(ValueError, match="min_new_sesions"):
        load_loop_policy(path)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The cluster's loop ConfigMap: its policy and pipeline config, as files.
CLUSTER_LOOP_CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "k8s" / "components" / "loop" / "config.yaml"


@pytest.mark.parametrize("policy", ["loop-policy.yaml", "loop-demo-policy.yaml", "loop-demo-canary-policy.yaml"])
def test_each_shipped_policys_pipeline_can_give_its_gate_enough_evidence(policy: str) -> None:
    """A check its pipeline can never give min_n items fails every candidate, so the loop would never promote
    (the shipped loop.yaml once gave 1 user per arm against a gate that needs 10)."""
    from emili_pipeline.loop_cli import load_policy, warn_undersized

    assert warn_undersized(load_policy(CONFIGS / policy)) == []


def test_an_undersized_pipeline_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from emili_pipeline.config import load_config
    from emili_pipeline.loop import evidence_ceiling
    from emili_pipeline.loop_cli import load_policy, warn_undersized

    small = tmp_path / "small.yaml"
    small.write_text((CONFIGS / "loop.yaml").read_text().replace("users_per_arm: 100", "users_per_arm: 1"))
    assert evidence_ceiling(load_config(small)) == {
        "delta_v": 1,
        "reaction": 1,
        "negative_reaction_rate": 1,
        "negative_reaction": 3,  # One per turn.
        "diff_epitome_mean": 60,  # Held-out and EmpatheticDialogues contexts, max_examples each.
        "reply_words": 60,
    }
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"loop:\n  pipeline: {small}\n")
    with caplog.at_level("WARNING", logger="emili_pipeline.loop"):
        problems = warn_undersized(load_policy(policy))
    assert [p.split(":")[0] for p in problems] == [
        "gate default, check delta_v_gain",
        "gate default, check delta_v_not_worse",
        "gate default, check no_more_negative_reactions",
    ]
    assert "needs 30 negative_reaction_rate items per arm, and pipeline loop gives at most 1" in problems[2]
    assert "every candidate will fail it" in caplog.text


def test_a_threshold_below_the_users_the_signal_check_needs_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from emili_pipeline.loop_cli import load_policy, warn_undersized

    policy = tmp_path / "policy.yaml"
    policy.write_text(f"loop:\n  pipeline: {CONFIGS / 'loop.yaml'}\n  min_new_sessions: 12\n")
    with caplog.at_level("WARNING", logger="emili_pipeline.loop"):
        assert warn_undersized(load_policy(policy)) == []  # Not a check that every candidate fails.
    assert "check feedback_predicts_surveys: needs 30 users" in caplog.text
    assert "once 12 new sessions exist" in caplog.text and "the first candidates may fail it" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="emili_pipeline.loop"):
        warn_undersized(load_policy(CONFIGS / "loop-policy.yaml"))  # 50 sessions: enough.
    assert "feedback_predicts_surveys" not in caplog.text


def test_the_clusters_loop_config_can_give_its_gate_enough_evidence(tmp_path: Path) -> None:
    from emili_pipeline.loop_cli import load_policy, warn_undersized

    files = yaml.safe_load(CLUSTER_LOOP_CONFIG.read_text())["data"]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert warn_undersized(load_policy(tmp_path / "loop-policy.yaml")) == []


def test_the_clusters_loop_trains_by_the_local_loops_rules() -> None:
    """The cluster's pipeline config is a copy inside a ConfigMap; what it trains on must not drift from loop.yaml's."""
    from emili_pipeline.config import PipelineConfig, load_config

    pipeline_text = yaml.safe_load(CLUSTER_LOOP_CONFIG.read_text())["data"]["pipeline.yaml"]
    cluster = PipelineConfig.model_validate(yaml.safe_load(pipeline_text))
    local = load_config(CONFIGS / "loop.yaml")
    rules = (
        "recipes",
        "dpo_source",
        "sft_source",
        "sft_delta_share",
        "cut_replies",
        "pairs_per_context",
        "heldout_share",
    )
    assert {rule: getattr(cluster, rule) for rule in rules} == {rule: getattr(local, rule) for rule in rules}


def test_a_policy_whose_pipeline_is_missing_is_refused_at_start(tmp_path: Path) -> None:
    import typer

    from emili_pipeline.loop_cli import load_policy, warn_undersized

    policy = tmp_path / "policy.yaml"
    policy.write_text("loop:\n  pipeline: no-such-pipeline.yaml\n")
    with pytest.raises(typer.BadParameter, match=r"no-such-pipeline\.yaml"):
        warn_undersized(load_policy(policy))


def test_a_failed_round_says_which_step_failed_and_why(store: ObjectStore, isolated_redis_url: str) -> None:
    system = FakeSystem(sessions=["a", "b", "c"], evidence=GOOD, finished=True, outcome=("failed", None))
    loop = make(store, isolated_redis_url, system, "only")
    assert (loop.tick() or pytest.fail()).phase == "training"
    failed = new_state(PipelineConfig(), ["a", "b", "c"])
    failed["steps"]["dpo"].update(state="failed", error="FailedPrecondition: none of the 4 DPO pairs fits " + "x" * 900)
    store.put_json(Bucket.MODELS, pipeline_state_key("pl-1"), failed)
    assert (loop.tick() or pytest.fail()).phase == "idle"
    last = loop.state().history[-1]
    assert last["event"] == "pipeline failed" and last["step"] == "dpo"
    assert last["error"].startswith("FailedPrecondition: none of the 4 DPO pairs") and len(last["error"]) == 400
