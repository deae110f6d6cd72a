"""A participant takes part in a study in a real browser, against the real local stack.

Every part is the real one: FER (ONNX model), chat (SmolLM2 offline) and its worker, the gateway, Redis and the S3
server each run as their own process; Debian's Chromium, driven by selenium, sees the sample face photo through
its fake camera (a .y4m clip). The stored session must then hold what the person did. Screenshots of every page
go to ``var/test-artifacts/browser/`` (CI keeps them as artefacts).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import REPO_ROOT
from emili_testing.plugin import EntryPointProcess, Stack, free_port, token
from emili_testing.traces import objects_naming, redis_mentions

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FACE = REPO_ROOT / "var" / "artifacts" / "samples" / "face_640x480.jpg"
SCREENSHOTS = REPO_ROOT / "var" / "test-artifacts" / "browser"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromium-driver (make setup)"),
]


def write_y4m(photo: Path, target: Path, frames: int = 10) -> Path:
    """Chromium's fake camera plays a YUV4MPEG2 clip: here the still photo, repeated."""
    image = cv2.imread(str(photo))
    height, width = image.shape[:2]
    planes = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420).tobytes()
    with target.open("wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F5:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(frames):
            out.write(b"FRAME\n" + planes)
    return target


@dataclass
class LocalStack:
    url: str
    fer_target: str
    processes: dict[str, EntryPointProcess]

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.tail(1500)}" for name, p in self.processes.items())


def _grpc_serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _wait(check: Callable[[], bool], what: str, stack: LocalStack, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        dead = [name for name, p in stack.processes.items() if not p.alive()]
        assert not dead and time.monotonic() < deadline, f"{what} not ready (exited: {dead})\n{stack.logs()}"
        time.sleep(1)


@pytest.fixture(scope="module")
def local_stack(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    logs = tmp_path_factory.mktemp("stack-logs")
    fer_port, chat_port, http_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        **stack.env(),
        "OMP_WAIT_POLICY": "PASSIVE",
        "EMILI_FER__SERVER__GRPC_PORT": str(fer_port),
        "EMILI_FER__SERVER__METRICS_PORT": "0",
        "EMILI_CHAT__SERVER__GRPC_PORT": str(chat_port),
        "EMILI_CHAT__SERVER__METRICS_PORT": "0",
        "EMILI_CHAT__WORKER__METRICS_PORT": "0",
        "EMILI_CHAT__FER_TARGET": f"127.0.0.1:{fer_port}",
        "EMILI_CHAT__LLM__MAX_NEW_TOKENS": "24",  # Short replies keep two turns on 2 cores under a minute.
        "EMILI_LABELER__WORKER__METRICS_PORT": "0",
        "EMILI_GATEWAY__SERVER__HTTP_PORT": str(http_port),
        "EMILI_GATEWAY__SERVER__METRICS_PORT": "0",
        "EMILI_GATEWAY__CHAT_TARGET": f"127.0.0.1:{chat_port}",
        "EMILI_GATEWAY__FER_TARGET": f"127.0.0.1:{fer_port}",
    }
    names = (
        "emili-fer-server",
        "emili-chat-server",
        "emili-chat-worker",
        "emili-labeler-worker",
        "emili-gateway-server",
    )
    processes = {name: EntryPointProcess(name, env, logs / f"{name}.log") for name in names}
    local = LocalStack(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{fer_port}", processes)
    try:
        _wait(lambda: _grpc_serving(local.fer_target), "FER", local)

        def gateway_ready() -> bool:
            try:
                return httpx.get(f"{local.url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait(gateway_ready, "the gateway (and chat behind it)", local)
        yield local
    finally:
        for process in processes.values():
            process.stop()


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
        # The machine has no route out: without these Chromium keeps trying to reach Google's hosts.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=412,915",  # A phone-sized window: the pages must work there.
        "--use-fake-ui-for-media-stream",  # Grants the camera without a prompt.
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={write_y4m(FACE, tmp_path / 'face.y4m')}",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


class Participant:
    """Drives the participant app by its element ids and keeps a screenshot of every screen it reaches."""

    def __init__(self, driver: Any, name: str) -> None:
        self.driver, self.name, self.shots = driver, name, 0
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def until(self, script: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.driver.execute_script(f"return ({script});")
            except Exception:  # The page is still loading; selenium raises JavascriptException then.
                value = None
            if value:
                return value
            time.sleep(0.2)
        errors = self.driver.execute_script(
            "return [...document.querySelectorAll('.error, .status')].map(n => n.textContent)"
        )
        self.screenshot("timeout")
        raise AssertionError(f"timed out waiting for {script}; messages on the page: {errors}")

    def screen(self, name: str) -> None:
        self.until(f"!document.getElementById('screen-{name}').hidden")
        self.screenshot(name)

    def screenshot(self, label: str) -> None:
        self.shots += 1
        self.driver.save_screenshot(str(SCREENSHOTS / f"{self.name}-{self.shots:02d}-{label}.png"))

    def click(self, element_id: str) -> None:
        from selenium.webdriver.common.by import By

        self.until(f"document.getElementById('{element_id}') && !document.getElementById('{element_id}').disabled")
        self.driver.find_element(By.ID, element_id).click()

    def type(self, element_id: str, text: str) -> None:
        from selenium.webdriver.common.by import By

        field = self.driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(text)


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {token(['admin'], 'researcher')}"}


def _stored_session(store: ObjectStore, session_id: str, timeout: float = 90) -> tuple[dict[str, Any], list[Any]]:
    key = f"{session_id}/session.json"
    deadline = time.monotonic() + timeout
    while not store.exists(Bucket.SESSIONS, key):
        assert time.monotonic() < deadline, "the chat worker never stored the session record"
        time.sleep(1)
    events = store.get_bytes(Bucket.SESSIONS, f"{session_id}/events.jsonl").decode().splitlines()
    return store.get_json(Bucket.SESSIONS, key), [json.loads(line) for line in events]


def test_a_participant_takes_part_then_withdraws(
    local_stack: LocalStack, browser: Any, object_store: ObjectStore, redis_url: str
) -> None:
    base = local_stack.url
    spec = {
        "name": "Browser study",
        "arms": [{"arm": "base", "weight": 1}],
        "consent_text": "You will chat with an AI for a few minutes. You may stop at any time.",
        "max_turns": 2,
    }
    study = httpx.post(f"{base}/api/v1/studies", json=spec, headers=admin(), timeout=30)
    assert study.status_code == 201, study.text
    study_id = study.json()["study_id"]
    invite = httpx.post(f"{base}/api/v1/studies/{study_id}/invites", json={}, headers=admin(), timeout=30)
    link = invite.json()["invites"][0]["url"]

    person = Participant(browser, "participant")
    browser.get(link)
    person.screen("invite")
    person.click("invite-submit")

    person.screen("consent")
    for box in ("consent-agree", "consent-camera", "consent-store-frames", "consent-training"):
        person.click(box)
    person.click("consent-continue")

    person.screen("camera")
    person.until("document.getElementById('face-status').textContent === 'Face found'", timeout=60)
    person.screenshot("face-found")
    person.click("camera-continue")

    person.screen("pre-survey")
    person.click("pre-current-tired")
    person.click("pre-desired-hopeful")
    person.type("pre-survey-text", "A long week at work, I feel tired.")
    person.click("pre-survey-submit")

    person.screen("chat")
    person.until("document.getElementById('chat-status').textContent === 'Connected'")
    time.sleep(3)  # About one frame a second reaches FER through chat before the first message.
    for turn, text in enumerate(("Hello EMILI", "It was a long week"), 1):
        person.type("chat-input", text)
        person.click("send")
        person.until(
            f"document.querySelectorAll('.msg.assistant').length >= {turn} && "
            "[...document.querySelectorAll('.msg.assistant .text')].pop().textContent.trim().length > 0",
            timeout=180,
        )
        person.screenshot(f"turn-{turn}")
    person.until("!document.getElementById('chat-limit').hidden")
    person.click("chat-finish")

    person.screen("post-survey")
    person.click("post-current-happy")
    person.type("post-survey-text", "Lighter now, thank you.")
    person.click("post-survey-submit")

    person.screen("rating")
    for choice in ("rating-empathy-4", "rating-relevance-5", "rating-fluency-3"):
        person.click(choice)
    person.type("rating-comment", "Kind replies.")
    person.click("rating-submit")

    person.screen("thanks")
    withdraw_code = person.until("document.getElementById('withdraw-code').textContent")

    export = httpx.get(f"{base}/api/v1/studies/{study_id}/export", headers=admin(), timeout=60).text
    (row,) = [json.loads(line) for line in export.splitlines()]
    manifest, events = _stored_session(object_store, row["session_id"])
    kinds = [e["kind"] for e in events]
    readings = [e for e in events if e["kind"] == "fer_reading"]
    assert readings and any(r["face_found"] for r in readings), "no FER reading found the face"
    pre = next(e for e in events if e["kind"] == "pre_survey")
    post = next(e for e in events if e["kind"] == "post_survey")
    assert pre["current_feelings"] == ["Tired"] and pre["desired_feelings"] == ["Hopeful"]
    assert pre["text"] == "A long week at work, I feel tired."
    assert post["current_feelings"] == ["Happy"] and post["text"] == "Lighter now, thank you."
    rating = next(e for e in events if e["kind"] == "rating")
    assert (rating["empathy"], rating["relevance"], rating["fluency"]) == (4, 5, 3)
    assert kinds.count("user_message") == 2 and kinds.count("assistant_message") >= 2
    assert manifest["store_frames"] is True and manifest["use_for_training"] is True and not manifest["synthetic"]
    assert manifest["model_arm"] == "base" == row["arm"]
    assert row["consent"] == {"camera": True, "store_frames": True, "use_for_training": True}
    assert object_store.list_keys(Bucket.FRAMES, f"{row['session_id']}/frames/"), "consented frames not stored"

    # Later the person withdraws with their code, on the withdrawal page: nothing of theirs may be left.
    session_id = row["session_id"]
    browser.get(f"{base}/withdraw")
    person.screen("withdraw")
    person.type("withdraw-input", withdraw_code)
    person.click("withdraw-submit")
    try:
        done = person.until(
            "document.getElementById('withdraw-status').textContent.includes('Deleted:') && "
            "document.getElementById('withdraw-status').textContent",
            timeout=300,  # The labeler worker forgets the session's labels and datasets too.
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{local_stack.logs()}") from None
    person.screenshot("withdrawn")
    assert "1 conversation" in done and "stored face image" in done, done
    assert redis_mentions(redis.Redis.from_url(redis_url), session_id) == []
    assert objects_naming(object_store, session_id) == [f"sessions/tombstones/{session_id}.json"]
    export = httpx.get(f"{base}/api/v1/studies/{study_id}/export", headers=admin(), timeout=60).text
    assert session_id not in export
