"""``emili-trainer-server``: the trainer gRPC server (start, watch and cancel runs; models; reports)."""

from __future__ import annotations

import asyncio

import grpc

from emili.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from emili_core.errors import NotReady
from emili_core.grpc_server import ServiceApp, serve_forever
from emili_core.logs import configure_logging
from emili_core.settings import load_settings
from emili_core.tasks import create_celery_app
from emili_trainer.engine import TrainerEngine
from emili_trainer.jobs import Runtime, build_runtime
from emili_trainer.servicer import TrainerServicer
from emili_trainer.settings import TrainerSettings

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


def build_app(settings: TrainerSettings) -> ServiceApp:
    holder: dict[str, Runtime] = {}
    celery = create_celery_app("trainer", settings)

    def current() -> Runtime:
        if "runtime" not in holder:
            raise NotReady("the trainer is still connecting to Redis and object storage; retry shortly")
        return holder["runtime"]

    def enqueue(task: str, run_id: str) -> None:
        celery.send_task(task, args=[run_id])

    def register(server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(TrainerEngine(current, enqueue)), server)

    async def startup() -> None:
        runtime = await asyncio.to_thread(build_runtime, settings)
        await asyncio.to_thread(runtime.runs.redis.ping)
        holder["runtime"] = runtime

    return ServiceApp(name="trainer", service_names=[SERVICE_NAME], register=register, startup=startup)


def serve() -> None:
    settings = load_settings(TrainerSettings)
    configure_logging("trainer", settings.log_level, settings.log_format)
    asyncio.run(serve_forever(build_app(settings), settings, settings.trainer.server))
