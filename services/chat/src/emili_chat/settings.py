"""The chat service's one settings class. Environment: ``EMILI_CHAT__<FIELD>`` (and the common ``EMILI_*``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field

from emili_core.settings import CommonSettings, ServerSettings, WorkerSettings


class ChatServerSettings(ServerSettings):
    grpc_port: int = Field(50052, ge=0, le=65535)
    metrics_port: int = Field(9102, ge=0, le=65535)


class ChatWorkerSettings(WorkerSettings):
    metrics_port: int = Field(9112, ge=0, le=65535)


class ChatOptions(BaseModel):
    server: ChatServerSettings = ChatServerSettings()
    worker: ChatWorkerSettings = ChatWorkerSettings()


class ChatSettings(CommonSettings):
    service_name: ClassVar[str] = "chat"
    chat: ChatOptions = ChatOptions()
