"""Simulated participants that take part in a gateway study exactly as a person does in the web app.

The user model is the simulator's own (:class:`~emili_pipeline.simulator.user.SimulatedUser`: persona, hidden
state, face, surveys, ratings); only the transport differs from :func:`~emili_pipeline.simulator.run.run_user`,
which talks to chat's gRPC API directly. Here every step goes through the gateway's participant API, over HTTP
and the conversation WebSocket, as ``web/app.js`` does: redeem the invite, (camera check), create the session
with consent, pre-chat survey, ``/sessions/{id}/converse`` (auth message, user messages, face frames as JPEG),
post-chat survey, ratings, end. So the gateway allocates the participant an arm, canary included, like anyone.

Simulated data must never pass for people's: a participant takes part only in a study that records its sessions
as synthetic (the study the invite leads to says ``"synthetic": true``); any other study is refused with
:class:`NotSynthetic` before a session exists.

Only HTTP and WebSocket: this library imports no gateway code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import cv2
import httpx
import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from emili_pipeline.simulator.faces import FaceSet
from emili_pipeline.simulator.personas import Persona
from emili_pipeline.simulator.run import SessionOutcome, SimulatorSettings, TurnTracker, _state
from emili_pipeline.simulator.state import ReplyScorer, reply_quality
from emili_pipeline.simulator.surveys import SurveyAnswers
from emili_pipeline.simulator.user import SimulatedUser

log = logging.getLogger(__name__)

API = "/api/v1"
# The web app's frame rate limit is the gateway's (2/s by default); faster frames are dropped there anyway.
MAX_FRAMES_PER_SECOND = 2.0


class NotSynthetic(Exception):
    """The study does not record its sessions as synthetic: a simulated participant must not take part."""


class GatewayCallFailed(Exception):
    """A participant API call failed; the message names the step and the gateway's answer."""


def require_synthetic(study: Mapping[str, Any]) -> None:
    """Refuse a study that would record a simulated participant's sessions as a person's."""
    if study.get("synthetic") is not True:
        raise NotSynthetic(
            f"study {study.get('study_id', '?')} does not record its sessions as synthetic; simulated participants "
            "take part only in studies created with synthetic: true"
        )


def websocket_url(base_url: httpx.URL | str, session_id: str) -> str:
    url = httpx.URL(str(base_url))
    scheme = "wss" if url.scheme == "https" else "ws"
    return str(url.copy_with(scheme=scheme, path=f"{url.path.rstrip('/')}{API}/sessions/{session_id}/converse"))


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", ""))[:300]
    except (ValueError, AttributeError):
        return response.text[:300]


async def _call(http: httpx.AsyncClient, step: str, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = await http.request(method, f"{API}{path}", **kwargs)
    except httpx.HTTPError as exc:
        raise GatewayCallFailed(f"{step}: the gateway cannot be reached ({type(exc).__name__}: {exc})") from None
    if not response.is_success:
        raise GatewayCallFailed(f"{step}: HTTP {response.status_code} {_detail(response)}")
    return response.json()


def _offered(answers: SurveyAnswers, study: Mapping[str, Any]) -> dict[str, Any]:
    """The survey as the web app sends it: a person can only tick the feelings the study offers."""
    current = set(study.get("current_feelings") or answers.current_feelings)
    desired = set(study.get("desired_feelings") or answers.desired_feelings)
    return {
        "current_feelings": [f for f in answers.current_feelings if f in current],
        "desired_feelings": [f for f in answers.desired_feelings if f in desired],
        "text": answers.text,
    }


def _jpeg(image: bytes) -> bytes:
    """The gateway takes JPEG frames only (a browser's canvas.toBlob): a PNG of a face folder is re-encoded."""
    if image.startswith(b"\xff\xd8"):
        return image
    decoded = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
    ok, encoded = (False, None) if decoded is None else cv2.imencode(".jpg", decoded)
    if not ok or encoded is None:
        raise ValueError("a face image could not be encoded as JPEG")
    return bytes(encoded.tobytes())


class _Conversation:
    """One WebSocket conversation: the turn driver, a face loop and a reader of the gateway's messages."""

    def __init__(
        self,
        ws: ClientConnection,
        user: SimulatedUser,
        outcome: SessionOutcome,
        settings: SimulatorSettings,
        faces: FaceSet | None,
        turns: int,
    ) -> None:
        self.ws, self.user, self.outcome, self.settings, self.faces = ws, user, outcome, settings, faces
        self.turns = turns
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.ready = asyncio.Event()
        self.tracker = TurnTracker(user, outcome)
        self.limit_reached = False

    async def _send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def _face_loop(self) -> None:
        if self.faces is None or self.settings.frames_per_second <= 0:
            return
        loop = asyncio.get_running_loop()
        period = 1.0 / min(self.settings.frames_per_second, MAX_FRAMES_PER_SECOND)
        due = loop.time()
        while True:
            _, image = self.user.frame(self.faces)
            jpeg = base64.b64encode(_jpeg(image)).decode("ascii")
            await self._send({"type": "frame", "jpeg_b64": jpeg, "capture_time_ms": int(time.time() * 1000)})
            self.outcome.frames_sent += 1
            due += period
            await asyncio.sleep(max(0.0, due - loop.time()))

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            kind = message.get("type")
            if kind == "ready":
                self.ready.set()
            elif kind == "accepted":
                self.tracker.accepted(str(message.get("event_id", "")))
            elif kind == "delta":
                self.tracker.delta()
            elif kind == "readout":
                self.tracker.readout()
            elif kind == "message":
                turn_id, text = str(message.get("turn_id", "")), str(message.get("text", ""))
                if self.tracker.message(turn_id, text, bool(message.get("unprompted"))):
                    self.replies.put_nowait(message)
            elif kind == "limit":
                self.limit_reached = True
            # Dropped frames (429) are the gateway's flow control, not a failed session.
            elif kind == "error" and message.get("status") != 429:
                self.outcome.errors.append(f"Converse: {message.get('error')}: {message.get('detail')}")
                if not self.ready.is_set():
                    raise GatewayCallFailed(f"Converse: {message.get('error')}: {message.get('detail')}")

    async def _wait(self, what: asyncio.Future[Any], reader: asyncio.Task[None], wait_s: float, name: str) -> None:
        done, _ = await asyncio.wait({what, reader}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        if what in done:
            return
        what.cancel()
        if reader in done:
            reader.result()  # The connection's error, if it failed.
            raise GatewayCallFailed(f"Converse: the gateway closed the conversation before {name}")
        raise TimeoutError(f"Converse: no {name} within {wait_s} s")

    async def run(self, token: str) -> None:
        await self._send({"type": "auth", "token": token})  # As the web app does: never in the URL.
        reader = asyncio.create_task(self._read())
        faces: asyncio.Task[None] | None = None
        try:
            ready = asyncio.ensure_future(self.ready.wait())
            await self._wait(ready, reader, self.settings.rpc_timeout_s, "ready message")
            faces = asyncio.create_task(self._face_loop())
            for turn in range(self.turns):
                if self.limit_reached:
                    break
                if turn:
                    await asyncio.sleep(self.settings.seconds_between_turns)
                text = self.tracker.start_turn(turn)
                await self._send({"type": "user_message", "text": text, "client_time_ms": int(time.time() * 1000)})
                reply = asyncio.ensure_future(self.replies.get())
                await self._wait(reply, reader, self.settings.reply_timeout_s, "complete reply")
            await asyncio.sleep(self.settings.linger_s)
        finally:
            for task in (faces, reader):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, WebSocketException, GatewayCallFailed):
                        await task


async def run_participant(
    http: httpx.AsyncClient,
    invite_code: str,
    persona: Persona,
    settings: SimulatorSettings,
    seed: int,
    *,
    faces: FaceSet | None = None,
    scorer: ReplyScorer = reply_quality,
) -> SessionOutcome:
    """One simulated participant's whole visit: ``http`` is a client for the gateway's root URL (no token: the
    invite gives one). ``outcome.user_id`` is the gateway's participant id. The camera is on when ``faces`` is
    given (frames are JPEG images of the face set; the gateway accepts no FER readings from browsers).

    Raises :class:`NotSynthetic` (before any session exists) for a study that does not record its sessions as
    synthetic, and :class:`GatewayCallFailed` when the invite cannot be redeemed; a failure after that is kept
    in ``outcome.errors`` and the session is still ended, as :func:`~emili_pipeline.simulator.run.run_user` does.
    """
    started = time.perf_counter()
    user = SimulatedUser(
        persona, seed, state_model=settings.state, face_model=settings.face, scorer=scorer, feedback=settings.feedback
    )
    outcome = SessionOutcome(persona_id=persona.persona_id, seed=seed, start_state=_state(user, "start"))
    redeemed = await _call(http, "redeem", "POST", f"/invites/{invite_code}/redeem")
    study: dict[str, Any] = redeemed["study"]
    require_synthetic(study)
    outcome.user_id = str(redeemed["participant_id"])
    headers = {"Authorization": f"Bearer {redeemed['token']}"}
    camera = faces is not None and settings.frames_per_second > 0
    step = "camera check"
    try:
        if faces is not None and camera:
            _, image = user.frame(faces)
            await _call(
                http,
                step,
                "POST",
                "/camera-check",
                content=_jpeg(image),
                headers={**headers, "Content-Type": "image/jpeg"},
            )
        step = "create session"
        consent = {
            "agree": True,
            "camera": camera,
            "store_frames": camera and settings.store_frames,
            "use_for_training": settings.use_for_training,
        }
        session = await _call(http, step, "POST", "/sessions", json={"consent": consent}, headers=headers)
        outcome.session_id = str(session["session_id"])
        base = f"/sessions/{outcome.session_id}"
        step = "pre-survey"
        await _call(http, step, "POST", f"{base}/pre-survey", json=_offered(user.pre_survey(), study), headers=headers)
        step = "Converse"
        turns = min(settings.turns, study.get("max_turns") or settings.turns)
        async with connect(websocket_url(http.base_url, outcome.session_id), open_timeout=settings.rpc_timeout_s) as ws:
            await _Conversation(ws, user, outcome, settings, faces, turns).run(redeemed["token"])
        step = "post-survey"
        await _call(
            http, step, "POST", f"{base}/post-survey", json=_offered(user.post_survey(), study), headers=headers
        )
        step = "rating"
        rated = user.ratings()
        scores = {"empathy": rated.empathy, "relevance": rated.relevance, "fluency": rated.fluency}
        await _call(http, step, "POST", f"{base}/rating", json={**scores, "comment": rated.comment}, headers=headers)
        outcome.ratings = scores
    except GatewayCallFailed as exc:
        outcome.errors.append(str(exc))
    except (TimeoutError, OSError, WebSocketException) as exc:
        outcome.errors.append(f"{step}: {type(exc).__name__}: {exc}")
    if outcome.session_id:
        try:
            await _call(http, "end", "POST", f"/sessions/{outcome.session_id}/end", headers=headers)
        except GatewayCallFailed as exc:
            outcome.errors.append(str(exc))
    outcome.end_state = _state(user, "end")
    outcome.duration_s = time.perf_counter() - started
    log.log(
        logging.WARNING if outcome.errors else logging.INFO,
        "simulated participant %s: session %s",
        outcome.user_id,
        outcome.session_id or "(none)",
        extra={"persona": persona.persona_id, "turns": len(outcome.turns), "errors": len(outcome.errors)},
    )
    return outcome
