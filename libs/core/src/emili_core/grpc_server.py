"""The grpc.aio server every service runs: health, reflection, auth, error mapping, graceful stop.

A service supplies a ``ServiceApp``: its servicers, the scope each method needs, and an async
``startup`` that loads and warms its models. Health reports NOT_SERVING until ``startup`` returns,
so readiness probes mean "can answer requests now", not "process is alive".
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from emili_core import errors
from emili_core.auth import principal_from_metadata, set_current_principal
from emili_core.metrics import grpc_type, rpc_metrics, serving_gauge, split_method, start_metrics_server
from emili_core.settings import CommonSettings, ServerSettings, TLSSettings

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_UNAUTHENTICATED_PREFIXES = (f"/{HEALTH_SERVICE}/",)

# The one place that maps domain errors to status codes; looked up along the exception's MRO.
STATUS_FOR_ERROR: dict[type[errors.EmiliError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DependencyUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR_ERROR:
            return STATUS_FOR_ERROR[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def public_message(exc: BaseException) -> str:
    """What the caller may see: domain messages in full, nothing of unexpected errors."""
    if isinstance(exc, errors.EmiliError):
        return str(exc)
    error_id = uuid.uuid4().hex[:12]
    log.error("unexpected error (error_id=%s)", error_id, exc_info=exc)
    return f"internal error (error_id={error_id}); see the service log"


Behavior = Callable[..., Any]
Wrap = Callable[[Behavior, bool], Behavior]


def _wrap_handler(handler: grpc.RpcMethodHandler, wrap: Wrap) -> grpc.RpcMethodHandler:
    """Rebuild ``handler`` with each behaviour wrapped; ``wrap(behavior, response_streaming)``."""
    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attr, factory = kinds[(handler.request_streaming, handler.response_streaming)]
    return factory(
        wrap(getattr(handler, attr), handler.response_streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to status codes and records per-method metrics. Servicers never set codes."""

    def __init__(self) -> None:
        self.metrics = rpc_metrics()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        labels = (
            *split_method(handler_call_details.method),
            grpc_type(handler.request_streaming, handler.response_streaming),
        )
        metrics = self.metrics

        def start() -> float:
            metrics.started.labels(*labels).inc()
            return time.perf_counter()

        def handled(code: grpc.StatusCode, started: float) -> None:
            metrics.handled.labels(*labels, code.name).inc()
            metrics.handling.labels(*labels).observe(time.perf_counter() - started)

        async def fail(exc: BaseException, context: grpc.aio.ServicerContext, started: float) -> None:
            code = status_for(exc)
            handled(code, started)
            await context.abort(code, public_message(exc))

        def wrap(behavior: Behavior, response_streaming: bool) -> Behavior:
            if response_streaming:

                async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    started = start()
                    try:
                        async for response in _as_async_iter(behavior(request, context)):
                            yield response
                    except (asyncio.CancelledError, grpc.aio.AbortError):
                        handled(grpc.StatusCode.CANCELLED, started)
                        raise
                    except Exception as exc:
                        await fail(exc, context, started)
                    else:
                        handled(grpc.StatusCode.OK, started)

                return stream

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = start()
                try:
                    response = await behavior(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    handled(grpc.StatusCode.CANCELLED, started)
                    raise
                except Exception as exc:
                    await fail(exc, context, started)
                else:
                    handled(grpc.StatusCode.OK, started)
                    return response

            return unary

        return _wrap_handler(handler, wrap)


async def _as_async_iter(result: Any) -> AsyncIterator[Any]:
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    else:
        raise TypeError("streaming servicer methods must be async generators")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires a valid bearer token with the method's scope on every RPC except health checks."""

    def __init__(self, secret: str, issuer: str, scope_for_method: Callable[[str], str]) -> None:
        self.secret = secret
        self.issuer = issuer
        self.scope_for_method = scope_for_method

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNAUTHENTICATED_PREFIXES):
            return handler
        metadata = tuple(handler_call_details.invocation_metadata or ())
        scope = self.scope_for_method(method)

        def authenticate() -> None:
            principal = principal_from_metadata(self.secret, metadata, self.issuer)
            principal.require(scope)
            set_current_principal(principal)

        def wrap(behavior: Behavior, response_streaming: bool) -> Behavior:
            if response_streaming:

                async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    authenticate()
                    async for response in _as_async_iter(behavior(request, context)):
                        yield response

                return stream

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                authenticate()
                return await behavior(request, context)

            return unary

        return _wrap_handler(handler, wrap)


class HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 that also exports the overall status (service "") as ``emili_server_serving{service}``, on
    every change, including the drain, so that a live server stuck NOT_SERVING shows (``up`` cannot tell)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._serving = serving_gauge().labels(service)
        self._serving.set(0)
        self._draining = False

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await super().set(service, status)
        if service == "" and not self._draining:  # Once draining, the base class ignores changes too.
            self._serving.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)

    async def enter_graceful_shutdown(self) -> None:
        self._draining = True
        self._serving.set(0)
        await super().enter_graceful_shutdown()


@dataclass
class ServiceApp:
    """What a service plugs into the runner."""

    name: str  # The service's one name: "fer", "chat", ...
    service_names: list[str]  # Full proto service names, for health and reflection.
    register: Callable[[grpc.aio.Server], None]
    startup: Callable[[], Awaitable[None]] = field(default=lambda: asyncio.sleep(0))
    shutdown: Callable[[], Awaitable[None]] = field(default=lambda: asyncio.sleep(0))
    # Scope a caller needs per full method name; by default the service's own name.
    scope_for_method: Callable[[str], str] | None = None


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    app: ServiceApp
    grace_seconds: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    startup_task: asyncio.Task[None] | None = None
    # The plaintext health-only server (``health_port``), for probes that cannot speak TLS.
    health_server: grpc.aio.Server | None = None
    health_port: int = 0

    async def stop(self) -> None:
        """Drain: report NOT_SERVING, finish in-flight calls within the grace period, release resources."""
        await self.health.enter_graceful_shutdown()
        if self.startup_task is not None and not self.startup_task.done():
            self.startup_task.cancel()
        await self.server.stop(self.grace_seconds)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.app.shutdown()


def server_credentials(tls: TLSSettings) -> grpc.ServerCredentials:
    """The server's certificate and key; with ``require_client_cert``, clients must present one signed by the CA."""
    for name, path in (("CERT_FILE", tls.cert_file), ("KEY_FILE", tls.key_file)):
        if not path.is_file():
            raise RuntimeError(f"EMILI_TLS__{name}={path} does not exist (`emili stack certs` makes development ones)")
    ca = tls.ca_file.read_bytes() if tls.require_client_cert and tls.ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=tls.require_client_cert,
    )


async def start_server(app: ServiceApp, settings: CommonSettings, server_settings: ServerSettings) -> RunningServer:
    """Start listening at once (health answers NOT_SERVING), then run ``app.startup`` in the background."""
    options = [
        ("grpc.max_receive_message_length", server_settings.max_message_bytes),
        ("grpc.max_send_message_length", server_settings.max_message_bytes),
    ]
    scope_for_method = app.scope_for_method or (lambda _method: app.name)
    server = grpc.aio.server(
        interceptors=[
            ErrorInterceptor(),
            AuthInterceptor(settings.auth.secret.get_secret_value(), settings.auth.issuer, scope_for_method),
        ],
        options=options,
    )
    health_servicer = HealthServicer(app.name)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    app.register(server)
    reflection.enable_server_reflection([*app.service_names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    for name in ["", *app.service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{server_settings.host}:{server_settings.grpc_port}"
    port = (
        server.add_secure_port(address, server_credentials(settings.tls))
        if settings.tls.enabled
        else (server.add_insecure_port(address))
    )
    health_server, health_port = None, 0
    if server_settings.health_port is not None:
        # Kubelet gRPC probes cannot speak TLS: the same health status, plaintext, on a port of its own (nothing
        # but grpc.health.v1 is served there).
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(f"{server_settings.host}:{server_settings.health_port}")
    if port == 0:
        raise RuntimeError(f"could not bind {server_settings.host}:{server_settings.grpc_port}")
    await server.start()
    if health_server is not None:
        await health_server.start()
    running = RunningServer(
        server,
        health_servicer,
        port,
        app,
        server_settings.grace_seconds,
        health_server=health_server,
        health_port=health_port,
    )
    log.info(
        "%s listening on %s:%d (%s; NOT_SERVING until started up)",
        app.name,
        server_settings.host,
        port,
        "TLS" if settings.tls.enabled else "plaintext",
    )

    async def become_ready() -> None:
        started = time.perf_counter()
        await app.startup()
        for name in ["", *app.service_names]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        running.ready.set()
        log.info("%s SERVING after %.1f s of startup", app.name, time.perf_counter() - started)

    running.startup_task = asyncio.create_task(become_ready(), name=f"{app.name}-startup")
    return running


async def serve_forever(app: ServiceApp, settings: CommonSettings, server_settings: ServerSettings) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully. Startup failure ends the process non-zero."""
    start_metrics_server(server_settings.metrics_port, settings.metrics_host)
    running = await start_server(app, settings, server_settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    assert running.startup_task is not None
    stop_wait = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({running.startup_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if running.startup_task in done and running.startup_task.exception() is not None:
        await running.stop()
        raise RuntimeError(f"{app.name} failed to start") from running.startup_task.exception()
    await stop.wait()
    log.info("%s stopping: draining for up to %.0f s", app.name, server_settings.grace_seconds)
    await running.stop()
    log.info("%s stopped", app.name)
