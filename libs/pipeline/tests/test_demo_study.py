"""The demo study after `emili pipeline run`: its arms, and a run that never fails for want of a gateway.
(Creating and reusing the study against a real gateway: services/gateway/tests/test_cli.py.)"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from emili_pipeline import cli
from emili_pipeline.study import StudyUnavailable, demo_arms, ensure_demo_study
from emili_testing.plugin import free_port


def state(**versions: str) -> dict[str, Any]:
    return {"steps": {step: {"state": "done", "outputs": {"model_version": v}} for step, v in versions.items()}}


def test_the_demo_arms_are_base_and_the_dpo_else_the_sft_version() -> None:
    assert demo_arms(state(sft="v-sft", dpo="v-dpo")) == ["base", "v-dpo"]
    assert demo_arms(state(sft="v-sft", dpo="")) == ["base", "v-sft"]
    assert demo_arms(state()) == ["base"]


def test_an_unreachable_gateway_is_a_reason_not_a_crash() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with httpx.Client(base_url=url) as http, pytest.raises(StudyUnavailable, match="is not reachable"):
        ensure_demo_study(http, ["base"])


def test_a_refusing_gateway_is_named_with_its_message() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "unauthenticated", "detail": "the token has expired"})

    http = httpx.Client(base_url="http://gw", transport=httpx.MockTransport(refuse))
    with http, pytest.raises(StudyUnavailable, match="answered 401: the token has expired"):
        ensure_demo_study(http, ["base"])


def test_the_run_prints_why_there_is_no_demo_study(monkeypatch: pytest.MonkeyPatch) -> None:
    printed: list[str] = []
    monkeypatch.setattr(cli.console, "print", lambda text, *a, **k: printed.append(str(text)))
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(cli, "_gateway_client", lambda: (httpx.Client(base_url=url), {"participant app": url}))
    cli._print_demo_study(state(sft="v-sft"))
    (line,) = printed
    assert line.startswith("[yellow]no demo study for people to try: the gateway at") and "not reachable" in line

    def broken() -> Any:
        raise RuntimeError("surprise")

    printed.clear()
    monkeypatch.setattr(cli, "_gateway_client", broken)
    cli._print_demo_study(state())
    assert printed == ["[yellow]no demo study for people to try: RuntimeError: surprise[/yellow]"]
