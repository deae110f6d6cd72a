"""The loop's real actions against real S3 and a real Redis broker: which recorded sessions a candidate may learn
from, a pipeline started once however often it is asked for, its outcome read from its stored state, and how the
canary client reads the gateway's answers (a stand-in transport: this library never imports the gateway;
tests/test_loop_canary_gateway.py runs the canary calls against the real one)."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from emili_core.deletion import write_tombstone
from emili_core.keys import pipeline_prefix
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import CommonSettings, S3Settings
from emili_core.tasks import create_celery_app, message_held
from emili_pipeline.loop import CanaryRefused, LoopPolicy, NoStudyForCanary, load_loop_policy
from emili_pipeline.loop_actions import GatewayError, SystemActions, eligible_session_ids
from emili_pipeline.orchestrate import Watcher, cancel, submit
from emili_pipeline.pipeline import DONE, FAILED, Superseded, load_state, run_step, save_state
from emili_testing.records import record_ended_session

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def own_s3(s3_settings: S3Settings) -> S3Settings:
    """Buckets of these tests' own (the test server's others hold other tests' sessions)."""
    return s3_settings.model_copy(update={"bucket_prefix": "loop-actions-"})


@pytest.fixture
def store(own_s3: S3Settings) -> ObjectStore:
    store = ObjectStore(own_s3)
    store.ensure_buckets()
    return store


@pytest.fixture
def empty_store(s3_settings: S3Settings) -> ObjectStore:
    """Buckets of one test's own, for checks that count every session stored."""
    store = ObjectStore(s3_settings.model_copy(update={"bucket_prefix": f"loop-{secrets.token_hex(4)}-"}))
    store.ensure_buckets()
    return store


@pytest.fixture
def actions(store: ObjectStore, own_s3: S3Settings, isolated_redis_url: str) -> SystemActions:
    settings = CommonSettings(redis_url=isolated_redis_url, s3=own_s3)
    return SystemActions(store, create_celery_app("pipeline", settings), CONFIGS / "ci.yaml")


def test_eligible_sessions(store: ObjectStore) -> None:
    record_ended_session(store, "ok-1")
    record_ended_session(store, "ok-2")
    record_ended_session(store, "live", state="active")  # Not ended: its record may still grow.
    record_ended_session(store, "no-consent", use_for_training=False)
    record_ended_session(store, "simulated", synthetic=True)
    record_ended_session(store, "withdrawn")
    write_tombstone(store, "withdrawn")  # A withdrawal's deletion writes the tombstone first.
    # Abandoned before the post-chat survey (no gold Δv), or before any reply (no turn to flag): no label.
    record_ended_session(store, "abandoned", counts={"pre_survey": 1, "user_message": 1, "assistant_message": 1})
    record_ended_session(store, "no-reply", counts={"pre_survey": 1, "post_survey": 1})
    assert eligible_session_ids(store, include_synthetic=False) == ["ok-1", "ok-2"]
    assert eligible_session_ids(store, include_synthetic=True) == ["ok-1", "ok-2", "simulated"]


def test_a_pipelines_own_simulated_users_are_never_eligible(empty_store: ObjectStore) -> None:
    record_ended_session(empty_store, "person")
    # A simulation study's participant: eligible when allowed.
    record_ended_session(empty_store, "participant", synthetic=True)
    record_ended_session(empty_store, "eval-base", synthetic=True)
    record_ended_session(empty_store, "eval-sft", synthetic=True)
    kept = {"arms": {"base": ["eval-base"], "sft": ["eval-sft"]}, "versions": {"base": "base", "sft": "v-1"}}
    empty_store.put_json(Bucket.MODELS, f"{pipeline_prefix('pl-1234abcd')}arm_sessions.json", kept)
    empty_store.put_json(Bucket.MODELS, f"{pipeline_prefix('pl-empty')}arm_sessions.json", {"arms": {}})
    assert eligible_session_ids(empty_store, include_synthetic=True) == ["participant", "person"]
    assert eligible_session_ids(empty_store, include_synthetic=False) == ["person"]


def test_simulated_users_of_an_unfinished_evaluation_are_never_eligible(empty_store: ObjectStore) -> None:
    """The step names its users before the first starts; it lists their sessions only once all have finished, so a
    step still running (or one that died midway) has ended sessions known only by their user."""
    record_ended_session(empty_store, "participant", synthetic=True, user_id="p-1")
    record_ended_session(empty_store, "eval-done", synthetic=True, user_id="base-1234abcd-1000-0")
    record_ended_session(empty_store, "eval-running", synthetic=True, user_id="base-1234abcd-1000-1")
    users = {"users": ["base-1234abcd-1000-0", "base-1234abcd-1000-1", "sft-1234abcd-1000-0"]}
    empty_store.put_json(Bucket.MODELS, f"{pipeline_prefix('pl-1234abcd')}arm_users.json", users)
    assert eligible_session_ids(empty_store, include_synthetic=True) == ["participant"]


def test_eligible_sessions_of_one_study(empty_store: ObjectStore) -> None:
    for session_id in ("mine-1", "mine-2", "other", "loose", "mine-eval"):
        record_ended_session(empty_store, session_id, synthetic=True)
    for study_id, session_id in [("st-mine", "mine-1"), ("st-mine", "mine-2"), ("st-other", "other")]:
        empty_store.put_json(Bucket.SESSIONS, f"studies/{study_id}/sessions/{session_id}.json", {"study_id": study_id})
    empty_store.put_json(Bucket.SESSIONS, "studies/st-mine/sessions/mine-eval.json", {"study_id": "st-mine"})
    empty_store.put_json(
        Bucket.MODELS, f"{pipeline_prefix('pl-x')}arm_sessions.json", {"arms": {"base": ["mine-eval"]}}
    )
    assert eligible_session_ids(empty_store, True, "st-mine") == ["mine-1", "mine-2"]
    assert eligible_session_ids(empty_store, True, "st-none") == []
    assert eligible_session_ids(empty_store, True, "") == []  # `sessions_from: study` with no study yet: nothing.
    assert eligible_session_ids(empty_store, True) == ["loose", "mine-1", "mine-2", "other"]


def test_the_policy_names_the_study_sessions_come_from(empty_store: ObjectStore) -> None:
    assert LoopPolicy(study_id="st-mine").sessions_study() is None  # Today's behaviour: every session.
    assert LoopPolicy(study_id="st-mine", sessions_from="study").sessions_study() == "st-mine"
    assert load_loop_policy(CONFIGS / "loop-policy.yaml").sessions_from == "all"
    assert load_loop_policy(CONFIGS / "loop-demo-policy.yaml").sessions_from == "study"
    actions = SystemActions(empty_store, None, CONFIGS / "ci.yaml", study_id="st-mine")
    record_ended_session(empty_store, "mine", synthetic=True)
    record_ended_session(empty_store, "other", synthetic=True)
    empty_store.put_json(Bucket.SESSIONS, "studies/st-mine/sessions/mine.json", {"study_id": "st-mine"})
    assert actions.eligible_sessions(include_synthetic=True) == ["mine"]


def test_study_sessions_follow_the_gateways_studies_prefix(
    empty_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emili_core.settings import service_settings_classes
    from emili_pipeline.loop_cli import LoopSettings, gateway_studies_prefix
    from emili_session.loop_records import STUDIES_PREFIX

    record_ended_session(empty_store, "mine", synthetic=True)
    empty_store.put_json(Bucket.SESSIONS, "trial-2/st-mine/sessions/mine.json", {"study_id": "st-mine"})
    moved = SystemActions(empty_store, None, CONFIGS / "ci.yaml", study_id="st-mine", studies_prefix="trial-2")
    assert moved.eligible_sessions(include_synthetic=True) == ["mine"]
    default = SystemActions(empty_store, None, CONFIGS / "ci.yaml", study_id="st-mine")
    assert default.eligible_sessions(include_synthetic=True) == []
    monkeypatch.setenv("EMILI_LOOP_GATEWAY_STUDIES_PREFIX", "trial-3")
    assert gateway_studies_prefix(LoopSettings()) == "trial-3"
    monkeypatch.setenv("EMILI_LOOP_GATEWAY_STUDIES_PREFIX", "trial/")  # Would match no session: refused at start.
    with pytest.raises(ValueError, match="loop_gateway_studies_prefix"):
        LoopSettings()
    monkeypatch.delenv("EMILI_LOOP_GATEWAY_STUDIES_PREFIX")
    # Unset, the loop takes the gateway's own setting where the gateway is installed (the local stack).
    monkeypatch.setenv("EMILI_GATEWAY__STUDIES__PREFIX", "trial-2")
    expected = "trial-2" if "gateway" in service_settings_classes() else STUDIES_PREFIX
    assert gateway_studies_prefix(LoopSettings()) == expected


def test_a_pipeline_starts_once(actions: SystemActions, store: ObjectStore, isolated_redis_url: str) -> None:
    broker = redis.Redis.from_url(isolated_redis_url)
    first = actions.start_pipeline(["b", "a", "c"], "base")
    # Asked again (a restart): the same id, and no second chain on the collect step's queue.
    assert actions.start_pipeline(["a", "b", "c"], "base") == first
    assert broker.llen("chat") == 1
    state = load_state(store, first)
    assert state["sessions"] == ["a", "b", "c"] and state["attempt"] == 1
    assert state["collected"]["source"] == "recorded sessions"
    assert actions.pipeline_outcome(first) == ("running", None, {})

    # After a promotion the next candidate is compared with the promoted version: another pipeline.
    other = actions.start_pipeline(["a", "b", "c"], "v-promoted")
    assert other != first and load_state(store, other)["config"]["baseline"] == "v-promoted"
    assert broker.llen("chat") == 2


def test_a_saved_but_unsent_pipeline_is_sent(
    actions: SystemActions, store: ObjectStore, isolated_redis_url: str
) -> None:
    state = actions.pipeline_state(["x", "y"], "base")
    save_state(store, state)  # As if the process had died before submitting it.
    assert actions.start_pipeline(["x", "y"], "base") == state["pipeline_id"]
    assert redis.Redis.from_url(isolated_redis_url).llen("chat") == 1


def test_a_queued_step_whose_message_was_lost_is_resubmitted(
    actions: SystemActions, store: ObjectStore, own_s3: S3Settings, isolated_redis_url: str
) -> None:
    broker = redis.Redis.from_url(isolated_redis_url)
    pipeline = actions.start_pipeline(["m", "n"], "base")
    watcher = Watcher(actions.celery, store, load_state(store, pipeline), ping_every_s=0.0)
    # Waiting on its queue, then delivered to a consumer that has not acknowledged it: held both times.
    for _ in range(4):
        assert watcher.poll()[1] == "running" and not watcher.resubmissions
    # The chain's first message names the later steps' ids too; a later chat step's message is not sent yet.
    tasks = load_state(store, pipeline)["tasks"]
    assert tasks["arm_sessions"].encode() in broker.lindex("chat", 0)
    assert message_held(broker, "chat", tasks["collect"]) and not message_held(broker, "chat", tasks["arm_sessions"])
    chat_worker = create_celery_app("chat", CommonSettings(redis_url=isolated_redis_url, s3=own_s3))
    with chat_worker.connection_for_read() as connection:
        message = connection.default_channel.basic_get("chat", no_ack=False)
        assert message is not None and broker.llen("chat") == 0 and broker.hlen("unacked:chat") == 1
        for _ in range(4):
            assert watcher.poll()[1] == "running" and not watcher.resubmissions
        message.ack()
    # Gone from the broker (as after a Redis restored from an older copy): nothing would ever run the step.
    # Several looks first: a consumer takes a message off its list a moment before it records it as unacknowledged.
    for _ in range(watcher.missed_pings_allowed - 1):
        watcher.poll()
    assert not watcher.resubmissions
    watcher.poll()
    assert [(r["step"], r["why"]) for r in watcher.resubmissions] == [("collect", "its queued message was lost")]
    state = load_state(store, pipeline)
    assert state["attempt"] == 2 and broker.llen("chat") == 1
    assert json.loads(broker.lindex("chat", 0))["headers"]["id"] == state["tasks"]["collect"]
    # The new message is held: no second resubmission.
    for _ in range(4):
        watcher.poll()
    assert len(watcher.resubmissions) == 1

    # Lost again and again (e.g. a worker discarding it): a few more tries, then the step fails and says why.
    status = "running"
    for _ in range(40):
        broker.delete("chat")
        views, status = watcher.poll()
        if status != "running":
            break
    assert status == "failed" and len(watcher.resubmissions) == watcher.lost_resubmissions_allowed
    assert "its message was lost 4 times: see the chat workers' logs" in views[0].detail
    assert load_state(store, pipeline)["steps"]["collect"]["state"] == FAILED
    assert actions.pipeline_outcome(pipeline)[0] == "failed"


def test_a_message_a_busy_worker_may_hold_is_not_taken_for_lost(
    actions: SystemActions, store: ObjectStore, own_s3: S3Settings, isolated_redis_url: str
) -> None:
    """A busy worker may have popped a message it has not read yet (kombu keeps a paused BRPOP's reply until the
    worker has room): in neither the queue nor the unacked hash, yet not lost. Only once the queue's consumers
    are idle is a message in neither place taken for lost."""
    from celery.contrib.testing.worker import start_worker

    broker = redis.Redis.from_url(isolated_redis_url)
    pipeline = actions.start_pipeline(["b1", "b2"], "base")
    broker.delete("chat")
    watcher = Watcher(actions.celery, store, load_state(store, pipeline), ping_every_s=0.0)

    chat_worker = create_celery_app("chat", CommonSettings(redis_url=isolated_redis_url, s3=own_s3))
    chat_worker.conf.task_routes = ()  # The test's own task: sent to the chat queue by name, not through the table.
    release = threading.Event()

    @chat_worker.task(name="tests.hold_the_chat_worker", acks_late=True)  # Holds its worker's one slot while it runs.
    def hold_the_chat_worker() -> None:
        release.wait(60)

    try:
        with start_worker(chat_worker, concurrency=1, pool="threads", perform_ping_check=False, shutdown_timeout=10):
            busy = hold_the_chat_worker.apply_async(queue="chat")
            deadline = time.monotonic() + 30
            while busy.state != "STARTED" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert busy.state == "STARTED"
            for _ in range(2 * watcher.missed_pings_allowed):
                assert watcher.poll()[1] == "running"
            assert not watcher.resubmissions
            release.set()
            busy.get(timeout=30)
            for _ in range(2 * watcher.missed_pings_allowed):
                watcher.poll()
                if watcher.resubmissions:
                    break
            assert [r["why"] for r in watcher.resubmissions] == ["its queued message was lost"]
    finally:
        release.set()


def test_a_cancelled_pipeline_stops_for_good_until_resumed(
    actions: SystemActions, store: ObjectStore, isolated_redis_url: str
) -> None:
    broker = redis.Redis.from_url(isolated_redis_url)
    pipeline = actions.start_pipeline(["c", "d"], "base")
    submitted = load_state(store, pipeline)
    following = Watcher(actions.celery, store, submitted, ping_every_s=0.0)
    assert following.poll()[1] == "running"

    cancelled, runs = cancel(actions.celery, store, submitted, "wrong sessions")
    assert runs == []  # No step was running (no worker): no training run to cancel.
    stored = load_state(store, pipeline)
    assert stored["attempt"] == 2 and stored["cancelled"]["why"] == "wrong sessions"
    assert {s["state"] for s in stored["steps"].values()} == {FAILED}
    assert stored["steps"]["dpo"]["error"] == "cancelled: wrong sessions"
    assert actions.pipeline_outcome(pipeline)[0] == "cancelled"  # Not done: the loop's round ends, named so.
    # Whoever follows it hears so, and never resubmits it (its message is still queued; revoked ones are dropped by
    # the worker that gets them).
    for _ in range(5):
        views, status = following.poll()
        assert status == "failed" and not following.resubmissions
    assert views[0].detail == "cancelled: wrong sessions"
    # Its message, delivered now or redelivered hours later, stops at once and writes nothing.
    with pytest.raises(Superseded):
        run_step(store, submitted, "collect", lambda s: {})
    assert load_state(store, pipeline)["cancelled"]["why"] == "wrong sessions"

    # A watcher that finds a dead worker or a lost message after the cancel follows it instead of resubmitting.
    late = Watcher(actions.celery, store, submitted)
    assert "cancelled or resubmitted elsewhere" in late._resubmit("collect", "worker w@h died")
    assert not late.resubmissions and load_state(store, pipeline)["attempt"] == 2

    resumed = submit(actions.celery, store, cancelled)
    assert resumed["attempt"] == 3 and "cancelled" not in load_state(store, pipeline)
    assert Watcher(actions.celery, store, resumed, ping_every_s=0.0).poll()[1] == "running"
    assert broker.llen("chat") == 2  # The revoked message and the resumed one.


def finished(
    actions: SystemActions, store: ObjectStore, evaluate: dict[str, Any], failed: str = "", label: Any = None
) -> str:
    state = actions.pipeline_state(["p", "q"], "base")
    for name, step in state["steps"].items():
        step["state"] = FAILED if name == failed else DONE
    state["steps"]["sft"]["outputs"] = {"model_version": "v-sft"}
    state["steps"]["dpo"]["outputs"] = {"model_version": "v-dpo"}
    state["steps"]["evaluate"]["outputs"] = evaluate
    state["steps"]["label"]["outputs"] = label or {}
    save_state(store, state)
    return str(state["pipeline_id"])


def test_pipeline_outcomes(actions: SystemActions, store: ObjectStore) -> None:
    evidence = {"delta_v": {"candidate": [0.1, 0.2], "baseline": [0.0, 0.1], "paired": False}}
    outcome, candidate, found = actions.pipeline_outcome(finished(actions, store, {"gate_evidence": evidence}))
    assert (outcome, candidate) == ("done", "v-dpo")
    assert list(found["delta_v"].candidate) == [0.1, 0.2] and not found["delta_v"].paired
    named = {"candidate": "v-named", "gate_evidence": evidence}
    assert actions.pipeline_outcome(finished(actions, store, named))[1] == "v-named"
    # Malformed evidence is no evidence: the gate then fails the candidate for want of it.
    malformed = {"gate_evidence": {"delta_v": {"baseline": [1]}}}
    assert actions.pipeline_outcome(finished(actions, store, malformed)) == ("done", "v-dpo", {})
    assert actions.pipeline_outcome(finished(actions, store, {}, failed="sft"))[0] == "failed"
    assert actions.pipeline_outcome("pl-0000000000000000")[0] == "failed"
    # What the evaluation could not measure comes with its reason, for the gate to name.
    gaps = {"gate_evidence": evidence, "gate_evidence_missing": {"diff_epitome_mean": "no EPITOME classifiers found"}}
    _, _, found = actions.pipeline_outcome(finished(actions, store, gaps))
    assert (
        found["diff_epitome_mean"].missing == "no EPITOME classifiers found"
        and not found["diff_epitome_mean"].candidate
    )
    assert found["delta_v"].missing is None
    # The label step's evidence is on the pipeline's own sessions (does their feedback predict their surveys?).
    signal = {"reaction_predicts_delta_v": {"candidate": [1.0, 2.0, 3.0], "baseline": [0.1, 0.3, 0.2], "paired": True}}
    with_signal = finished(actions, store, {"gate_evidence": evidence}, label={"gate_evidence": signal})
    _, _, found = actions.pipeline_outcome(with_signal)
    assert set(found) == {"delta_v", "reaction_predicts_delta_v"}
    assert found["reaction_predicts_delta_v"].paired and list(found["reaction_predicts_delta_v"].baseline)[1] == 0.3


def answering(*answers: httpx.Response) -> Callable[[], httpx.Client]:
    """A gateway client whose calls get ``answers`` in turn (a stand-in transport: this library never imports the
    gateway; tests/test_loop_canary_gateway.py runs the same calls against the real one)."""
    queue = list(answers)

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"].startswith("Bearer ")
        return queue.pop(0)

    return lambda: httpx.Client(
        base_url="http://gateway", transport=httpx.MockTransport(answer), headers={"Authorization": "Bearer t"}
    )


def test_canary_answers_the_real_gateway_seldom_gives(actions: SystemActions) -> None:
    """What the real gateway gives only after a monitor's decision, a version skew or an outage."""
    for state in ("running", "promoted", "rolled_back"):
        actions.gateway = answering(httpx.Response(200, json={"candidate": "v2", "state": state}))
        assert actions.canary_outcome("v2") == state
    actions.gateway = answering(httpx.Response(200, json={"candidate": "v2", "state": "paused"}))
    with pytest.raises(GatewayError, match="unknown state 'paused'"):
        actions.canary_outcome("v2")
    actions.gateway = answering(httpx.Response(200, json={"candidate": "v3", "state": "promoted"}))
    with pytest.raises(GatewayError, match="answered for 'v3'"):
        actions.canary_outcome("v2")
    # Only the code means "never started": not the message, and not a proxy's 404 page.
    no_canary = "v2 has had no canary; start one with POST /api/v1/canaries"
    actions.gateway = answering(httpx.Response(404, json={"error": "canary_not_found", "detail": no_canary}))
    assert actions.canary_outcome("v2") == "missing"
    actions.gateway = answering(httpx.Response(404, json={"error": "not_found", "detail": no_canary}))
    with pytest.raises(GatewayError, match="HTTP 404"):
        actions.canary_outcome("v2")
    actions.gateway = answering(httpx.Response(404, text="<html>Not Found</html>"))
    with pytest.raises(GatewayError, match="HTTP 404 <html>Not Found"):
        actions.canary_outcome("v2")

    # A refusal by the gateway itself is final (the loop ends the round); no study able to take it now is a wait; an
    # outage or a proxy's page is neither.
    retired = {"error": "failed_precondition", "detail": "model v2 was retired: people it learned from withdrew"}
    actions.gateway = answering(httpx.Response(409, json=retired))
    with pytest.raises(CanaryRefused, match="HTTP 409 model v2 was retired"):
        actions.start_canary("v2", "base", 0.2, None, False)
    busy = {"error": "no_study_for_canary", "detail": "no study can take a canary of v2 now"}
    actions.gateway = answering(httpx.Response(409, json=busy))
    with pytest.raises(NoStudyForCanary, match="in the running studies: HTTP 409 no study"):
        actions.start_canary("v2", "base", 0.2, None, False)
    for answer in (httpx.Response(503, json={"error": "unavailable", "detail": "redis"}), httpx.Response(404)):
        actions.gateway = answering(answer)
        with pytest.raises(GatewayError) as raised:
            actions.start_canary("v2", "base", 0.2, ["st-0123456789ab"], False)
        assert not isinstance(raised.value, CanaryRefused)

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    actions.gateway = lambda: httpx.Client(base_url="http://gateway", transport=httpx.MockTransport(unreachable))
    with pytest.raises(GatewayError, match="cannot be reached"):
        actions.start_canary("v2", "base", 0.2, None, False)
    actions.gateway = None
    with pytest.raises(GatewayError, match="no gateway"):
        actions.start_canary("v2", "base", 0.2, None, False)


def test_the_commands(
    stack_env: dict[str, str],
    own_s3: S3Settings,
    isolated_redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from emili_pipeline.loop_cli import app, stack_programs, status_rows

    policy = tmp_path / "policy.yaml"
    policy.write_text(f"loop:\n  enabled: false\n  min_new_sessions: 5\n  pipeline: {CONFIGS / 'ci.yaml'}\n")
    monkeypatch.setenv("EMILI_REDIS_URL", isolated_redis_url)
    monkeypatch.setenv("EMILI_S3__BUCKET_PREFIX", own_s3.bucket_prefix)
    monkeypatch.setenv("EMILI_LOOP_POLICY", str(policy))
    runner = CliRunner()
    disabled = runner.invoke(app, ["run"])
    assert disabled.exit_code == 1 and "disabled" in disabled.output
    assert stack_programs(CommonSettings()) == [] and status_rows(CommonSettings())[0][1] == "DISABLED"

    ticked = runner.invoke(app, ["tick"])
    assert ticked.exit_code == 0, ticked.output
    assert json.loads(ticked.stdout)["phase"] == "idle"
    shown = runner.invoke(app, ["status"])
    assert shown.exit_code == 0 and "phase" in shown.output and "idle" in shown.output

    policy.write_text(policy.read_text().replace("enabled: false", "enabled: true"))
    (program,) = stack_programs(CommonSettings())
    assert program.name == "loop" and program.command.endswith(f"emili loop run --policy {policy}")
    # Through the local stack's entry points, as `make up` and `make status` find it.
    from emili_core import cli, stack

    extensions = stack.extension_programs(CommonSettings())
    assert [p.name for p in extensions] == ["loop"]
    assert "[program:loop]" in stack.render_config(extensions)
    # Its metrics are scraped with the services', on a port of its own.
    targets = stack.scrape_targets(CommonSettings(), extensions=extensions)
    (loop_target,) = [t for t in targets if t.service == "loop"]
    assert loop_target.address.endswith(":9106") and loop_target.component == "server"
    assert len({t.address for t in targets}) == len(targets)
    (row,) = cli.extension_status(cli.CliSettings())
    assert row.name == "loop" and row.state == "NOT RUNNING" and "no state yet" in row.detail and not row.ok
