"""The loop's canary client (``emili_pipeline.loop_actions.SystemActions``) against the real gateway app.

The library may not import the gateway (import-linter), so the two meet only here: the gateway's app, on real Redis
and S3, served by uvicorn on a real socket, and the loop's actions calling it over HTTP with an admin token, as
``emili loop run`` does. Chat and FER are not running: canaries never call them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from emili_core.keys import model_registry_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import AuthSettings, S3Settings
from emili_gateway.app import create_app
from emili_gateway.settings import GatewaySettings
from emili_pipeline.loop import CanaryRefused, NoStudyForCanary
from emili_pipeline.loop_actions import SystemActions
from emili_testing.plugin import TEST_SECRET, free_port, token

pytestmark = pytest.mark.integration

LOOP_CONFIG = Path(__file__).resolve().parents[1] / "libs" / "pipeline" / "configs" / "ci.yaml"
UNKNOWN_STUDY = "st-ffffffffffff"


def _settings(redis_url: str, s3: S3Settings) -> GatewaySettings:
    auth = AuthSettings(secret=TEST_SECRET)  # type: ignore[arg-type]
    settings = GatewaySettings(env="test", redis_url=redis_url, s3=s3, auth=auth)
    base = settings.gateway
    unused = f"127.0.0.1:{free_port()}"
    options = base.model_copy(
        update={
            "chat_target": unused,
            "fer_target": unused,
            "server": base.server.model_copy(update={"metrics_port": 0}),
            # Keys of its own in the shared Redis; no monitor, so a running canary stays running while we look.
            # And studies of its own: a canary can span every study.
            "studies": base.studies.model_copy(
                update={
                    "redis_prefix": f"loop-canary-{uuid.uuid4().hex[:8]}",
                    "prefix": f"loop-canary-{uuid.uuid4().hex[:8]}",
                }
            ),
            "canary": base.canary.model_copy(update={"monitor": False}),
            "withdrawals": base.withdrawals.model_copy(update={"drain": False}),
        }
    )
    return settings.model_copy(update={"gateway": options})


@pytest.fixture
def gateway_url(redis_url: str, s3_settings: S3Settings) -> Iterator[str]:
    """The gateway app under uvicorn in a thread of this process; its URL once it accepts connections."""
    port = free_port()
    config = uvicorn.Config(
        create_app(_settings(redis_url, s3_settings)), host="127.0.0.1", port=port, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def register_model_version(store: ObjectStore, version: str) -> None:
    """A model version as the trainer registers it (the gateway only checks that it is registered and servable)."""
    store.put_bytes(Bucket.MODELS, f"adapters/{version}/adapter_config.json", b"{}")
    store.put_json(
        Bucket.MODELS, model_registry_key(version), {"version": version, "adapter_prefix": f"adapters/{version}/"}
    )


def admin_client(url: str) -> Callable[[], httpx.Client]:
    def make() -> httpx.Client:
        # As the loop's own factory: a fresh admin token for every call.
        return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token(['admin'], 'loop')}"}, timeout=10)

    return make


def test_the_loop_s_canary_calls_against_the_real_gateway(gateway_url: str, object_store: ObjectStore) -> None:
    gateway = admin_client(gateway_url)
    candidate, other = f"v-canary-{uuid.uuid4().hex[:6]}", f"v-other-{uuid.uuid4().hex[:6]}"
    register_model_version(object_store, candidate)
    register_model_version(object_store, other)
    actions = SystemActions(object_store, celery=None, pipeline_config=LOOP_CONFIG, gateway=gateway)

    def study(running: bool = True, **changes: object) -> str:
        spec = {"name": "Loop canary", "arms": [{"arm": "base"}], "consent_text": "You may stop at any time."}
        with gateway() as http:
            created = http.post("/api/v1/studies", json=spec | changes)
            assert created.status_code == 201, created.text
            study_id = str(created.json()["study_id"])
            if running:  # It takes new participants: an invite is left.
                assert http.post(f"/api/v1/studies/{study_id}/invites", json={}).status_code == 201
        return study_id

    # No running study yet (one nobody can join is not): the loop waits (no_study_for_canary), it does not give the
    # candidate up.
    study(running=False)
    with pytest.raises(NoStudyForCanary, match="HTTP 409 no study can take a canary"):
        actions.start_canary(candidate, "base", 0.2, None, False)
    first, second = study(), study()
    simulated = study(synthetic=True)

    # No canary yet: "missing" (the gateway's canary_not_found code), so the loop may start one.
    assert actions.canary_outcome(candidate) == "missing"
    # Refused by the gateway itself: final, the loop ends the round instead of asking again on every tick.
    with pytest.raises(CanaryRefused, match="HTTP 404"):
        actions.start_canary(candidate, "base", 0.2, [UNKNOWN_STUDY], False)
    with pytest.raises(CanaryRefused, match=r"HTTP 400 .*not a registered model version"):
        actions.start_canary("v-never-registered", "base", 0.2, None, False)
    # The version the loop's gate judged against serves no arm of a named study: no canary against something else.
    with pytest.raises(CanaryRefused, match=r"HTTP 400 'v-judged-against' serves no arm"):
        actions.start_canary(candidate, "v-judged-against", 0.2, [first], False)

    # By default, every running people's study that base serves (not the closed one): one experiment.
    assert sorted(actions.start_canary(candidate, "base", 0.2, None, False)) == sorted([first, second])
    with gateway() as http:
        shown = http.get(f"/api/v1/canaries/{candidate}").json()
        in_first = http.get(f"/api/v1/studies/{first}/canary").json()
    assert (shown["candidate"], shown["production"], shown["state"]) == (candidate, "base", "running")
    assert sorted(in_first["studies"]) == sorted([first, second]) and in_first["share"] == 0.2
    assert actions.canary_outcome(candidate) == "running"
    assert actions.canary_outcome(other) == "missing"
    # Every people's study runs a canary now; the simulated one is not the loop's to take.
    with pytest.raises(NoStudyForCanary):
        actions.start_canary(other, "base", 0.2, None, False)
    with pytest.raises(CanaryRefused, match=rf"HTTP 409 .*already runs a canary of {candidate}"):
        actions.start_canary(other, "base", 0.2, [first], False)
    # A candidate that learned from simulated sessions runs only in studies of simulated participants.
    with pytest.raises(CanaryRefused, match=rf"HTTP 400 study {first} is people's"):
        actions.start_canary(other, "base", 0.2, [first], True)
    assert actions.start_canary(other, "base", 0.2, None, True) == [simulated]

    with gateway() as http:
        assert http.post(f"/api/v1/canaries/{candidate}/rollback").status_code == 200
        stopped = [http.get(f"/api/v1/studies/{s}/canary").json()["state"] for s in (first, second)]
    assert stopped == ["rolled_back", "rolled_back"] and actions.canary_outcome(candidate) == "rolled_back"
    # Another version's canary becomes a study's newest before the loop looks again: ours is still found
    # (decided), never taken for one that never started (which the loop would start, and the gateway refuse).
    with gateway() as http:
        assert http.post(f"/api/v1/studies/{simulated}/canary/rollback").status_code == 200
    assert actions.start_canary(other, "base", 0.2, [first], False) == [first]
    assert actions.canary_outcome(other) == "running"  # Its newest experiment, not the simulated study's.
    assert actions.canary_outcome(candidate) == "rolled_back"
    with gateway() as http:
        bad = http.get("/api/v1/canaries/v%20x")
        assert bad.status_code == 400, bad.text
