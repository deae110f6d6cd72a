"""The researchers' page in a real browser (Debian's headless Chromium, driven by selenium) against the gateway as
its own process: the automatic loop's section lists the decisions newest first and traces one to the gate's
numbers, its pipeline's training and held-out sessions, the version's lineage and its canary in the study.
Screenshots go to ``var/test-artifacts/browser/`` (CI keeps them as artefacts)."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from emili_core.keys import model_registry_key, pipeline_state_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import REPO_ROOT
from emili_session import loop_records
from emili_testing.plugin import token

from .conftest import GatewayProcess, register_model_version

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = REPO_ROOT / "var" / "test-artifacts" / "browser"
TOKEN_KEY = "emili-researcher-token"  # researcher.js keeps the admin token there.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromium-driver (make setup)"),
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1600",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver: Any, script: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = driver.execute_script(f"return ({script});")
        except Exception:  # Still loading: selenium raises JavascriptException then.
            value = None
        if value:
            return value
        time.sleep(0.1)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / "researcher-loop-timeout.png"))
    messages = driver.execute_script("return [...document.querySelectorAll('.error, .status')].map(n => n.textContent)")
    raise AssertionError(f"timed out waiting for {script}; messages on the page: {messages}")


def check(name: str, passed: bool, estimate: float | None, ci: list[float] | None, n: int) -> dict[str, Any]:
    reason = "worst plausible loss 0.01 within the margin 0.02" if passed else "not enough evidence: 3 items"
    fields = {"name": name, "metric": name, "kind": "non_inferior", "passed": passed, "n": n}
    return fields | {"estimate": estimate, "ci": ci, "reason": reason}


def test_the_loop_section_traces_a_decision(
    gateway_process: GatewayProcess, object_store: ObjectStore, browser: Any
) -> None:
    base, admin = gateway_process.url, {"Authorization": f"Bearer {token(['admin'], 'researcher')}"}
    spec = {"name": "Loop study", "arms": [{"arm": "base"}], "consent_text": "You will chat with an AI."}
    study = httpx.post(f"{base}/api/v1/studies", json=spec, headers=admin, timeout=30).json()
    study_id = study["study_id"]
    second = httpx.post(f"{base}/api/v1/studies", json=spec, headers=admin, timeout=30).json()["study_id"]
    passed, failed = f"cand-{uuid.uuid4().hex[:8]}", f"cand-{uuid.uuid4().hex[:8]}"
    train, heldout = ["s-train-1", "s-train-2", "s-train-3"], ["s-held-1"]
    for version in (passed, failed):
        register_model_version(object_store, version)
    entry = object_store.get_json(Bucket.MODELS, model_registry_key(passed))
    lineage = {"datasets": [{"id": "ds-sft", "kind": "sft"}], "sessions": train, "parents": []}
    object_store.put_json(Bucket.MODELS, model_registry_key(passed), entry | {"lineage": lineage})
    pipeline = {"pipeline_id": "pl-browser", "sessions": sorted(train + heldout), "train_sessions": train}
    pipeline |= {"heldout_sessions": heldout, "created_ms": 1, "steps": {"sft": {"state": "done"}}}
    object_store.put_json(Bucket.MODELS, pipeline_state_key("pl-browser"), pipeline)
    verdict = {"policy": "default", "decided_ms": 5_000, "version": passed, "pipeline_id": "pl-browser", "sessions": 4}
    signal = check("feedback_predicts_surveys", True, 0.406, None, 72) | {"kind": "associated", "p_value": 0.0005}
    object_store.put_json(
        Bucket.MODELS,
        loop_records.gate_key(passed),
        verdict | {"passed": True, "checks": [check("knowledge_kept", True, -0.004, [-0.012, 0.003], 120), signal]},
    )
    object_store.put_json(
        Bucket.MODELS,
        loop_records.gate_key(failed),
        verdict | {"version": failed, "passed": False, "checks": [check("delta_v_not_worse", False, None, None, 3)]},
    )
    both = {"candidate": passed, "production": "base", "studies": [study_id, second]}
    started = httpx.post(f"{base}/api/v1/canaries", json=both, headers=admin)
    assert started.status_code == 201, started.text
    history = [  # An older round whose candidate failed the gate, then one whose candidate runs as a canary.
        {"at_ms": 500, "event": "gate failed", "phase": "idle", "candidate": failed, "failed_checks": ["delta_v"]},
        {"at_ms": 1_000, "event": "enough new sessions", "phase": "training", "new_sessions": 4, "sessions": 4},
        {"at_ms": 2_000, "event": "pipeline started", "phase": "training", "pipeline_id": "pl-browser"},
        {"at_ms": 3_000, "event": "candidate trained", "phase": "gating", "candidate": passed},
        {"at_ms": 5_000, "event": "gate passed", "phase": "canary", "candidate": passed},
        {
            "at_ms": 6_000,
            "event": "canary started",
            "phase": "canary",
            "candidate": passed,
            "studies": [study_id, second],
        },
    ]
    state = {"phase": "canary", "pipeline_id": "pl-browser", "candidate": passed, "sessions": train + heldout}
    object_store.put_json(Bucket.MODELS, loop_records.LOOP_STATE_KEY, state | {"history": history})

    try:
        browser.get(f"{base}/researcher")
        admin_token = admin["Authorization"].removeprefix("Bearer ")
        browser.execute_script(f"sessionStorage.setItem('{TOKEN_KEY}', arguments[0]); location.reload();", admin_token)
        rows = until(
            browser,
            "document.querySelectorAll('#loop-history tbody tr').length === 6 && "
            "[...document.querySelectorAll('#loop-history tbody tr')].map(r => r.textContent)",
        )
        assert "canary started" in rows[0] and "gate failed" in rows[5] and "failed checks: delta_v" in rows[5]
        status = browser.execute_script("return document.getElementById('loop-status').textContent")
        assert "running a canary" in status and passed in status and "6 decisions" in status
        cards = browser.execute_script(
            "return [...document.querySelectorAll('details.loop-candidate > summary')].map(s => s.textContent)"
        )
        assert cards[0].startswith(f"{passed}: gate passed") and cards[1].startswith(f"{failed}: gate failed")

        # A decision leads to its candidate: the verdict's numbers, then the sessions behind it and the canary.
        browser.execute_script("[...document.querySelectorAll('#loop-history tbody tr')][0].querySelector('a').click()")
        card = f"document.getElementById('loop-candidate-{passed}')"
        until(browser, f"{card}.open && {card}.querySelectorAll('.session-ids li').length === 7")
        text = browser.execute_script(f"return {card}.textContent")
        for part in (
            "knowledge_kept",
            "-0.004",
            "[-0.012, 0.003]",
            "120",
            "within the margin",
            "s-held-1",
            "ds-sft",
            "feedback_predicts_surveys",
            "associated",
            "0.406",
            "p = 0.0005",
        ):
            assert part in text, part
        assert f"Canary in studies {study_id}, {second}: running" in text
        links = browser.execute_script(
            f"return [...{card}.querySelectorAll('.canary-trace a')].map(a => a.getAttribute('href'))"
        )
        assert links == [f"#canary-{study_id}", f"#canary-{second}"]
        until(browser, f"document.getElementById('canary-{study_id}')")  # The study cards they link to.
        # Each study's card says its canary is one experiment with the other's.
        status = until(
            browser,
            f"document.getElementById('study-{second}').querySelector('.canary-status').textContent"
            ".includes('One experiment') && "
            f"document.getElementById('study-{second}').querySelector('.canary-status').textContent",
        )
        assert f"One experiment with its canary in {study_id}" in status
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "researcher-loop-candidate.png"))

        # A pipeline decision opens onto its sessions too.
        browser.execute_script(
            "const d = [...document.querySelectorAll('#loop-history tbody tr')][3].querySelector('details');"
            "d.open = true;"
        )
        sessions = until(
            browser,
            "[...document.querySelectorAll('#loop-history details.loop-pipeline .session-ids li')]"
            ".map(li => li.textContent).join(' ')",
        )
        assert sessions == "s-train-1 s-train-2 s-train-3 s-held-1"
        browser.save_screenshot(str(SCREENSHOTS / "researcher-loop-pipeline.png"))

        # Its canary decided (its numbers in its durable records, one per study, as a look writes them), then a later
        # candidate's canary became both studies' newest: the candidate's own numbers still show in its trace.
        assert httpx.post(f"{base}/api/v1/studies/{study_id}/canary/rollback", headers=admin).status_code == 200
        look = {"outcome": "rating", "n_candidate": 12, "n_production": 31, "difference": -0.917, "p_harm": 0.0042}
        look |= {"ci": [-1.6, -0.2], "lower_bound": -1.4}
        behind = {"candidate": ["s-canary-c1", "s-canary-c2"], "production": ["s-canary-p1"]}
        for each in (study_id, second):
            record = f"studies/{each}/canaries/{started.json()['started_ms']}-{passed}.json"
            decided = object_store.get_json(Bucket.SESSIONS, record)
            object_store.put_json(Bucket.SESSIONS, record, decided | {"looks": [look], "sessions": behind})
        later = f"cand-{uuid.uuid4().hex[:8]}"
        register_model_version(object_store, later)
        both_later = {"candidate": later, "production": "base", "studies": [study_id, second]}
        again = httpx.post(f"{base}/api/v1/canaries", json=both_later, headers=admin)
        assert again.status_code == 201, again.text
        browser.execute_script("location.reload();")
        until(browser, card)
        browser.execute_script(f"{card}.open = true;")
        numbers = until(browser, f"{card}.querySelector('.canary-looks')?.textContent")
        for part in ("rating", "12 / 31", "-0.917", "0.0042"):
            assert part in numbers, part
        assert "rolled back" in browser.execute_script(f"return {card}.querySelector('.canary-trace').textContent")
        # ...and the sessions its decision rests on, per arm.
        canary_ids = browser.execute_script(
            f"return [...{card}.querySelectorAll('.session-list')].slice(-2)"
            ".map(d => d.querySelector('summary').textContent + ': ' +"
            " [...d.querySelectorAll('li')].map(li => li.textContent).join(' '))"
        )
        assert canary_ids == [
            f"Canary sessions of the candidate ({passed}) (2): s-canary-c1 s-canary-c2",
            "Canary sessions of the production arm (base) (1): s-canary-p1",
        ]
    finally:
        for each in (study_id, second):
            httpx.post(f"{base}/api/v1/studies/{each}/canary/rollback", headers=admin, timeout=30)
        object_store.delete(Bucket.MODELS, loop_records.LOOP_STATE_KEY)
