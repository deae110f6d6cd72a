"""The pipeline's settings class. Environment: ``EMILI_PIPELINE__<GROUP>__<FIELD>`` (and the common ``EMILI_*``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from emili_core.settings import CommonSettings
from emili_pipeline.simulator.run import SimulatorSettings


class PipelineOptions(BaseModel):
    simulator: SimulatorSettings = SimulatorSettings()


class PipelineSettings(CommonSettings):
    service_name: ClassVar[str] = "pipeline"
    pipeline: PipelineOptions = PipelineOptions()
