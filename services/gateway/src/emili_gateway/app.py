"""The gateway's FastAPI app: the participant web app, the participant and researcher REST API, the
conversation WebSocket, health and metrics. Routes parse and authenticate, then call ``GatewayEngine``.

Errors: the engine raises emili_core domain errors; one table below turns each into an HTTP status and a JSON
body ``{"error": code, "detail": message}`` whose message tells a person what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import make_asgi_app
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect, WebSocketState

from emili_core import errors
from emili_core.auth import Principal, create_token
from emili_core.grpc_client import ServiceToken
from emili_core.objectstore import ObjectStore
from emili_gateway import export
from emili_gateway.canary import CanariesRequest, Canary, CanaryGroup, CanaryMonitor, CanaryRequest
from emili_gateway.chat_client import ChatClient, FerClient, LabelerClient
from emili_gateway.converse import ClientGone, ConverseBridge
from emili_gateway.engine import GatewayEngine
from emili_gateway.errors import CanaryNotFound, Gone, NoStudyForCanary, PayloadTooLarge, RateLimited
from emili_gateway.loop_view import LoopCandidateDetail, LoopPipeline, LoopReader, LoopView
from emili_gateway.metrics import gateway_metrics
from emili_gateway.models import (
    CameraCheck,
    CreateSessionRequest,
    ErrorBody,
    Invite,
    InviteList,
    InviteRequest,
    Me,
    Ok,
    Progress,
    RatingRequest,
    Redeemed,
    SessionView,
    Study,
    StudyList,
    StudyReport,
    StudySpec,
    SurveyRequest,
    Transcript,
    WithdrawalStatus,
    Withdrawn,
    WithdrawRequest,
)
from emili_gateway.ratelimit import RateLimiter
from emili_gateway.settings import GatewaySettings
from emili_gateway.studies import StudyEngine
from emili_gateway.withdrawals import CeleryTasks, WithdrawalDrainer

log = logging.getLogger(__name__)

WEB = Path(__file__).parent / "web"
API = "/api/v1"

# The one table from domain errors to HTTP; looked up along the exception's MRO, most specific first.
HTTP_FOR_ERROR: dict[type[errors.EmiliError], tuple[int, str]] = {
    CanaryNotFound: (404, "canary_not_found"),
    NoStudyForCanary: (409, "no_study_for_canary"),
    Gone: (410, "gone"),
    PayloadTooLarge: (413, "payload_too_large"),
    RateLimited: (429, "rate_limited"),
    errors.InvalidInput: (400, "invalid_input"),
    errors.Unauthenticated: (401, "unauthenticated"),
    errors.PermissionDenied: (403, "permission_denied"),
    errors.NotFound: (404, "not_found"),
    errors.FailedPrecondition: (409, "conflict"),
    errors.Overloaded: (429, "overloaded"),
    errors.NotReady: (503, "not_ready"),
    errors.DependencyUnavailable: (503, "unavailable"),
}
_HTTP_CODES = {400: "invalid_input", 401: "unauthenticated", 403: "permission_denied", 404: "not_found"}
_HTTP_CODES |= {405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for any exception; unexpected ones are logged and named only by an id."""
    for cls in type(exc).__mro__:
        if cls in HTTP_FOR_ERROR:
            status, code = HTTP_FOR_ERROR[cls]
            return status, {"error": code, "detail": str(exc)}
    error_id = uuid.uuid4().hex[:12]
    log.error("unexpected error (error_id=%s)", error_id, exc_info=exc)
    return 500, {"error": "internal", "detail": f"something went wrong on our side (error id {error_id})"}


def _error_response(exc: BaseException) -> JSONResponse:
    status, body = error_body(exc)
    headers = {"Retry-After": str(exc.retry_after_seconds)} if isinstance(exc, RateLimited) else None
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is not valid"


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "invalid input",
        401: "no or bad token",
        403: "not allowed",
        404: "not found",
        409: "conflict with the current state",
        429: "rate limited",
        503: "a dependency is unavailable",
    }.items()
}


class BodyLimit:
    """Refuses request bodies over a size (413) before any handler reads them, declared or streamed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = StarletteHTTPException(413, f"the request body is over the {self.max_bytes}-byte limit")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _error_response(PayloadTooLarge(str(too_large.detail)))(scope, receive, send)
            return
        seen = 0

        async def limited() -> MutableMapping[str, Any]:
            nonlocal seen
            message: MutableMapping[str, Any] = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Counts requests by route template (bounded), method and status, and their latency."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.metrics = gateway_metrics()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def record_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None)
            if path is None:
                path = "/static" if str(scope.get("path", "")).startswith("/static/") else "unmatched"
            self.metrics.requests.labels(path, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


bearer = HTTPBearer(auto_error=False, description="A participant token (from redeeming an invite) or an admin token")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def engine_of(request: Request) -> GatewayEngine:
    engine: GatewayEngine = request.app.state.engine
    return engine


Engine = Annotated[GatewayEngine, Depends(engine_of)]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials is not None else None


async def caller(engine: Engine, credentials: Credentials) -> tuple[Principal, str]:
    token = _token(credentials)
    principal = engine.authenticate(token)
    assert token is not None
    return principal, token


Caller = Annotated[tuple[Principal, str], Depends(caller)]


async def admin(engine: Engine, who: Caller) -> tuple[Principal, str]:
    await engine.admin(who[0])
    return who


Admin = Annotated[tuple[Principal, str], Depends(admin)]


def loop_reader(engine: GatewayEngine) -> LoopReader:
    """The automatic loop's records (object storage) and canaries, for researchers."""
    return LoopReader(engine.studies.objects, engine.studies)


def client_address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _invite_url(request: Request, settings: GatewaySettings, invite: Invite) -> Invite:
    base = settings.gateway.server.public_base_url or str(request.base_url)
    return invite.model_copy(update={"url": f"{base.rstrip('/')}/join/{invite.code}"})


def build_routers() -> list[APIRouter]:
    researchers = APIRouter(prefix=API, tags=["researchers (admin token)"], responses=ERROR_RESPONSES)
    public = APIRouter(prefix=API, tags=["invites and withdrawal (no token)"], responses=ERROR_RESPONSES)
    participants = APIRouter(prefix=API, tags=["participants (participant token)"], responses=ERROR_RESPONSES)

    @researchers.post("/studies", status_code=201, response_model=Study)
    async def create_study(spec: StudySpec, engine: Engine, who: Admin) -> Study:
        """Create a study: its arms and weights, consent text, survey vocabularies and conversation rules."""
        return await engine.create_study(who[0], spec)

    @researchers.get("/studies", response_model=StudyList)
    async def list_studies(engine: Engine, who: Admin) -> StudyList:
        return StudyList(studies=await engine.studies.list_studies())

    @researchers.get("/studies/{study_id}", response_model=Study)
    async def get_study(study_id: str, engine: Engine, who: Admin) -> Study:
        return await engine.studies.get_study(study_id)

    @researchers.post("/studies/{study_id}/invites", status_code=201, response_model=InviteList)
    async def create_invites(
        study_id: str, body: InviteRequest, request: Request, engine: Engine, who: Admin
    ) -> InviteList:
        """Invite codes and links: single-use (max_uses 1) or shared by up to max_uses people, until they expire."""
        invites = await engine.create_invites(study_id, body)
        return InviteList(invites=[_invite_url(request, engine.settings, i) for i in invites])

    @researchers.get("/studies/{study_id}/invites", response_model=InviteList)
    async def list_invites(study_id: str, request: Request, engine: Engine, who: Admin) -> InviteList:
        invites = await engine.list_invites(study_id)
        return InviteList(invites=[_invite_url(request, engine.settings, i) for i in invites])

    @researchers.get("/studies/{study_id}/progress", response_model=Progress)
    async def progress(study_id: str, engine: Engine, who: Admin) -> Progress:
        """Sessions per arm: assigned participants, active, completed (ended and rated), abandoned, withdrawn."""
        return await engine.progress(study_id)

    @researchers.get(
        "/studies/{study_id}/export",
        response_class=PlainTextResponse,
        responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}},
    )
    async def export_sessions(
        study_id: str,
        engine: Engine,
        who: Admin,
        format: Annotated[Literal["jsonl", "csv"], Query(description="jsonl (one JSON object per line) or csv")] = (
            "jsonl"
        ),
    ) -> Response:
        """Every session not withdrawn: arm, consent, surveys, rating and transcript (read from chat)."""
        rows = await engine.export(who[1], study_id)
        name = f"{study_id}-sessions.{format}"
        disposition = {"Content-Disposition": f'attachment; filename="{name}"'}
        if format == "csv":
            return Response(export.to_csv(rows), media_type="text/csv; charset=utf-8", headers=disposition)
        return Response(export.to_jsonl(rows), media_type="application/x-ndjson", headers=disposition)

    @researchers.post("/studies/{study_id}/canary", status_code=201, response_model=Canary)
    async def start_canary(study_id: str, body: CanaryRequest, engine: Engine, who: Admin) -> Canary:
        """Give a candidate model version a share of the production arm's new participants (blinded); the canary
        monitor promotes it or rolls it back on their outcomes (ratings, completion) with a sequential test."""
        return await engine.start_canary(who[0], study_id, body)

    @researchers.get("/studies/{study_id}/canary", response_model=Canary)
    async def get_canary(
        study_id: str,
        engine: Engine,
        who: Admin,
        candidate: Annotated[
            str | None, Query(description="That version's latest canary in the study, not the study's newest")
        ] = None,
    ) -> Canary:
        """The study's newest canary (or ``candidate``'s): running or decided, with the numbers of its last look
        and the reason."""
        return await engine.canary(study_id, candidate)

    @researchers.post("/studies/{study_id}/canary/rollback", response_model=Canary)
    async def roll_back_canary(study_id: str, engine: Engine, who: Admin) -> Canary:
        """Stop a running canary now: the candidate gets no new participant."""
        return await engine.roll_back_canary(who[0], study_id)

    @researchers.post("/canaries", status_code=201, response_model=CanaryGroup)
    async def start_canaries(body: CanariesRequest, engine: Engine, who: Admin) -> CanaryGroup:
        """Give a candidate a share of the production version's new participants in several studies at once (by
        default every study it serves now): one experiment, its sessions pooled, decided once for all of them."""
        return await engine.start_canaries(who[0], body)

    @researchers.get("/canaries/{candidate}", response_model=CanaryGroup)
    async def get_canaries(candidate: str, engine: Engine, who: Admin) -> CanaryGroup:
        """The candidate's latest canary across the studies it ran in: their common state, numbers and sessions."""
        return await engine.canary_group(candidate)

    @researchers.post("/canaries/{candidate}/rollback", response_model=CanaryGroup)
    async def roll_back_canaries(candidate: str, engine: Engine, who: Admin) -> CanaryGroup:
        """Stop the candidate's running canary in every study now."""
        return await engine.roll_back_canaries(who[0], candidate)

    @researchers.get("/studies/{study_id}/report", response_model=StudyReport)
    async def study_report(study_id: str, engine: Engine, who: Admin) -> StudyReport:
        """The newest evaluation report covering all the study's arms: Tables 1 and 2, plot URLs; 404 if none."""
        return await engine.report(study_id, API)

    @researchers.get(
        "/studies/{study_id}/reports/{run_id}/plots/{plot}",
        response_class=StreamingResponse,
        responses={200: {"content": {"image/png": {}}, "description": "the PNG"}},
    )
    async def report_plot(study_id: str, run_id: str, plot: str, engine: Engine, who: Admin) -> StreamingResponse:
        """A plot of an evaluation report of the study's arms (the URLs the report lists)."""
        chunks = await engine.report_plot(study_id, run_id, plot)
        return StreamingResponse(chunks, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    @researchers.get("/loop", response_model=LoopView)
    async def loop_view(
        engine: Engine,
        who: Admin,
        limit: Annotated[int, Query(ge=1, le=1000, description="How many of the newest decisions to list")] = 100,
    ) -> LoopView:
        """The automatic loop: its phase and candidate, its decisions (newest first) with their numbers, and the
        gate's verdict on each candidate they name; ``ran`` is false (and the rest empty) until the loop first ran."""
        return await loop_reader(engine).view(limit)

    @researchers.get("/loop/candidates/{version}", response_model=LoopCandidateDetail)
    async def loop_candidate(version: str, engine: Engine, who: Admin) -> LoopCandidateDetail:
        """What is behind a candidate: the gate's verdict (each check's estimate, interval, n, reason), its
        pipeline's training and held-out sessions, its lineage in the model registry, its canary and decisions."""
        return await loop_reader(engine).candidate(version)

    @researchers.get("/loop/pipelines/{pipeline_id}", response_model=LoopPipeline)
    async def loop_pipeline(pipeline_id: str, engine: Engine, who: Admin) -> LoopPipeline:
        """A pipeline the loop started: its sessions, split into training and held-out ones, and its steps."""
        return await loop_reader(engine).pipeline(pipeline_id)

    @public.post("/invites/{code}/redeem", response_model=Redeemed)
    async def redeem(code: str, request: Request, engine: Engine) -> Redeemed:
        """Join a study: returns a participant token (pseudonymous id) and a withdraw code to keep."""
        return await engine.redeem(code, client_address(request))

    @public.post("/withdraw", response_model=Withdrawn)
    async def withdraw(body: WithdrawRequest, request: Request, engine: Engine) -> Withdrawn:
        """Withdraw from a study with the code shown at the end: excluded from results, deletion requested."""
        return await engine.withdraw(body.withdraw_code, client_address(request))

    @public.post("/withdraw/status", response_model=WithdrawalStatus)
    async def withdrawal_status(body: WithdrawRequest, request: Request, engine: Engine) -> WithdrawalStatus:
        """After withdrawing: whether the data are deleted yet and, once they are, what was removed."""
        return await engine.withdrawal_status(body.withdraw_code, client_address(request))

    @participants.get("/me", response_model=Me)
    async def me(engine: Engine, who: Caller) -> Me:
        """The participant's study (as they may see it) and their sessions, e.g. to resume after a reload."""
        return await engine.me(who[0])

    @participants.post("/sessions", status_code=201, response_model=SessionView)
    async def create_session(body: CreateSessionRequest, engine: Engine, who: Caller) -> SessionView:
        """Start the study's conversation with the participant's consent choices (the arm is assigned, unseen)."""
        return await engine.create_session(who[0], who[1], body.consent)

    @participants.get("/sessions/{session_id}", response_model=SessionView)
    async def get_session(session_id: str, engine: Engine, who: Caller) -> SessionView:
        return await engine.session_view(who[0], session_id)

    @participants.post("/sessions/{session_id}/pre-survey", response_model=Ok)
    async def pre_survey(session_id: str, body: SurveyRequest, engine: Engine, who: Caller) -> Ok:
        """Before the chat: how the participant feels and would like to feel (from the study's lists) and why."""
        await engine.submit_survey(who[0], who[1], session_id, "pre", body)
        return Ok()

    @participants.post("/sessions/{session_id}/post-survey", response_model=Ok)
    async def post_survey(session_id: str, body: SurveyRequest, engine: Engine, who: Caller) -> Ok:
        """After the chat, before ending the session: how the participant feels now."""
        await engine.submit_survey(who[0], who[1], session_id, "post", body)
        return Ok()

    @participants.post("/sessions/{session_id}/rating", response_model=Ok)
    async def rating(session_id: str, body: RatingRequest, engine: Engine, who: Caller) -> Ok:
        """The paper's ratings, 1 (not at all), 3 (somewhat) to 5 (very much), and an optional comment."""
        await engine.submit_rating(who[0], who[1], session_id, body)
        return Ok()

    @participants.post("/sessions/{session_id}/end", response_model=SessionView)
    async def end_session(session_id: str, engine: Engine, who: Caller) -> SessionView:
        """End the session (after the post-survey and rating); ending it again is harmless."""
        return await engine.end_session(who[0], who[1], session_id)

    @participants.get("/sessions/{session_id}/transcript", response_model=Transcript)
    async def transcript(session_id: str, engine: Engine, who: Caller) -> Transcript:
        return await engine.transcript(who[0], who[1], session_id)

    @participants.post(
        "/camera-check",
        response_model=CameraCheck,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def camera_check(request: Request, engine: Engine, who: Caller) -> CameraCheck:
        """Is a face visible in this JPEG (the body, Content-Type image/jpeg)? Nothing is stored."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > engine.limits.max_frame_bytes:
                raise PayloadTooLarge(
                    f"the image is over the {engine.limits.max_frame_bytes}-byte limit (send a smaller JPEG)"
                )
        return CameraCheck(face_found=await engine.camera_check(who[0], bytes(body)))

    @participants.websocket("/sessions/{session_id}/converse")
    async def converse(websocket: WebSocket, session_id: str, token: str | None = None) -> None:
        """The live conversation (see emili_gateway.converse for the messages)."""
        await run_conversation(websocket, session_id, token)

    return [researchers, public, participants]


async def _receive_json(websocket: WebSocket, max_bytes: int) -> Any:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise ClientGone()
    data = message.get("text")
    if data is None:
        data = (message.get("bytes") or b"").decode("utf-8", errors="replace")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"a message of {len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        return json.loads(data)
    except ValueError:
        raise errors.InvalidInput("each message must be JSON") from None


async def run_conversation(websocket: WebSocket, session_id: str, token: str | None) -> None:
    engine: GatewayEngine = websocket.app.state.engine
    max_bytes = engine.limits.max_ws_message_bytes
    metrics = engine.metrics
    await websocket.accept()
    metrics.websockets.inc()

    async def send(message: dict[str, Any]) -> None:
        await websocket.send_json(message)

    async def close(code: int, reason: str) -> None:
        if websocket.client_state == WebSocketState.CONNECTED:
            # The browser may have gone first.
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await websocket.close(code=code, reason=reason[:120])

    try:
        try:
            if not token:
                first = await asyncio.wait_for(_receive_json(websocket, max_bytes), 10)
                if not (
                    isinstance(first, dict) and first.get("type") == "auth" and isinstance(first.get("token"), str)
                ):
                    raise errors.Unauthenticated(
                        'send {"type": "auth", "token": "..."} first, or connect with ?token=...'
                    )
                token = first["token"]
            principal = engine.authenticate(token)
            _, record, study = await engine.owned_session(principal, session_id, active=True)
        except (ClientGone, WebSocketDisconnect):
            return
        except (TimeoutError, errors.EmiliError) as exc:
            problem = exc if isinstance(exc, errors.EmiliError) else errors.Unauthenticated("no token within 10 s")
            status, body = error_body(problem)
            await send({"type": "error", "status": status, **body})
            await close(4000 + status, body["error"])
            return
        bridge = ConverseBridge(engine, record, study, token, send, error_body)

        async def receive() -> Any:
            try:
                return await _receive_json(websocket, max_bytes)
            except WebSocketDisconnect:
                raise ClientGone() from None

        try:
            await bridge.run(receive)
        except errors.EmiliError as exc:
            status, body = error_body(exc)
            await bridge.send({"type": "error", "status": status, **body})
            await close(4000 + status, body["error"])
            return
        if not bridge.client_gone:
            await close(bridge.close_code, bridge.close_reason)
    finally:
        metrics.websockets.dec()


def create_app(settings: GatewaySettings, *, objects: ObjectStore | None = None) -> FastAPI:
    """The app; its Redis client and gRPC channels are made at startup, in the server's event loop."""
    options = settings.gateway
    # The gateway's own token for FER's camera checks: short-lived, minted again before it expires.
    fer_token = ServiceToken(
        settings.auth.secret.get_secret_value(), "gateway-service", ["fer"], issuer=settings.auth.issuer
    )
    # And for the labeler's session labels, a canary's outcomes.
    labeler_token = ServiceToken(
        settings.auth.secret.get_secret_value(), "gateway-service", ["labeler"], issuer=settings.auth.issuer
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
        store = objects or ObjectStore(settings.s3)
        try:
            await asyncio.to_thread(store.ensure_buckets)
        except Exception as exc:
            # Serve anyway: /readyz reports the store as down until it answers.
            log.warning("object store not ready at startup: %s", exc)
        chat = ChatClient(options.chat_target, options.chat_timeout_seconds, settings.tls)
        fer = FerClient(options.fer_target, fer_token, options.chat_timeout_seconds, settings.tls)
        labeler = LabelerClient(options.labeler_target, labeler_token, options.chat_timeout_seconds, settings.tls)
        app.state.engine = GatewayEngine(
            settings,
            StudyEngine(options.studies, client, store),
            chat,
            fer,
            RateLimiter(client, options.studies.redis_prefix),
            gateway_metrics(),
        )
        app.state.objects = store
        tasks = CeleryTasks(settings)
        if options.withdrawals.drain:
            secret, issuer = settings.auth.secret.get_secret_value(), settings.auth.issuer

            def admin_token() -> str:
                # Short-lived, made for each withdrawal: chat lets an admin delete another user's sessions.
                return create_token(secret, "gateway-service", ["admin"], ttl_seconds=600, issuer=issuer)

            drainer = WithdrawalDrainer(options.withdrawals, client, app.state.engine.studies, chat, tasks, admin_token)
            app.state.engine.background(drainer.run())
        if options.canary.monitor:
            monitor = CanaryMonitor(
                options.canary, app.state.engine.studies, app.state.engine.metrics, labels=labeler.reactions
            )
            app.state.engine.background(monitor.run())
        try:
            yield
        finally:
            await app.state.engine.close()
            tasks.close()
            await chat.close()
            await fer.close()
            await labeler.close()
            await client.aclose()

    app = FastAPI(
        title="EMILI gateway",
        version="0.1.0",
        description=(
            "Take part in EMILI studies from a browser, and an HTTP API for apps that cannot use gRPC. "
            'Errors are JSON: {"error": code, "detail": what to do}.'
        ),
        lifespan=lifespan,
    )

    @app.exception_handler(errors.EmiliError)
    async def domain_error(request: Request, exc: errors.EmiliError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "invalid_input", "detail": _validation_detail(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(exc)

    for router in build_routers():
        app.include_router(router)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"description": "a dependency is down"}})
    async def readyz(request: Request) -> JSONResponse:
        """Redis, object storage and the chat service answer (readiness); 503 names what is down."""
        engine = engine_of(request)
        store: ObjectStore = request.app.state.objects
        checks: dict[str, str] = {}

        async def check(name: str, probe: Callable[[], Awaitable[str | None]]) -> None:
            try:
                problem = await asyncio.wait_for(probe(), 5)
            except Exception as exc:
                problem = str(exc)[:200] or type(exc).__name__
            checks[name] = "ok" if problem is None else problem

        async def redis_probe() -> None:
            await engine.studies.ping()

        async def s3_probe() -> None:
            await asyncio.to_thread(store.ping)

        await asyncio.gather(check("redis", redis_probe), check("s3", s3_probe), check("chat", engine.chat.healthy))
        down = sorted(name for name, state in checks.items() if state != "ok")
        status = 503 if down else 200
        return JSONResponse({"status": "ok" if not down else "unavailable", "down": down, "checks": checks}, status)

    if options.server.metrics_port == 0:
        app.mount("/metrics", make_asgi_app())

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB / "index.html")

    @app.get("/join/{code}", include_in_schema=False)
    async def join(code: str) -> FileResponse:
        return FileResponse(WEB / "index.html")

    @app.get("/withdraw", include_in_schema=False)
    async def withdraw_page() -> FileResponse:
        return FileResponse(WEB / "index.html")

    @app.get("/researcher", include_in_schema=False)
    async def researcher_page() -> FileResponse:
        """Researchers: studies, progress, exports and evaluation reports (with an admin token)."""
        return FileResponse(WEB / "researcher.html")

    app.add_middleware(BodyLimit, max_bytes=options.limits.max_body_bytes)
    app.add_middleware(RequestMetrics)
    return app
