"""``emili_server_serving`` follows the gRPC health status: 0 while starting, 1 once SERVING, 0 from the drain on."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from emili_core.grpc_server import ServiceApp, start_server
from emili_core.settings import CommonSettings, ServerSettings
from emili_testing.plugin import TEST_SECRET


def serving(service: str) -> float | None:
    return REGISTRY.get_sample_value("emili_server_serving", {"service": service})


def app(name: str, startup: asyncio.Event) -> ServiceApp:
    def register(server: grpc.aio.Server) -> None:
        pass

    async def start() -> None:
        await startup.wait()

    return ServiceApp(name=name, service_names=[f"emili.{name}.v1.Service"], register=register, startup=start)


async def test_the_gauge_follows_startup_and_the_drain() -> None:
    startup = asyncio.Event()
    settings = CommonSettings(auth={"secret": TEST_SECRET})
    running = await start_server(app("servingtest", startup), settings, ServerSettings(grpc_port=0, metrics_port=0))
    try:
        assert serving("servingtest") == 0.0  # Listening, still starting up.
        startup.set()
        async with asyncio.timeout(5):
            await running.ready.wait()
        assert serving("servingtest") == 1.0
        # A service reporting NOT_SERVING at run time (the overall status "") shows too, and comes back.
        await running.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert serving("servingtest") == 0.0
        await running.health.set("", health_pb2.HealthCheckResponse.SERVING)
        assert serving("servingtest") == 1.0
    finally:
        await running.stop()
    assert serving("servingtest") == 0.0
    # Draining is final: a late SERVING (a startup finishing during the drain) changes neither health nor gauge.
    await running.health.set("", health_pb2.HealthCheckResponse.SERVING)
    assert serving("servingtest") == 0.0


async def test_a_failed_startup_leaves_the_gauge_at_zero() -> None:
    async def fail() -> None:
        raise RuntimeError("model missing")

    settings = CommonSettings(auth={"secret": TEST_SECRET})
    failing = ServiceApp(name="servingfail", service_names=[], register=lambda server: None, startup=fail)
    running = await start_server(failing, settings, ServerSettings(grpc_port=0, metrics_port=0))
    assert running.startup_task is not None
    await asyncio.wait({running.startup_task})
    assert isinstance(running.startup_task.exception(), RuntimeError)
    assert serving("servingfail") == 0.0
    await running.stop()
    assert serving("servingfail") == 0.0
