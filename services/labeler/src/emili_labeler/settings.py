"""The labeler service's one settings class. Environment: ``EMILI_LABELER__<FIELD>`` (and the common ``EMILI_*``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field

from emili_core.settings import CommonSettings, ServerSettings, WorkerSettings


class LabelerServerSettings(ServerSettings):
    grpc_port: int = Field(50053, ge=0, le=65535)
    metrics_port: int = Field(9103, ge=0, le=65535)


class LabelerWorkerSettings(WorkerSettings):
    metrics_port: int = Field(9113, ge=0, le=65535)


class LabelerOptions(BaseModel):
    server: LabelerServerSettings = LabelerServerSettings()
    worker: LabelerWorkerSettings = LabelerWorkerSettings()


class LabelerSettings(CommonSettings):
    service_name: ClassVar[str] = "labeler"
    labeler: LabelerOptions = LabelerOptions()
