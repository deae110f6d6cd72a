"""``emili-labeler-server``: the labeler gRPC server (scoring on demand, labels, datasets)."""

from __future__ import annotations

import asyncio

import grpc

from emili.labeler.v1 import labeler_pb2, labeler_pb2_grpc
from emili_core.errors import NotReady
from emili_core.grpc_server import ServiceApp, serve_forever
from emili_core.logs import configure_logging
from emili_core.settings import load_settings
from emili_labeler.engine import LabelerEngine
from emili_labeler.jobs import Runtime
from emili_labeler.runtime import build_runtime
from emili_labeler.servicer import LabelerServicer
from emili_labeler.settings import LabelerSettings

SERVICE_NAME = labeler_pb2.DESCRIPTOR.services_by_name["LabelerService"].full_name


def build_app(settings: LabelerSettings) -> ServiceApp:
    holder: dict[str, Runtime] = {}

    def current() -> Runtime:
        if "runtime" not in holder:
            raise NotReady("the labeler is still loading its lexicon and embeddings; retry shortly")
        return holder["runtime"]

    def register(server: grpc.aio.Server) -> None:
        labeler_pb2_grpc.add_LabelerServiceServicer_to_server(LabelerServicer(LabelerEngine(current)), server)

    async def startup() -> None:
        holder["runtime"] = await asyncio.to_thread(build_runtime, settings)

    return ServiceApp(name="labeler", service_names=[SERVICE_NAME], register=register, startup=startup)


def serve() -> None:
    settings = load_settings(LabelerSettings)
    configure_logging("labeler", settings.log_level, settings.log_format)
    asyncio.run(serve_forever(build_app(settings), settings, settings.labeler.server))
