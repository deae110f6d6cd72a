"""Property-based fuzzing of every operation in the OpenAPI schema (schemathesis, offline, in-process ASGI):
whatever the input, the gateway answers with a documented JSON error or success, never a 500.

Generated path ids are mostly nonsense, which only exercises the 404 path; so half the cases get a real
study, session or invite id, and each case goes with the token its route needs, to reach the code behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.python import asgi

from emili_core.settings import S3Settings
from emili_gateway.app import create_app
from emili_gateway.settings import GatewaySettings

from .conftest import MakeClient, Servers, admin_headers, create_invite, create_study, gateway_settings, join

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class Fuzzing:
    admin: dict[str, str]
    participant: dict[str, str]
    ids: dict[str, str]

    def prepare(self, case: Any) -> dict[str, str]:
        """Real ids for half the cases (chosen from the case's own data, so a failing example replays), and the
        token the route needs: admin for researchers' routes, the participant's for the rest."""
        seed = hashlib.sha256(repr((case.path_parameters, case.query, case.body)).encode()).digest()[0]
        if seed % 2 == 0 and case.path_parameters:
            for name in case.path_parameters:
                if name in self.ids:
                    case.path_parameters[name] = self.ids[name]
        path = case.operation.path
        if path.startswith("/api/v1/studies"):
            return self.admin
        if path.startswith(("/api/v1/invites", "/api/v1/withdraw")) or seed % 7 == 0:
            return {}
        return self.participant


@pytest.fixture
def fuzzing(make_client: MakeClient) -> Fuzzing:
    client = make_client()
    study = create_study(client, show_readouts=True)
    joined = join(client, study["study_id"])
    session = client.post(
        "/api/v1/sessions", json={"consent": {"agree": True, "camera": True}}, headers=joined.headers
    ).json()
    invite = create_invite(client, study["study_id"], max_uses=100000)
    ids = {"study_id": study["study_id"], "session_id": session["session_id"], "code": invite}
    # Its own admin subject: the fuzzer's hundreds of calls must not use up the per-admin rate limit of the
    # tests after it (the limit is counted in Redis, which they share).
    return Fuzzing(admin_headers("fuzzer"), joined.headers, ids)


@pytest.fixture
def gateway_app(redis_url: str, s3_settings: S3Settings, servers: Servers) -> Iterator[Any]:
    yield create_app(gateway_settings(redis_url, s3_settings, servers, admin_requests_per_minute=100000))
    asgi.shutdown_lifespans()


# The schema does not depend on settings, so it is read from an app made with the defaults; the cases are sent
# to the fixture's app (real Redis, S3 and chat). (schemathesis' lazy fixture loader fails under pytest 9.)
schema = schemathesis.openapi.from_dict(create_app(GatewaySettings()).openapi())


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_server_error(case: Any, fuzzing: Fuzzing, gateway_app: Any) -> None:
    headers = fuzzing.prepare(case)
    response = case.call(headers=headers, app=gateway_app)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error", "detail"} and body["detail"], body
