"""``emili loop demo``'s pieces without a stack: the demo study over a fake gateway, the policy copy, decisions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from emili_pipeline.loop import LoopPolicy, LoopState, load_loop_policy
from emili_pipeline.loop_cli import DEMO_POLICY, load_policy
from emili_pipeline.loop_demo import STUDY_NAME, decision_after, ensure_demo_study, write_runtime_policy


class FakeGateway:
    """The admin API's studies and invites; ``synthetic`` False: a gateway whose StudySpec has no such field."""

    def __init__(self, synthetic: bool) -> None:
        self.synthetic = synthetic
        self.studies: list[dict[str, Any]] = []
        self.invites: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/api/v1")
        if request.method == "GET" and path == "/studies":
            return httpx.Response(200, json={"studies": self.studies})
        if request.method == "POST" and path == "/studies":
            spec = json.loads(request.content)
            if "synthetic" in spec and not self.synthetic:
                detail = "synthetic: Extra inputs are not permitted"
                return httpx.Response(400, json={"error": "invalid_input", "detail": detail})
            self.studies.append({**spec, "study_id": f"st-{len(self.studies)}"})
            return httpx.Response(201, json=self.studies[-1])
        if path.endswith("/invites"):
            if request.method == "GET":
                return httpx.Response(200, json={"invites": self.invites})
            invite = {"code": f"code{len(self.invites)}", "uses": 0, "max_uses": 100_000, "expires_ms": 2**42}
            self.invites.append(invite)
            return httpx.Response(201, json={"invites": [invite]})
        return httpx.Response(404, json={"detail": "no such route"})


async def test_the_demo_study_is_synthetic_and_reused() -> None:
    fake = FakeGateway(synthetic=True)
    async with httpx.AsyncClient(base_url="http://gw", transport=httpx.MockTransport(fake)) as http:
        first = await ensure_demo_study(http, "base")
        second = await ensure_demo_study(http, "base")
    assert first is not None and second is not None
    assert (first.reused, second.reused) == (False, True)
    assert second.study_id == first.study_id and second.invite_code == first.invite_code
    assert fake.studies[0]["synthetic"] is True and fake.studies[0]["name"] == STUDY_NAME
    assert [a["arm"] for a in fake.studies[0]["arms"]] == ["base"]


async def test_no_demo_study_where_the_gateway_cannot_record_sessions_synthetic() -> None:
    fake = FakeGateway(synthetic=False)
    async with httpx.AsyncClient(base_url="http://gw", transport=httpx.MockTransport(fake)) as http:
        assert await ensure_demo_study(http, "base") is None
    assert fake.studies == [] and fake.invites == []


@pytest.mark.parametrize("path", [DEMO_POLICY, DEMO_POLICY.with_name("loop-demo-canary-policy.yaml")])
def test_the_demo_policy_is_a_small_enabled_one_and_its_copy_names_the_study(path: Path, tmp_path: Path) -> None:
    policy = load_policy(path)
    assert policy.enabled and policy.include_synthetic and policy.min_new_sessions <= 10
    assert policy.study_id == "" and policy.gate.is_file() and policy.pipeline.is_file()
    copy = load_loop_policy(write_runtime_policy(policy, "st-1", tmp_path / "run" / "policy.yaml"))
    assert copy == policy.model_copy(update={"study_id": "st-1"})


def test_the_decision_is_the_first_closing_event_since_the_start() -> None:
    state = LoopState(
        history=[
            {"at_ms": 10, "event": "gate failed", "candidate": "old"},
            {"at_ms": 20, "event": "enough new sessions"},
            {"at_ms": 30, "event": "canary started", "candidate": "new"},
            {"at_ms": 40, "event": "canary promoted", "candidate": "new"},
        ]
    )
    assert decision_after(state, 15) == state.history[3]
    assert decision_after(state, 5) == state.history[0]
    assert decision_after(state, 50) is None
    assert decision_after(LoopState(), 0) is None


@pytest.mark.parametrize("path", [DEMO_POLICY, DEMO_POLICY.with_name("loop-demo-canary-policy.yaml")])
def test_the_shipped_demo_policy_says_it_is_a_demo(path: Path) -> None:
    assert "FOR A DEMO, NOT AN EXPERIMENT" in path.read_text()
    assert isinstance(load_loop_policy(path), LoopPolicy)
