"""The automatic loop on the researchers' API, against real Redis and S3: what the loop itself wrote (a round of
the real ``emili_pipeline.loop.Loop``, its pipeline state written by the pipeline's own code, its candidate in the
model registry and its canary run through the gateway) can be traced from each decision back to the gate's
numbers, the pipeline, its training and held-out sessions and the version's lineage."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient

from emili_core.keys import model_registry_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import S3Settings
from emili_pipeline import loop as pipeline_loop
from emili_pipeline.config import PipelineConfig
from emili_pipeline.gate import Evidence
from emili_pipeline.loop import Loop, LoopPolicy
from emili_pipeline.pipeline import new_state, save_state
from emili_session import loop_records
from emili_testing.plugin import token

from .conftest import (
    MakeClient,
    Servers,
    admin_headers,
    bearer,
    create_study,
    gateway_settings,
    join,
    register_model_version,
    study_spec,
)

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


class AlwaysLease:
    def take(self, owner: str, ttl_s: float) -> bool:
        return True


@dataclass
class System:
    """The rest of the system as the loop sees it: the pipeline writes its real state; canaries go through the
    gateway's API."""

    store: ObjectStore
    client: TestClient
    sessions: list[str]
    candidate: str
    evidence: dict[str, Any]
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)

    def eligible_sessions(self, include_synthetic: bool) -> list[str]:
        return list(self.sessions)

    def start_pipeline(self, session_ids: Sequence[str], baseline: str = "base") -> str:
        state = new_state(PipelineConfig(seed=len(self.pipelines)), session_ids)
        state["steps"]["sft"] = {"state": "done", "outputs": {"model_version": self.candidate}}
        save_state(self.store, state)
        self.pipelines[state["pipeline_id"]] = state
        return str(state["pipeline_id"])

    def pipeline_outcome(self, pipeline_id: str) -> tuple[str, str | None, dict[str, Evidence]]:
        return "done", self.candidate, self.evidence

    def start_canary(
        self, candidate: str, production: str, share: float, studies: Sequence[str] | None, synthetic: bool
    ) -> list[str]:
        body = {"candidate": candidate, "share": share, "production": production, "studies": studies}
        response = self.client.post("/api/v1/canaries", json=body, headers=admin_headers())
        assert response.status_code == 201, response.text
        return [c["study_id"] for c in response.json()["canaries"]]

    def canary_outcome(self, candidate: str) -> str:
        group = self.client.get(f"/api/v1/canaries/{candidate}", headers=admin_headers()).json()
        return str(group.get("state", "missing"))


def fresh_loop(store: ObjectStore, system: System, study_id: str = "") -> Loop:
    store.delete(Bucket.MODELS, loop_records.LOOP_STATE_KEY)
    where = "study" if study_id else "none"
    policy = LoopPolicy(enabled=True, interval_s=5, min_new_sessions=3, canary_in=where, study_id=study_id)
    return Loop(policy, store, AlwaysLease(), system, "test")


def register_candidate(store: ObjectStore, sessions: list[str]) -> str:
    version = f"cand-{uuid.uuid4().hex[:8]}"
    register_model_version(store, version)
    entry = store.get_json(Bucket.MODELS, model_registry_key(version))
    lineage = {"datasets": [{"id": "ds-1", "kind": "sft", "created_by": "labeler"}], "sessions": sessions}
    store.put_json(Bucket.MODELS, model_registry_key(version), entry | {"lineage": lineage | {"parents": ["base"]}})
    return version


def get(client: TestClient, path: str, status: int = 200) -> Any:
    response = client.get(f"/api/v1{path}", headers=admin_headers())
    assert response.status_code == status, response.text
    return response.json()


def test_the_keys_are_the_loops() -> None:
    assert loop_records.LOOP_STATE_KEY == pipeline_loop.STATE_KEY
    assert loop_records.gate_key("v1") == pipeline_loop.gate_key("v1")


def test_before_the_loop_ran_the_view_says_so(client: TestClient, object_store: ObjectStore) -> None:
    object_store.delete(Bucket.MODELS, loop_records.LOOP_STATE_KEY)
    body = get(client, "/loop")
    assert body["ran"] is False and body["phase"] == "idle" and body["history"] == [] and body["candidates"] == []
    missing = get(client, "/loop/candidates/never-made", 404)
    assert missing["error"] == "not_found" and "never-made" in missing["detail"]
    assert get(client, "/loop/pipelines/pl-0000000000000000", 404)["error"] == "not_found"
    assert get(client, "/loop/candidates/bad%20version", 400)["error"] == "invalid_input"
    assert get(client, "/loop/pipelines/bad%20id", 400)["error"] == "invalid_input"


def test_a_round_is_traced_from_each_decision_to_its_sessions(client: TestClient, object_store: ObjectStore) -> None:
    study = create_study(client, arms=[{"arm": "base"}])
    sessions = [f"s-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    candidate = register_candidate(object_store, sessions)
    system = System(object_store, client, sessions, candidate, GOOD)
    loop = fresh_loop(object_store, system, study["study_id"])
    for _ in range(3):
        loop.tick()
    assert loop.state().phase == "canary"
    # A researcher stops the canary; the loop records the gateway's decision on its next tick.
    rolled = client.post(f"/api/v1/studies/{study['study_id']}/canary/rollback", headers=admin_headers())
    assert rolled.status_code == 200, rolled.text
    assert (loop.tick() or pytest.fail()).phase == "idle"
    (pipeline_id,) = system.pipelines

    view = get(client, "/loop")
    assert view["ran"] is True and view["phase"] == "idle" and view["candidate"] == candidate
    assert view["used_sessions"] == 4 and view["events"] == len(view["history"]) == 6
    events = [e["event"] for e in view["history"]]
    assert events == [
        "canary rolled back",
        "canary started",
        "gate passed",
        "candidate trained",
        "pipeline started",
        "enough new sessions",
    ]
    newest, started = view["history"][0], view["history"][-1]
    assert newest["candidate"] == candidate and newest["phase"] == "idle" and newest["at_ms"] > 0
    assert started["numbers"]["new_sessions"] == 4 and started["numbers"]["sessions"] == 4
    assert view["history"][1]["studies"] == [study["study_id"]]
    assert view["history"][4]["pipeline_id"] == pipeline_id
    (listed,) = view["candidates"]
    assert listed["version"] == candidate and listed["latest_event"] == "canary rolled back"
    assert listed["pipeline_id"] == pipeline_id and listed["studies"] == [study["study_id"]]
    verdict = listed["verdict"]
    assert verdict["passed"] is True and verdict["policy"] == "default" and verdict["sessions"] == 4
    checks = {c["name"]: c for c in verdict["checks"]}
    knowledge = checks["knowledge_kept"]
    assert knowledge["n"] == 120 and knowledge["estimate"] == 0.0 and knowledge["passed"] is True
    assert knowledge["ci"][0] <= 0.0 <= knowledge["ci"][1] and "margin" in knowledge["reason"]
    assert checks["reply_length_sane"]["ci"] is None and checks["reply_length_sane"]["estimate"] == 20.0
    signal = checks["feedback_predicts_surveys"]
    assert signal["estimate"] == 1.0 and signal["p_value"] <= 0.025 and signal["ci"] is None

    detail = get(client, f"/loop/candidates/{candidate}")
    assert detail["verdict"] == verdict and detail["registered"] is True
    pipeline = detail["pipeline"]
    assert pipeline["pipeline_id"] == pipeline_id and pipeline["sessions"] == sorted(sessions)
    assert sorted(pipeline["train_sessions"] + pipeline["heldout_sessions"]) == sorted(sessions)
    assert pipeline["heldout_sessions"] and pipeline["models"] == {"sft": candidate}
    assert pipeline["steps"]["sft"] == "done" and pipeline["steps"]["evaluate"] == "pending"
    assert detail["lineage_sessions"] == sorted(sessions) and detail["lineage_datasets"][0]["id"] == "ds-1"
    assert detail["lineage_parents"] == ["base"]
    assert detail["studies"] == [study["study_id"]]
    assert detail["canary"]["candidate"] == candidate and detail["canary"]["state"] == "rolled_back"
    assert [c["study_id"] for c in detail["canary"]["canaries"]] == [study["study_id"]]
    assert [e["event"] for e in detail["history"]][:2] == ["canary rolled back", "canary started"]
    assert get(client, f"/loop/pipelines/{pipeline_id}") == pipeline

    # A later candidate's canary becomes the study's newest; this candidate's decision and numbers stay on its page.
    later = register_candidate(object_store, sessions)
    url = f"/api/v1/studies/{study['study_id']}/canary"
    assert client.post(url, json={"candidate": later}, headers=admin_headers()).status_code == 201
    assert client.get(url, headers=admin_headers()).json()["candidate"] == later
    kept = get(client, f"/loop/candidates/{candidate}")["canary"]
    assert kept == {**detail["canary"], "participants": kept["participants"]} and kept["state"] == "rolled_back"


def test_failed_gates_and_pipelines_and_the_newest_decisions(client: TestClient, object_store: ObjectStore) -> None:
    sessions = [f"s-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    candidate = register_candidate(object_store, sessions)
    loop = fresh_loop(object_store, System(object_store, client, sessions, candidate, BAD))
    for _ in range(3):
        loop.tick()
    state = loop.state()
    assert state.phase == "idle"
    # A later round whose pipeline failed, and one in progress whose candidate the gate has not judged yet.
    state.history.append({"at_ms": 1, "event": "pipeline failed", "phase": "idle", "pipeline_id": "pl-x"})
    state.history.append({"at_ms": 1, "event": "odd", "phase": "idle", "candidate": "no/such version"})
    state.history.append({"at_ms": 2, "event": "candidate trained", "phase": "gating", "candidate": "next-1"})
    state.phase, state.candidate, state.pipeline_id = "gating", "next-1", "pl-y"
    object_store.put_json(Bucket.MODELS, loop_records.LOOP_STATE_KEY, state.model_dump(mode="json"))

    view = get(client, "/loop")
    assert view["phase"] == "gating" and view["candidate"] == "next-1" and view["pipeline_id"] == "pl-y"
    assert [c["version"] for c in view["candidates"]] == ["next-1", "no/such version", candidate]
    pending, odd, failed = view["candidates"]
    assert odd["verdict"] is None
    assert pending["verdict"] is None and pending["pipeline_id"] == "pl-y"
    assert failed["latest_event"] == "gate failed" and failed["verdict"]["passed"] is False
    bad = [c for c in failed["verdict"]["checks"] if not c["passed"]]
    assert [c["name"] for c in bad] == ["knowledge_kept"] and bad[0]["estimate"] == -0.5
    gate_failed = next(e for e in view["history"] if e["event"] == "gate failed")
    assert gate_failed["numbers"]["failed_checks"] == ["knowledge_kept"]
    assert view["history"][2] == {
        "at_ms": 1,
        "event": "pipeline failed",
        "phase": "idle",
        "candidate": None,
        "pipeline_id": "pl-x",
        "studies": [],
        "numbers": {},
    }

    newest = get(client, "/loop?limit=2")
    assert [e["event"] for e in newest["history"]] == ["candidate trained", "odd"]
    assert newest["events"] == 7 and [c["version"] for c in newest["candidates"]] == ["next-1", "no/such version"]
    assert get(client, "/loop?limit=0", 400)["error"] == "invalid_input"

    # The candidate not judged yet (and not registered): its decisions and nothing more; its pipeline is unknown.
    detail = get(client, "/loop/candidates/next-1")
    assert detail["verdict"] is None and detail["registered"] is False and detail["pipeline"] is None
    assert [e["event"] for e in detail["history"]] == ["candidate trained"]

    # The rejected candidate stays registered but is never served: no study arm, no canary.
    assert get(client, f"/loop/candidates/{candidate}")["registered"] is True
    as_arm = client.post(
        "/api/v1/studies", json=study_spec(arms=[{"arm": candidate, "weight": 1}]), headers=admin_headers()
    )
    assert as_arm.status_code == 409 and "failed the evaluation gate" in as_arm.json()["detail"]
    assert "knowledge_kept" in as_arm.json()["detail"]
    study_id = create_study(client)["study_id"]
    canary = client.post(f"/api/v1/studies/{study_id}/canary", json={"candidate": candidate}, headers=admin_headers())
    assert canary.status_code == 409 and f"/loop/candidates/{candidate}" in canary.json()["detail"]


def test_a_damaged_state_is_a_clear_error(client: TestClient, object_store: ObjectStore) -> None:
    object_store.put_json(Bucket.MODELS, loop_records.LOOP_STATE_KEY, ["not", "a", "state"])
    body = get(client, "/loop", 409)
    assert body["error"] == "conflict" and "loop's state" in body["detail"]
    object_store.put_json(Bucket.MODELS, loop_records.LOOP_STATE_KEY, {"history": "nothing"})
    assert "not as the loop writes it" in get(client, "/loop", 409)["detail"]
    object_store.delete(Bucket.MODELS, loop_records.LOOP_STATE_KEY)


def test_the_loop_is_for_admins_only(client: TestClient) -> None:
    study = create_study(client)
    participant = join(client, study["study_id"])
    for path in ("/api/v1/loop", "/api/v1/loop/candidates/v1", "/api/v1/loop/pipelines/pl-1"):
        for headers in (participant.headers, bearer(token(["chat"], "someone"))):
            response = client.get(path, headers=headers)
            assert response.status_code == 403 and response.json()["error"] == "permission_denied"
        assert client.get(path).status_code == 401


def test_object_storage_down_is_a_503(
    make_client: MakeClient, redis_url: str, s3_settings: S3Settings, servers: Servers
) -> None:
    from emili_testing.plugin import free_port

    down = s3_settings.model_copy(update={"endpoint": f"127.0.0.1:{free_port()}", "max_attempts": 1})
    settings = gateway_settings(redis_url, down, servers)
    # Only the loop view is asked for: no background loop (a canary monitor, the withdrawal drainer) that would keep
    # calling the unreachable store, or another test's canaries, while the app shuts down.
    quiet = settings.gateway.model_copy(
        update={
            "canary": settings.gateway.canary.model_copy(update={"monitor": False}),
            "withdrawals": settings.gateway.withdrawals.model_copy(update={"drain": False}),
        }
    )
    client = make_client(settings.model_copy(update={"gateway": quiet}))
    body = get(client, "/loop", 503)
    assert body["error"] == "unavailable"


def test_the_researcher_page_has_the_loop_section(client: TestClient) -> None:
    page = client.get("/researcher").text
    for part in ('id="loop"', 'id="loop-status"', 'id="loop-history"', 'id="loop-candidates"', "canary-title"):
        assert part in page
    script = client.get("/static/researcher.js").text
    for part in ('"/loop"', "/loop/candidates/", "/loop/pipelines/", "train_sessions", "lineage_sessions"):
        assert part in script


def test_an_event_names_its_canarys_studies_as_the_loop_wrote_them() -> None:
    """Before a canary could span studies, the loop recorded one ``study_id``; both read as ``studies``."""
    from emili_gateway.loop_view import event_view

    assert event_view({"event": "canary started", "studies": ["st-a", "st-b"]}).studies == ["st-a", "st-b"]
    assert event_view({"event": "canary started", "study_id": "st-a"}).studies == ["st-a"]
    assert event_view({"event": "canary started", "studies": "st-a"}).studies == []  # Not as the loop writes it.
    assert "studies" not in event_view({"studies": ["st-a"], "sessions": 3}).numbers
