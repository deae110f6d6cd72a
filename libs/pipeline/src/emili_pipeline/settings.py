"""The pipeline's settings class. Environment: ``EMILI_PIPELINE__<GROUP>__<FIELD>`` (and the common ``EMILI_*``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, model_validator

from emili_core.settings import CommonSettings
from emili_pipeline.simulator.run import SimulatorSettings


class PipelineOptions(BaseModel):
    simulator: SimulatorSettings = SimulatorSettings()


class PipelineSettings(CommonSettings):
    service_name: ClassVar[str] = "pipeline"
    pipeline: PipelineOptions = PipelineOptions()

    @model_validator(mode="after")
    def _simulated_users_use_the_process_tls(self) -> PipelineSettings:
        if self.pipeline.simulator.tls is None:
            self.pipeline.simulator = self.pipeline.simulator.model_copy(update={"tls": self.tls})
        return self
