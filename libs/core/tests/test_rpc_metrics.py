"""gRPC server metrics under the conventional names, through a real in-process grpc.aio server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from prometheus_client import REGISTRY

from emili_core import errors
from emili_core.grpc_client import make_channel
from emili_core.grpc_server import ServiceApp, start_server
from emili_core.metrics import split_method
from emili_core.settings import CommonSettings, ServerSettings
from emili_testing.plugin import TEST_SECRET, token

SERVICE = "emili.metricstest.v1.EchoService"
identity = {"request_deserializer": bytes, "response_serializer": bytes}


def build_app() -> ServiceApp:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"bad":
            raise errors.InvalidInput("bad request")
        return request

    async def repeat(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for _ in range(3):
            yield request

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Echo": grpc.unary_unary_rpc_method_handler(echo, **identity),
                        "Repeat": grpc.unary_stream_rpc_method_handler(repeat, **identity),
                    },
                ),
            )
        )

    return ServiceApp(name="metricstest", service_names=[SERVICE], register=register, scope_for_method=lambda _: "fer")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_split_method() -> None:
    assert split_method("/emili.fer.v1.FerService/Analyze") == ("emili.fer.v1.FerService", "Analyze")
    assert split_method("garbage") == ("unknown", "garbage")


async def test_calls_are_counted_by_service_method_type_and_code() -> None:
    settings = CommonSettings(auth={"secret": TEST_SECRET})
    # Two servers in one process (as in tests): the metrics are registered once and shared.
    servers = [await start_server(build_app(), settings, ServerSettings(grpc_port=0, metrics_port=0)) for _ in range(2)]
    unary = {"grpc_service": SERVICE, "grpc_method": "Echo", "grpc_type": "unary"}
    stream = {"grpc_service": SERVICE, "grpc_method": "Repeat", "grpc_type": "server_stream"}
    before = {
        "ok": sample("grpc_server_handled_total", **unary, grpc_code="OK"),
        "invalid": sample("grpc_server_handled_total", **unary, grpc_code="INVALID_ARGUMENT"),
        "started": sample("grpc_server_started_total", **unary),
        "seconds": sample("grpc_server_handling_seconds_count", **unary),
        "stream": sample("grpc_server_handled_total", **stream, grpc_code="OK"),
    }
    metadata = (("authorization", f"Bearer {token(['fer'])}"),)
    try:
        for running in servers:
            await running.ready.wait()
            async with make_channel(f"127.0.0.1:{running.port}") as channel:
                echo = channel.unary_unary(f"/{SERVICE}/Echo")
                assert await echo(b"hi", metadata=metadata) == b"hi"
                try:
                    await echo(b"bad", metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                replies = [r async for r in channel.unary_stream(f"/{SERVICE}/Repeat")(b"x", metadata=metadata)]
                assert len(replies) == 3
    finally:
        for running in servers:
            await running.stop()
    calls = len(servers)
    assert sample("grpc_server_handled_total", **unary, grpc_code="OK") - before["ok"] == calls
    assert sample("grpc_server_handled_total", **unary, grpc_code="INVALID_ARGUMENT") - before["invalid"] == calls
    assert sample("grpc_server_started_total", **unary) - before["started"] == 2 * calls
    assert sample("grpc_server_handling_seconds_count", **unary) - before["seconds"] == 2 * calls
    assert sample("grpc_server_handled_total", **stream, grpc_code="OK") - before["stream"] == calls


def test_no_service_specific_grpc_metrics_remain() -> None:
    names = {metric.name for metric in REGISTRY.collect()}
    assert not {name for name in names if name.startswith("emili_") and "_grpc_" in name}
