"""The trainer service's one settings class. Environment: ``EMILI_TRAINER__<FIELD>`` (and the common ``EMILI_*``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field

from emili_core.settings import CommonSettings, ServerSettings, WorkerSettings


class TrainerServerSettings(ServerSettings):
    grpc_port: int = Field(50054, ge=0, le=65535)
    metrics_port: int = Field(9104, ge=0, le=65535)


class TrainerWorkerSettings(WorkerSettings):
    metrics_port: int = Field(9114, ge=0, le=65535)


class TrainerOptions(BaseModel):
    server: TrainerServerSettings = TrainerServerSettings()
    worker: TrainerWorkerSettings = TrainerWorkerSettings()


class TrainerSettings(CommonSettings):
    service_name: ClassVar[str] = "trainer"
    trainer: TrainerOptions = TrainerOptions()
