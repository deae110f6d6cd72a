"""``emili-fer-server``: the FER gRPC server."""

from __future__ import annotations

import asyncio

import grpc

from emili.fer.v1 import fer_pb2, fer_pb2_grpc
from emili_core.grpc_server import ServiceApp, serve_forever
from emili_core.logs import configure_logging
from emili_core.settings import load_settings
from emili_fer.engine import FerEngine
from emili_fer.servicer import FerServicer
from emili_fer.settings import FerSettings

SERVICE_NAME = fer_pb2.DESCRIPTOR.services_by_name["FerService"].full_name


def build_app(settings: FerSettings) -> ServiceApp:
    engine = FerEngine(settings.fer, settings.artifacts_dir)

    def register(server: grpc.aio.Server) -> None:
        fer_pb2_grpc.add_FerServiceServicer_to_server(FerServicer(engine), server)

    return ServiceApp(
        name="fer", service_names=[SERVICE_NAME], register=register, startup=engine.start, shutdown=engine.stop
    )


def serve() -> None:
    settings = load_settings(FerSettings)
    configure_logging("fer", settings.log_level, settings.log_format)
    asyncio.run(serve_forever(build_app(settings), settings, settings.fer.server))
