"""Canaries: the decision rule on constructed outcomes, and a canary run through the gateway's API on real Redis,
S3 and chat (scripted model): a share of new participants goes to the candidate, blinded; the monitor promotes a
candidate as good as production (later participants get it) and rolls back a harmful one early."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from emili_affect.stats import msprt_compare
from emili_core.errors import FailedPrecondition, NotFound, PermissionDenied
from emili_core.keys import model_withdrawal_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import S3Settings
from emili_gateway.canary import (
    MAX_LABEL_READS,
    OUTCOMES,
    PRODUCTION_RETIRED_REASON,
    RETIRED_REASON,
    Canary,
    CanaryMonitor,
    decide,
    draw_candidate,
    session_outcomes,
)
from emili_gateway.chat_client import SessionReactions
from emili_gateway.metrics import gateway_metrics
from emili_gateway.models import SessionRecord, Study
from emili_gateway.settings import CanarySettings, GatewaySettings, StudyStoreSettings
from emili_gateway.studies import StudyEngine

from .conftest import (
    Joined,
    MakeClient,
    Servers,
    admin_headers,
    create_invite,
    create_study,
    gateway_settings,
    join,
    register_model_version,
    start_session,
    study_spec,
)

OPTIONS = CanarySettings(max_sessions=30, alpha=0.05, margin=0.25)
NOW = int(time.time() * 1000)


def canary(**changes: Any) -> Canary:
    values: dict[str, Any] = dict(
        study_id="st-000000000000",
        candidate="cand",
        production="base",
        share=0.2,
        started_ms=NOW - 60_000,
        started_by="r",
    )
    return Canary(**(values | changes))


def outcomes(mean_rating: float, n: int, completed: float = 1.0, seed: int = 0) -> dict[str, list[float]]:
    rng = random.Random(seed)
    ratings = [min(5.0, max(1.0, rng.gauss(mean_rating, 0.7))) for _ in range(n)]
    return {"rating": ratings, "completed": [1.0 if rng.random() < completed else 0.0 for _ in range(n)]}


def test_harm_rolls_back_early() -> None:
    looked = decide(OPTIONS, canary(), outcomes(2.0, 12, seed=1), outcomes(4.2, 12, seed=2))
    assert looked.state == "rolled_back" and looked.reason.startswith("harm: the candidate did worse on rating")
    assert looked.looks[0].n_candidate == 12 < OPTIONS.max_sessions  # Before the planned size.
    assert looked.looks[0].difference is not None and looked.looks[0].difference < -1.5


def test_harm_waits_for_the_burn_in() -> None:
    # Two candidate ratings a little lower and all alike: their estimated variance is near 0, so the test alone
    # would call harm (as a demo once did); below min_sessions per arm it is not called, nor remembered.
    production = {"rating": [3.0, 3.0, 3.33, 3.0], "completed": [1.0] * 4}
    tiny = decide(OPTIONS, canary(), {"rating": [2.33, 2.33], "completed": [1.0, 1.0]}, production)
    assert tiny.state == "running" and all(look.p_harm == 1.0 for look in tiny.looks)
    assert tiny.looks[0].difference is not None and tiny.looks[0].difference < 0
    alone = msprt_compare([2.33, 2.33], production["rating"], tau=0.5, alpha=OPTIONS.alpha)
    assert alone.p_harm < OPTIONS.alpha / len(OUTCOMES)


def test_a_canary_planned_smaller_than_the_burn_in_calls_harm_at_its_planned_size() -> None:
    small = CanarySettings(max_sessions=5)
    assert small.min_sessions == 10 and small.rule().harm_burn_in() == 5
    harmed = decide(small, canary(), outcomes(1.5, 5, seed=14), outcomes(4.5, 5, seed=15))
    assert harmed.state == "rolled_back" and harmed.reason.startswith("harm")


def test_as_good_is_promoted_at_the_planned_size_and_not_before() -> None:
    planned = OPTIONS.model_copy(update={"max_sessions": 80})
    early = decide(planned, canary(), outcomes(4.0, 60, seed=3), outcomes(4.0, 60, seed=4))
    assert early.state == "running" and early.reason == ""
    done = decide(planned, early, outcomes(4.1, 80, seed=5), outcomes(4.0, 80, seed=6))
    assert done.state == "promoted" and "within the margin" in done.reason and done.decided_ms


def test_too_uncertain_at_the_planned_size_is_rolled_back() -> None:
    wide = OPTIONS.model_copy(update={"margin": 0.0})  # Must show no loss at all: a tie cannot.
    looked = decide(wide, canary(), outcomes(4.0, 30, seed=7), outcomes(4.0, 30, seed=8))
    assert looked.state == "rolled_back" and looked.reason.startswith("not shown to be as good")


def test_the_running_minimum_of_p_values_is_kept() -> None:
    first = decide(OPTIONS, canary(), outcomes(3.6, 15, seed=9), outcomes(4.2, 15, seed=10))
    p_first = first.looks[0].p_harm
    # A later look with the arms level again cannot forget the evidence already seen.
    second = decide(OPTIONS, first, outcomes(4.2, 20, seed=11), outcomes(4.2, 20, seed=12))
    assert second.looks[0].p_harm <= p_first


def test_draw_candidate_takes_a_share_of_the_production_arm_only() -> None:
    rng = random.Random(0)
    running = canary(share=0.2)
    draws = [draw_candidate(running, "base", rng) for _ in range(5000)]
    assert 0.17 < draws.count("cand") / len(draws) < 0.23
    assert {draw_candidate(running, "other-arm", rng) for _ in range(100)} == {"other-arm"}
    stopped = canary(state="rolled_back")
    assert draw_candidate(stopped, "base", rng) == "base" and draw_candidate(None, "base", rng) == "base"


def test_session_outcomes() -> None:
    def record(i: int, **changes: Any) -> SessionRecord:
        values: dict[str, Any] = dict(
            session_id=f"s{i}",
            study_id="st",
            participant_id=f"p{i}",
            arm="cand",
            created_ms=NOW,
            camera=True,
            store_frames=False,
            use_for_training=True,
        )
        return SessionRecord(**(values | changes))

    records = [
        record(1, state="ended", rated=True, rating={"empathy": 5, "relevance": 4, "fluency": 3}),
        record(2, created_ms=NOW - 10_000, last_activity_ms=NOW - 10_000),  # Abandoned.
        record(3, last_activity_ms=NOW),  # Still going.
        record(4, state="ended", rated=True, rating={"empathy": 1, "relevance": 1, "fluency": 1}, withdrawn=True),
        record(5, state="ended", rated=True, rating={"empathy": 2, "relevance": 2, "fluency": 2}, created_ms=1),
        record(6, arm="base", state="ended", rated=True, rating={"empathy": 3, "relevance": 3, "fluency": 3}),
    ]
    found = session_outcomes(records, "cand", since_ms=NOW - 20_000, idle_before_ms=NOW - 5_000)
    assert found == {"rating": [4.0], "completed": [1.0, 0.0], "delta_v": [], "positive_reaction": []}

    # With labels: every finished session that may be used for training, rated or not; a label without a face
    # reading has no positive-reaction share.
    records += [
        record(7, state="ended"),  # Finished without a rating.
        record(8, state="ended", use_for_training=False),  # Never labelled: the labeler refuses it.
    ]
    reactions = {
        "s1": SessionReactions(0.2, 0.5),
        "s4": SessionReactions(-0.9, 0.0),  # Withdrawn.
        "s7": SessionReactions(-0.1, None),
        "s8": SessionReactions(0.9, 1.0),
    }
    found = session_outcomes(records, "cand", NOW - 20_000, NOW - 5_000, reactions)
    assert found["delta_v"] == [0.2, -0.1] and found["positive_reaction"] == [0.5]


def test_harm_on_a_labelled_outcome_rolls_back() -> None:
    candidate, production = outcomes(4.0, 12, seed=20), outcomes(4.0, 12, seed=21)
    rng = random.Random(22)
    candidate["delta_v"] = [rng.gauss(-0.15, 0.05) for _ in range(12)]
    production["delta_v"] = [rng.gauss(0.1, 0.05) for _ in range(12)]
    looked = decide(OPTIONS, canary(), candidate, production)
    assert looked.state == "rolled_back" and "delta_v" in looked.reason and "rating" not in looked.reason
    assert [look.outcome for look in looked.looks] == list(OUTCOMES)
    positive = next(look for look in looked.looks if look.outcome == "positive_reaction")
    assert positive.n_candidate == 0 and positive.difference is None and positive.p_harm == 1.0


def test_labels_not_read_yet_hold_back_a_promotion_but_not_harm() -> None:
    planned = OPTIONS.model_copy(update={"max_sessions": 80})
    as_good = outcomes(4.1, 80, seed=5), outcomes(4.0, 80, seed=6)
    waiting = decide(planned, canary(labels_pending=2), *as_good)
    assert waiting.state == "running" and waiting.labels_pending == 2
    assert decide(planned, waiting.model_copy(update={"labels_pending": 0}), *as_good).state == "promoted"
    harmed = decide(OPTIONS, canary(labels_pending=2), outcomes(2.0, 12, seed=1), outcomes(4.2, 12, seed=2))
    assert harmed.state == "rolled_back"


def test_the_monitor_reads_each_label_once_and_waits_a_while_for_missing_ones() -> None:
    asked: list[str] = []

    async def labels(session_id: str) -> SessionReactions:
        asked.append(session_id)
        if session_id.startswith("late"):
            raise NotFound(f"session {session_id} is not recorded yet")
        if session_id == "refused":
            raise FailedPrecondition("no training consent")
        return SessionReactions(0.1, 0.5)

    def ended(session_id: str, finished_ms: int, **changes: Any) -> SessionRecord:
        values: dict[str, Any] = dict(
            session_id=session_id,
            study_id="st",
            participant_id="p",
            arm="cand",
            created_ms=finished_ms - 1000,
            ended_ms=finished_ms,
            camera=True,
            store_frames=False,
            use_for_training=True,
            state="ended",
        )
        return SessionRecord(**(values | changes))

    records = [
        ended("ok", NOW),
        ended("refused", NOW),
        ended("late-new", int(time.time() * 1000)),  # Within label_grace_s: worth waiting for.
        ended("late-old", NOW - int(OPTIONS.label_grace_s * 1000) - 60_000),  # Given up on.
        ended("active", NOW, state="active"),
        ended("no-consent", NOW, use_for_training=False),
    ]
    monitor = CanaryMonitor(OPTIONS, None, None, labels=labels)
    assert asyncio.run(monitor.read_labels(records)) == 1
    assert sorted(asked) == ["late-new", "late-old", "ok", "refused"]
    asked.clear()
    assert asyncio.run(monitor.read_labels(records)) == 1
    # Known, with or without outcomes, are not asked again; one not readable yet is, though past the grace period it
    # no longer holds a promotion back.
    assert sorted(asked) == ["late-new", "late-old"]
    found = session_outcomes(records, "cand", 0, 0, monitor._reactions)
    assert found["delta_v"] == [0.1] and found["positive_reaction"] == [0.5]
    assert asyncio.run(CanaryMonitor(OPTIONS, None, None).read_labels(records)) == 0  # No labeler: rating only.


def test_a_look_reads_a_bounded_number_of_labels_and_an_auth_error_is_not_final() -> None:
    async def refused(session_id: str) -> SessionReactions:
        raise PermissionDenied("token of 'gateway-service' lacks the 'labeler' scope")

    records = [
        SessionRecord(
            session_id=f"s{i}",
            study_id="st",
            participant_id="p",
            arm="cand",
            created_ms=int(time.time() * 1000),
            camera=True,
            store_frames=False,
            use_for_training=True,
            state="ended",
        )
        for i in range(MAX_LABEL_READS + 5)
    ]
    monitor = CanaryMonitor(OPTIONS, None, None, labels=refused)
    assert asyncio.run(monitor.read_labels(records)) == len(records)  # Read or not, none is final.
    assert monitor._reactions == {}


# --- through the gateway ------------------------------------------------------------------------------------


def _settings(redis_url: str, s3: S3Settings, servers: Servers) -> GatewaySettings:
    settings = gateway_settings(redis_url, s3, servers)
    # Keys of its own in the shared Redis: other tests' gateways run canary monitors that take the same lock.
    # Two sessions per participant: a returning participant's arm is checked again at their second.
    studies = settings.gateway.studies.model_copy(
        update={
            "redis_prefix": f"canary-test-{uuid.uuid4().hex[:8]}",
            "prefix": f"canary-test-{uuid.uuid4().hex[:8]}",  # Its own studies: a canary can span every study.
            "max_sessions_per_participant": 2,
        }
    )
    canary = OPTIONS.model_copy(update={"monitor": False})
    options = settings.gateway.model_copy(update={"canary": canary, "studies": studies})
    return settings.model_copy(update={"gateway": options})


def _rated(study_id: str, arm: str, i: int, rating: int, started_ms: int) -> SessionRecord:
    return SessionRecord(
        session_id=f"{study_id}-{arm}-{i}",
        study_id=study_id,
        participant_id=f"{study_id}-{arm}-p{i}",
        arm=arm,
        created_ms=started_ms + 1 + i,
        camera=True,
        store_frames=False,
        use_for_training=True,
        state="ended",
        rated=True,
        rating={"empathy": rating, "relevance": rating, "fluency": rating},
    )


def _monitor(
    redis_url: str,
    object_store: ObjectStore,
    settings: GatewaySettings,
    sessions: list[SessionRecord],
    replica: str = "test-monitor",
    engine: type[StudyEngine] = StudyEngine,
) -> list[Canary]:
    """Store ``sessions`` and take one look, in this test's own event loop (the app runs in another)."""

    async def go() -> list[Canary]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            studies = engine(settings.gateway.studies, client, object_store)
            studies.replica = replica  # The same monitor each time: it still holds the lock it took.
            for record in sessions:
                await studies.save_session(record)
            decided: list[Canary] = await CanaryMonitor(settings.gateway.canary, studies, gateway_metrics()).tick()
            return decided
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.mark.integration
def test_a_canary_through_the_gateway(
    make_client: MakeClient, redis_url: str, s3_settings: S3Settings, servers: Servers, object_store: ObjectStore
) -> None:
    settings = _settings(redis_url, s3_settings, servers)
    client: TestClient = make_client(settings)
    register_model_version(object_store, "canary-good")
    register_model_version(object_store, "canary-bad")
    study = create_study(client)
    study_id = study["study_id"]
    url = f"/api/v1/studies/{study_id}/canary"

    none_yet = client.get(url, headers=admin_headers())
    assert none_yet.status_code == 404 and none_yet.json()["error"] == "canary_not_found"
    unknown_study = client.get("/api/v1/studies/st-000000000000/canary", headers=admin_headers())
    assert unknown_study.status_code == 404 and unknown_study.json()["error"] == "not_found"
    unknown = client.post(url, json={"candidate": "no-such-version"}, headers=admin_headers())
    assert unknown.status_code == 400 and "not a registered model version" in unknown.json()["detail"]
    started = client.post(url, json={"candidate": "canary-good", "share": 0.5}, headers=admin_headers())
    assert started.status_code == 201, started.text
    assert started.json()["production"] == "base" and started.json()["state"] == "running"
    again = client.post(url, json={"candidate": "canary-bad"}, headers=admin_headers())
    assert again.status_code == 409 and "already runs a canary of canary-good" in again.json()["detail"]

    # New participants: about half of the production arm's go to the candidate, and nobody is told which.
    arms = []
    for _ in range(24):
        joined = join(client, study_id)
        session_id = start_session(client, joined)
        assert "arm" not in client.get(f"/api/v1/sessions/{session_id}", headers=joined.headers).json()
        arms.append(client.get(url, headers=admin_headers()).json()["participants"])
    assert 4 <= arms[-1] <= 20 and arms == sorted(arms)

    # As good as production over the planned size: promoted, and the next newcomers get the candidate.
    running = Canary.model_validate(client.get(url, headers=admin_headers()).json())
    sessions = [
        _rated(study_id, arm, i, 4 + i % 2, running.started_ms) for arm in ("canary-good", "base") for i in range(30)
    ]
    decided = _monitor(redis_url, object_store, settings, sessions)
    assert [c.state for c in decided] == ["promoted"]
    shown = client.get(url, headers=admin_headers()).json()
    assert shown["state"] == "promoted" and shown["looks"][0]["n_candidate"] >= 30
    # The decision names the sessions it rests on, per arm (with the participants' unrated sessions of above).
    behind = {role: set(ids) for role, ids in shown["sessions"].items()}
    assert {f"{study_id}-canary-good-{i}" for i in range(30)} <= behind["candidate"]
    assert {f"{study_id}-base-{i}" for i in range(30)} <= behind["production"]
    assert not behind["candidate"] & behind["production"]
    newcomer = join(client, study_id)
    start_session(client, newcomer)
    prefix = settings.gateway.studies.redis_prefix

    def arm_of(joined: Joined) -> str:
        raw = redis.Redis.from_url(redis_url).hget(f"{prefix}:participant:{joined.participant_id}", "arm")
        return str(json.loads(raw or b'""'))

    assert arm_of(newcomer) == "canary-good"
    progress = client.get(f"/api/v1/studies/{study_id}/progress", headers=admin_headers()).json()
    assert progress["arms"][0]["arm"] == "base"  # The study is unchanged; the gateway maps its arm.

    # A canary stands in for what serves now: the study arm the promoted version replaced is refused by name (a
    # candidate judged against base would be compared with canary-good), and what serves no arm at all is unknown.
    stale = client.post(url, json={"candidate": "canary-bad", "production": "base"}, headers=admin_headers())
    assert stale.status_code == 409 and "served by 'canary-good'" in stale.json()["detail"]
    unknown = client.post(url, json={"candidate": "canary-bad", "production": "v-none"}, headers=admin_headers())
    assert unknown.status_code == 400 and "serving now: base by canary-good" in unknown.json()["detail"]

    # A harmful candidate against the new production arm: rolled back at the first look with min_sessions (10) per
    # arm, long before 30.
    bad = client.post(url, json={"candidate": "canary-bad", "share": 0.3}, headers=admin_headers())
    assert bad.status_code == 201 and bad.json()["production"] == "canary-good"
    started_ms = bad.json()["started_ms"]
    assert _monitor(redis_url, object_store, settings, [], replica="another-gateway") == []  # Not its turn.
    harmful = [_rated(study_id, "canary-bad", i, 1, started_ms) for i in range(OPTIONS.min_sessions)]
    harmful += [_rated(study_id, "canary-good", 100 + i, 5, started_ms) for i in range(OPTIONS.min_sessions)]
    decided = _monitor(redis_url, object_store, settings, harmful)
    assert [c.state for c in decided] == ["rolled_back"] and decided[0].reason.startswith("harm")
    manual = client.post(f"{url}/rollback", headers=admin_headers())
    assert manual.status_code == 409 and "already rolled back" in manual.json()["detail"]

    # People the promoted version learned from withdraw, and it is retired: its participants and newcomers go back to
    # the study arm it stood in for.
    retire(object_store, "canary-good")
    start_session(client, newcomer)
    assert arm_of(newcomer) == "base"

    def canary_of(candidate: str) -> dict[str, Any]:
        register_model_version(object_store, candidate)
        started = client.post(url, json={"candidate": candidate, "share": 0.5}, headers=admin_headers())
        assert started.status_code == 201, started.text
        return dict(started.json())

    # A canary's own participant, once the candidate is retired, goes back to the production arm; the canary is
    # rolled back at its next look and the version cannot be tried again.
    assert canary_of("canary-third")["production"] == "base"
    drawn = next(
        j for j in (join(client, study_id) for _ in range(40)) if start_session(client, j) and arm_of(j) != "base"
    )
    assert arm_of(drawn) == "canary-third"
    retire(object_store, "canary-third")
    start_session(client, drawn)
    assert arm_of(drawn) == "base"
    decided = _monitor(redis_url, object_store, settings, [])
    assert [(c.state, c.reason) for c in decided] == [("rolled_back", RETIRED_REASON)]
    again = client.post(url, json={"candidate": "canary-third"}, headers=admin_headers())
    assert again.status_code == 409 and "retired" in again.json()["detail"]

    # A candidate promoted after a retirement serves the study arm (the retired version's mapping no longer counts).
    fourth = canary_of("canary-fourth")
    as_good = [
        _rated(study_id, arm, 200 + i, 4 + i % 2, fourth["started_ms"])
        for arm in ("canary-fourth", "base")
        for i in range(30)
    ]
    assert [c.state for c in _monitor(redis_url, object_store, settings, as_good)] == ["promoted"]
    latest = join(client, study_id)
    start_session(client, latest)
    assert arm_of(latest) == "canary-fourth"

    # The production version retired while a canary runs against it: the canary is rolled back.
    assert canary_of("canary-fifth")["production"] == "canary-fourth"
    retire(object_store, "canary-fourth")
    decided = _monitor(redis_url, object_store, settings, [])
    assert [(c.state, c.reason) for c in decided] == [("rolled_back", PRODUCTION_RETIRED_REASON)]


@pytest.mark.integration
def test_one_canary_across_the_running_studies(
    make_client: MakeClient, redis_url: str, s3_settings: S3Settings, servers: Servers, object_store: ObjectStore
) -> None:
    """``POST /canaries``: the candidate runs in every study its production version serves (not a simulated one
    unless asked, not one running another canary), the studies' sessions are pooled, and one decision holds in all."""
    settings = _settings(redis_url, s3_settings, servers)
    client: TestClient = make_client(settings)
    for version in ("wide-good", "wide-bad", "busy"):
        register_model_version(object_store, version)
    first, second = create_study(client)["study_id"], create_study(client)["study_id"]
    simulated = create_study(client, synthetic=True)["study_id"]
    other_arm = create_study(client, arms=[{"arm": "busy", "weight": 1}])["study_id"]  # Serves no base.
    busy = create_study(client)["study_id"]
    closed = create_study(client)["study_id"]  # Serves base, but nobody can join it: not running.
    for study_id in (first, second, simulated, other_arm, busy):
        create_invite(client, study_id)
    assert client.post(f"/api/v1/studies/{busy}/canary", json={"candidate": "busy"}, headers=admin_headers()).is_success

    nothing = client.post(
        "/api/v1/canaries", json={"candidate": "wide-good", "production": "v-none"}, headers=admin_headers()
    )
    assert nothing.status_code == 409 and nothing.json()["error"] == "no_study_for_canary"
    assert client.get("/api/v1/canaries/wide-good", headers=admin_headers()).json()["error"] == "canary_not_found"
    body = {"candidate": "wide-good", "production": "base", "share": 0.5}
    started = client.post("/api/v1/canaries", json=body, headers=admin_headers())
    assert started.status_code == 201, started.text
    group = started.json()
    assert sorted(c["study_id"] for c in group["canaries"]) == sorted([first, second])
    assert simulated not in str(group) and other_arm not in str(group) and closed not in str(group)
    assert list(group["skipped"]) == [busy] and "already runs a canary of busy" in group["skipped"][busy]
    again = client.post("/api/v1/canaries", json=body, headers=admin_headers())
    assert again.status_code == 409 and again.json()["error"] == "no_study_for_canary"  # Each runs it already.

    # Neither study alone reaches the planned 30 sessions per arm; pooled, they do: promoted in both at one look.
    started_ms = group["started_ms"]
    sessions = [
        _rated(study_id, arm, i, 4 + i % 2, started_ms)
        for study_id in (first, second)
        for arm in ("wide-good", "base")
        for i in range(15)
    ]
    decided = _monitor(redis_url, object_store, settings, sessions)
    assert sorted((c.study_id, c.state) for c in decided) == sorted([(first, "promoted"), (second, "promoted")])
    shown = client.get("/api/v1/canaries/wide-good", headers=admin_headers()).json()
    assert shown["state"] == "promoted" and shown["looks"][0]["n_candidate"] == 30
    assert {s.split("-wide-good-")[0] for s in shown["sessions"]["candidate"]} == {first, second}
    for study_id in (first, second):
        assert client.get(f"/api/v1/studies/{study_id}/canary", headers=admin_headers()).json()["state"] == "promoted"
        newcomer = join(client, study_id)
        start_session(client, newcomer)
        prefix = settings.gateway.studies.redis_prefix
        raw = redis.Redis.from_url(redis_url).hget(f"{prefix}:participant:{newcomer.participant_id}", "arm")
        assert json.loads(raw or b'""') == "wide-good"

    # A researcher stops the next candidate in one study: it stops in the other at once (one decision, counted once).
    decisions = gateway_metrics().canary_decisions.labels("rolled_back")
    counted = decisions._value.get()
    body = {"candidate": "wide-bad", "production": "wide-good", "studies": [first, second]}
    assert client.post("/api/v1/canaries", json=body, headers=admin_headers()).status_code == 201
    elsewhere = create_study(client)["study_id"]  # Serves base, runs nothing: the candidate may not start there too.
    again = client.post(f"/api/v1/studies/{elsewhere}/canary", json={"candidate": "wide-bad"}, headers=admin_headers())
    assert again.status_code == 409 and "wide-bad already runs as a canary in" in again.json()["detail"]
    assert client.post(f"/api/v1/studies/{first}/canary/rollback", headers=admin_headers()).is_success
    states = [client.get(f"/api/v1/studies/{i}/canary", headers=admin_headers()).json() for i in (first, second)]
    assert [c["state"] for c in states] == ["rolled_back", "rolled_back"] and states[1]["reason"] == states[0]["reason"]
    assert _monitor(redis_url, object_store, settings, []) == [] and decisions._value.get() == counted + 1
    assert client.get("/api/v1/canaries/wide-bad", headers=admin_headers()).json()["state"] == "rolled_back"
    stopped = client.post("/api/v1/canaries/wide-bad/rollback", headers=admin_headers())
    assert stopped.status_code == 409 and "already rolled back" in stopped.json()["detail"]

    # A rollback lands while a look that would promote is comparing the sessions: the rollback stands in both studies,
    # and neither serves the candidate.
    as_good = _as_good_in_both(client, object_store, "wide-race", "wide-good", [first, second], first_session=100)

    claims: list[tuple[str, bool]] = []

    class RolledBackMidLook(StudyEngine):
        rolled = False

        async def study_sessions(self, study_id: str) -> list[SessionRecord]:
            if not self.rolled and study_id in (first, second):  # Not during the look at busy's own canary.
                self.rolled = True
                stop = client.post(f"/api/v1/studies/{second}/canary/rollback", headers=admin_headers())
                assert stop.is_success, stop.text
            return await super().study_sessions(study_id)

        async def claim_decision(self, decided: Canary) -> tuple[Canary, bool]:
            decision, claimed = await super().claim_decision(decided)
            claims.append((decided.state, claimed))
            return decision, claimed

    decided = _monitor(redis_url, object_store, settings, as_good, engine=RolledBackMidLook)
    # The look would have promoted, but the rollback was claimed first: the look found nothing left to decide.
    assert claims == [("promoted", False)] and decided == []
    shown = client.get("/api/v1/canaries/wide-race", headers=admin_headers()).json()
    assert [c["state"] for c in shown["canaries"]] == ["rolled_back", "rolled_back"]
    assert shown["reason"].startswith("rolled back by")
    for study_id in (first, second):
        newcomer = join(client, study_id)
        start_session(client, newcomer)
        raw = redis.Redis.from_url(redis_url).hget(f"{prefix}:participant:{newcomer.participant_id}", "arm")
        assert json.loads(raw or b'""') == "wide-good"
    # A rollback arrives while a look writes its promotion into the studies: the promotion was claimed first and
    # stands in both; the researcher is told so.
    as_good = _as_good_in_both(client, object_store, "wide-late", "wide-good", [first, second], first_session=200)
    refused: list[str] = []

    class RollbackBetweenWrites(StudyEngine):
        async def save_canary(self, canary: Canary, *, while_running: bool = False) -> bool:
            saved = await super().save_canary(canary, while_running=while_running)
            if canary.state == "promoted" and not refused:  # The study not written yet.
                other = second if canary.study_id == first else first
                stop = client.post(f"/api/v1/studies/{other}/canary/rollback", headers=admin_headers())
                refused.append(f"{stop.status_code} {stop.json()['detail']}")
            return saved

    decided = _monitor(redis_url, object_store, settings, as_good, engine=RollbackBetweenWrites)
    assert refused and refused[0].startswith("409") and "decided meanwhile (promoted" in refused[0]
    shown = client.get("/api/v1/canaries/wide-late", headers=admin_headers()).json()
    assert [c["state"] for c in shown["canaries"]] == ["promoted", "promoted"], shown

    # Named studies must each take it, or none starts.
    named = client.post(
        "/api/v1/canaries",
        json={"candidate": "wide-bad", "production": "wide-late", "studies": [first, other_arm]},
        headers=admin_headers(),
    )
    assert named.status_code == 400 and "'wide-late' serves no arm of study" in named.json()["detail"]
    assert client.get(f"/api/v1/studies/{first}/canary", headers=admin_headers()).json()["candidate"] == "wide-late"

    # A look that promoted in one study and stopped before recording the other: the next look promotes there too.
    register_model_version(object_store, "wide-third")
    body = {"candidate": "wide-third", "production": "wide-late", "studies": [first, second]}
    third = client.post("/api/v1/canaries", json=body, headers=admin_headers()).json()
    promoted = Canary.model_validate(third["canaries"][0]).model_copy(
        update={"state": "promoted", "reason": "as good: within the margin", "decided_ms": NOW}
    )
    assert _save(redis_url, object_store, settings, promoted)
    decided = _monitor(redis_url, object_store, settings, [])
    assert [(c.study_id, c.state, c.reason) for c in decided] == [(second, "promoted", promoted.reason)]
    assert client.get("/api/v1/canaries/wide-third", headers=admin_headers()).json()["state"] == "promoted"

    # Rolled back in one study with no claim recorded (before claims existed, or Redis lost the key): the next look
    # takes that rollback for the whole experiment rather than deciding the other study on its own.
    register_model_version(object_store, "wide-fourth")
    body = {"candidate": "wide-fourth", "production": "wide-third", "studies": [first, second]}
    fourth = client.post("/api/v1/canaries", json=body, headers=admin_headers()).json()
    stopped = Canary.model_validate(fourth["canaries"][1]).model_copy(
        update={"state": "rolled_back", "reason": "rolled back by an older gateway", "decided_ms": NOW}
    )
    assert _save(redis_url, object_store, settings, stopped, claim=False)
    as_good = [
        _rated(first, arm, 300 + i, 4 + i % 2, fourth["started_ms"])
        for arm in ("wide-fourth", "wide-third")
        for i in range(30)
    ]
    decided = _monitor(redis_url, object_store, settings, as_good)
    assert [(c.study_id, c.state, c.reason) for c in decided] == [(first, "rolled_back", stopped.reason)]


def _as_good_in_both(
    client: TestClient, store: ObjectStore, candidate: str, production: str, studies: list[str], first_session: int
) -> list[SessionRecord]:
    """Start ``candidate``'s canary across ``studies`` and make 15 rated sessions per arm in each, alike: pooled, as
    many as a promotion needs."""
    register_model_version(store, candidate)
    body = {"candidate": candidate, "production": production, "studies": studies}
    started = client.post("/api/v1/canaries", json=body, headers=admin_headers())
    assert started.status_code == 201, started.text
    return [
        _rated(study_id, arm, first_session + i, 4 + i % 2, started.json()["started_ms"])
        for study_id in studies
        for arm in (candidate, production)
        for i in range(15)
    ]


def _save(
    redis_url: str, object_store: ObjectStore, settings: GatewaySettings, canary: Canary, claim: bool = True
) -> bool:
    """What a look that decided does before it stopped: claim the decision (unless not ``claim``: a gateway from
    before claims existed), write it into this one study only."""

    async def go() -> bool:
        client = aioredis.Redis.from_url(redis_url)
        try:
            studies = StudyEngine(settings.gateway.studies, client, object_store)
            claimed = (await studies.claim_decision(canary))[1] if claim else True
            return claimed and await studies.save_canary(canary, while_running=True)
        finally:
            await client.aclose()

    return asyncio.run(go())


def retire(store: ObjectStore, version: str) -> None:
    """The withdrawal mark the labeler writes with ``retention.withdrawn_models: retire``."""
    mark = {"version": version, "withdrawn_sessions": ["s-gone"], "withdrawn_ms": 1, "updated_ms": 1, "retired": True}
    store.put_json(Bucket.MODELS, model_withdrawal_key(version), mark)


def test_the_final_bound_on_a_few_sessions_uses_students_t() -> None:
    """Five sessions per arm: the normal quantile (1.645) would call this candidate as good within 0.25; Student's
    t on Welch's degrees of freedom (about 1.86 on 8 here) does not."""
    few = CanarySettings(max_sessions=5, alpha=0.05, margin=0.25)
    candidate = {"rating": [3.75, 4.25, 4.0, 3.8, 4.2], "completed": [1.0] * 5}
    production = {"rating": [3.7, 4.3, 3.9, 4.1, 4.0], "completed": [1.0] * 5}
    compared = msprt_compare(candidate["rating"], production["rating"], tau=1.0)
    assert compared.difference - 1.645 * compared.standard_error > -0.25  # The normal bound would promote.
    looked = decide(few, canary(), candidate, production)
    assert looked.state == "rolled_back" and looked.reason.startswith("not shown to be as good")
    assert looked.looks[0].lower_bound is not None and looked.looks[0].lower_bound < -0.25


@pytest.mark.integration
def test_a_look_never_undoes_a_decision_that_landed_first(redis_url: str, object_store: ObjectStore) -> None:
    """A monitor's look starts from the canary it read earlier; a researcher's rollback saved meanwhile stands, in
    Redis (what allocation reads) and in the durable record."""
    options = StudyStoreSettings(redis_prefix=f"canary-cas-{uuid.uuid4().hex[:8]}")
    running = canary(study_id="st-0123456789ab", candidate="cas-v", started_ms=int(time.time() * 1000))
    stopped = running.model_copy(update={"state": "rolled_back", "reason": "rolled back by a researcher"})
    stale_look = running.model_copy(update={"reason": "", "looks": []})
    key = f"{options.redis_prefix}:study:{running.study_id}:canary"

    async def go(objects: Any) -> tuple[bool, bool, bool, Canary | None, bool]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            studies = StudyEngine(options, client, objects)
            first = await studies.save_canary(running)
            researcher = await studies.save_canary(stopped, while_running=True)
            look = await studies.save_canary(stale_look, while_running=True)
            still_running = running.study_id.encode() in await client.smembers(
                f"{options.redis_prefix}:canaries:running"
            )
            return first, researcher, look, await studies.canary(running.study_id), still_running
        finally:
            await client.aclose()

    first, researcher, look, stored, still_running = asyncio.run(go(object_store))
    assert first and researcher and not look and not still_running
    assert stored is not None and stored.state == "rolled_back" and stored.reason == "rolled back by a researcher"

    # Another write lands between an attempt's check and its commit (WATCH): a look's numbers, the canary still
    # running, so the attempt is made again and succeeds; or a researcher's rollback, which then stands (in the
    # durable record too: it is written only once Redis took the change).
    running = running.model_copy(update={"started_ms": running.started_ms + 1})
    stopped = running.model_copy(update={"state": "rolled_back", "reason": "rolled back by a researcher"})
    durable = f"{options.prefix}/{running.study_id}/canaries/{running.started_ms}-{running.candidate}.json"

    class Interleaved(StudyEngine):
        def __init__(self, *args: Any, writes: list[Canary]) -> None:
            super().__init__(*args)
            self.writes = writes

        async def _queue_canary(self, pipe: Any, canary: Canary) -> None:
            if self.writes:  # Another replica's write, from its own connection, before this commit.
                other = self.writes.pop(0)
                redis.Redis.from_url(redis_url).set(key, other.model_dump_json())
                object_store.put_json(Bucket.SESSIONS, durable, other.model_dump())
            await super()._queue_canary(pipe, canary)

    async def race(writes: list[Canary], mine: Canary) -> tuple[bool, Canary | None]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            await StudyEngine(options, client, object_store).save_canary(running)
            studies = Interleaved(options, client, object_store, writes=writes)
            saved = await studies.save_canary(mine, while_running=True)
            return saved, await studies.canary(running.study_id)
        finally:
            await client.aclose()

    other_look = running.model_copy(update={"reason": "another look"})
    saved, stored = asyncio.run(race([other_look], running.model_copy(update={"reason": "this look"})))
    assert saved and stored is not None and stored.reason == "this look"
    assert object_store.get_json(Bucket.SESSIONS, durable)["reason"] == "this look"
    saved, stored = asyncio.run(race([stopped], running.model_copy(update={"reason": "a stale look"})))
    assert not saved and stored is not None and stored.state == "rolled_back"
    assert object_store.get_json(Bucket.SESSIONS, durable)["state"] == "rolled_back"


@pytest.mark.integration
def test_a_stopped_monitor_hands_its_lock_over_at_once(redis_url: str, object_store: ObjectStore) -> None:
    """A replica shutting down gives the monitor's lock up: another replica looks at its next tick, not a TTL later
    (the lock lives two intervals)."""
    options = StudyStoreSettings(redis_prefix=f"canary-lock-{uuid.uuid4().hex[:8]}")
    slow = OPTIONS.model_copy(update={"interval_s": 600.0})

    async def go() -> tuple[bool, bool]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            first, second = StudyEngine(options, client, object_store), StudyEngine(options, client, object_store)
            first.replica, second.replica = "replica-1", "replica-2"
            running = asyncio.create_task(CanaryMonitor(slow, first, gateway_metrics()).run())
            for _ in range(500):  # Its first tick takes the lock.
                if await client.get(f"{options.redis_prefix}:lock:canary-monitor") is not None:
                    break
                await asyncio.sleep(0.01)
            held = not await second.take_lock("canary-monitor", 60)
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            return held, await second.take_lock("canary-monitor", 60)
        finally:
            await client.aclose()

    held, taken = asyncio.run(go())
    assert held and taken


@pytest.mark.integration
def test_a_start_that_loses_a_race_is_made_again(redis_url: str, object_store: ObjectStore) -> None:
    """Another write to a key the start watches lands between its checks and its commit (WATCH): the start is made
    again on what is there now, and the canaries run once."""
    options = StudyStoreSettings(redis_prefix=f"canary-start-{uuid.uuid4().hex[:8]}", prefix="canary-start")
    register_model_version(object_store, "race-start")
    studies = [
        Study.model_validate(
            study_spec() | {"study_id": f"st-{uuid.uuid4().hex[:12]}", "created_ms": 1, "created_by": "r"}
        )
        for _ in range(2)
    ]
    index = f"{options.redis_prefix}:candidate:race-start:canary_studies"
    attempts: list[int] = []

    class Interleaved(StudyEngine):
        async def _queue_canary(self, pipe: Any, canary: Canary) -> None:
            if not attempts:  # Another replica's write, from its own connection, before this commit.
                redis.Redis.from_url(redis_url).set(index, "[]")
            attempts.append(1)
            await super()._queue_canary(pipe, canary)

    async def go() -> list[Canary]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await Interleaved(options, client, object_store).start_canaries(
                studies, "race-start", "base", 0.1, "r"
            )
        finally:
            await client.aclose()

    started = asyncio.run(go())
    assert len(attempts) == 4  # Two canaries queued per attempt: the first attempt lost, the second committed.
    stored = redis.Redis.from_url(redis_url)
    assert json.loads(stored.get(index) or b"[]") == [s.study_id for s in studies]
    for canary in started:
        raw = stored.get(f"{options.redis_prefix}:study:{canary.study_id}:canary")
        assert raw is not None and Canary.model_validate_json(raw).state == "running"
