"""The server runner through a real in-process grpc.aio server: auth, error mapping, health, retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emili_core import errors
from emili_core.auth import current_principal
from emili_core.grpc_client import make_channel
from emili_core.grpc_server import ServiceApp, start_server
from emili_core.settings import CommonSettings, ServerSettings
from emili_testing.plugin import TEST_SECRET, token

SERVICE = "emili.test.v1.TestService"
identity = {"request_deserializer": bytes, "response_serializer": bytes}

ERRORS: dict[bytes, Exception] = {
    b"invalid": errors.InvalidInput("frame is empty"),
    b"missing": errors.NotFound("session s1 not found"),
    b"busy": errors.Overloaded("queue full"),
    b"down": errors.DependencyUnavailable("redis down"),
    b"forbidden": errors.PermissionDenied("not yours"),
    b"precondition": errors.FailedPrecondition("session ended"),
    b"bug": RuntimeError("secret internal detail"),
}


class Calls:
    def __init__(self) -> None:
        self.count = 0
        self.flaky_left = 0
        self.deadline: float | None = None


def build_app(calls: Calls, startup: asyncio.Event) -> ServiceApp:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        calls.count += 1
        calls.deadline = context.time_remaining()
        if request == b"flaky" and calls.flaky_left > 0:
            calls.flaky_left -= 1
            raise errors.DependencyUnavailable("try again")
        if request in ERRORS:
            raise ERRORS[request]
        return current_principal().subject.encode()

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"first"
        raise errors.InvalidInput("bad second item")

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Unary": grpc.unary_unary_rpc_method_handler(unary, **identity),
                        "Stream": grpc.unary_stream_rpc_method_handler(stream, **identity),
                    },
                ),
            )
        )

    return ServiceApp(name="test", service_names=[SERVICE], register=register, startup=startup.wait)


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Calls, asyncio.Event]]:
    calls, startup = Calls(), asyncio.Event()
    settings = CommonSettings(auth={"secret": TEST_SECRET})
    running = await start_server(build_app(calls, startup), settings, ServerSettings(grpc_port=0, metrics_port=0))
    yield f"127.0.0.1:{running.port}", calls, startup
    startup.set()
    await running.stop()


async def _unary(channel: grpc.aio.Channel, payload: bytes, **kwargs: object) -> bytes:
    method = channel.unary_unary(f"/{SERVICE}/Unary", request_serializer=bytes, response_deserializer=bytes)
    return await method(payload, **kwargs)  # type: ignore[arg-type]


async def test_health_is_not_serving_until_startup_finishes(server: tuple[str, Calls, asyncio.Event]) -> None:
    target, _, startup = server
    async with grpc.aio.insecure_channel(target) as channel:  # Health needs no token.
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        startup.set()
        for _ in range(50):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.02)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_call_without_token_is_unauthenticated(server: tuple[str, Calls, asyncio.Event]) -> None:
    target, calls, _ = server
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _unary(channel, b"hello", timeout=2)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "emili token create" in (exc.value.details() or "")
    assert calls.count == 0


async def test_bad_token_and_missing_scope(server: tuple[str, Calls, asyncio.Event]) -> None:
    target, _, _ = server
    async with make_channel(target, "not-a-jwt") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _unary(channel, b"hello")
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with make_channel(target, token(["chat"])) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _unary(channel, b"hello")
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_principal_reaches_the_servicer(server: tuple[str, Calls, asyncio.Event]) -> None:
    target, calls, _ = server
    async with make_channel(target, token(["admin"], subject="alice"), timeout=3) as channel:
        assert await _unary(channel, b"hello") == b"alice"
    # The client always sets a deadline (the server sees it give or take clock rounding).
    assert calls.deadline is not None and 0 < calls.deadline <= 3.5


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT),
        (b"missing", grpc.StatusCode.NOT_FOUND),
        (b"busy", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (b"forbidden", grpc.StatusCode.PERMISSION_DENIED),
        (b"precondition", grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_domain_errors_map_to_status_codes(
    server: tuple[str, Calls, asyncio.Event], payload: bytes, code: grpc.StatusCode
) -> None:
    target, _, _ = server
    async with make_channel(target, token(["admin"])) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _unary(channel, payload)
    assert exc.value.code() == code
    assert exc.value.details() == str(ERRORS[payload])


async def test_unexpected_error_is_internal_without_details(
    server: tuple[str, Calls, asyncio.Event], caplog: pytest.LogCaptureFixture
) -> None:
    target, _, _ = server
    async with make_channel(target, token(["admin"])) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _unary(channel, b"bug")
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internal detail" not in (exc.value.details() or "")
    assert "error_id=" in (exc.value.details() or "")
    assert "secret internal detail" in caplog.text  # Logged with its traceback instead.


async def test_streaming_errors_are_mapped_after_earlier_items(server: tuple[str, Calls, asyncio.Event]) -> None:
    target, _, _ = server
    async with make_channel(target, token(["admin"])) as channel:
        method = channel.unary_stream(f"/{SERVICE}/Stream", request_serializer=bytes, response_deserializer=bytes)
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for item in method(b"go"):
                received.append(item)
    assert received == [b"first"]
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_client_retries_unavailable_only(server: tuple[str, Calls, asyncio.Event]) -> None:
    target, calls, _ = server
    calls.flaky_left = 2
    async with make_channel(target, token(["admin"]), max_attempts=4) as channel:
        assert await _unary(channel, b"flaky") == b"test-user"
        assert calls.count == 3  # Two UNAVAILABLE answers, retried; then success.
        calls.count = 0
        with pytest.raises(grpc.aio.AioRpcError):
            await _unary(channel, b"invalid")
        assert calls.count == 1  # INVALID_ARGUMENT is never retried.
        calls.count = 0
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await _unary(channel, b"down")
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert calls.count == 4  # Retried up to maxAttempts.
