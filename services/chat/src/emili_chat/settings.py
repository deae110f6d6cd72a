"""The chat service's one settings class. Environment: ``EMILI_CHAT__<FIELD>`` (and the common ``EMILI_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

from emili_core.settings import CommonSettings, ServerSettings, WorkerSettings

PROMPTS = Path(__file__).parent / "prompts"


class ChatServerSettings(ServerSettings):
    grpc_port: int = Field(50052, ge=0, le=65535)
    metrics_port: int = Field(9102, ge=0, le=65535)


class ChatWorkerSettings(WorkerSettings):
    metrics_port: int = Field(9112, ge=0, le=65535)


class LLMSettings(BaseModel):
    backend: Literal["local", "openai", "anthropic"] = "local"
    # Local: a GGUF file or a Hugging Face model folder, relative to EMILI_ARTIFACTS_DIR unless absolute.
    local_model: Path = Path("chat/SmolLM2-135M-Instruct.Q4_1.gguf")
    local_cache: Path = Path("chat/SmolLM2-135M-Instruct-dequantised")
    local_threads: int = Field(0, ge=0)  # torch threads; 0 = torch's default.
    base_url: str = ""  # OpenAI-compatible or Anthropic endpoint.
    api_key: SecretStr = SecretStr("")
    model: str = ""  # Remote model name.
    context_window: int = Field(8192, ge=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # EMILI used 1.0.
    max_new_tokens: int = Field(160, ge=1, le=4096)  # EMILI's reply limit.
    unprompted_max_new_tokens: int = Field(40, ge=1, le=512)  # EMILI's limit when it speaks unprompted.
    first_token_timeout_s: float = Field(60.0, gt=0)
    idle_timeout_s: float = Field(30.0, gt=0)
    attempts: int = Field(3, ge=1, le=10)

    @model_validator(mode="after")
    def _remote_needs_endpoint(self) -> LLMSettings:
        if self.backend != "local" and not (self.model and self.api_key.get_secret_value()):
            raise ValueError(f"the {self.backend} backend needs llm.model and llm.api_key")
        return self


class ReadoutSettings(BaseModel):
    """EMILI's readout behaviour (reference section 3); every number is configurable."""

    cadence: Literal["before_user_message", "fixed_interval", "on_change"] = "before_user_message"
    interval_s: float = Field(1.0, gt=0)  # fixed_interval cadence.
    speak_on_change: bool = True
    post_response_reading_s: float = Field(5.0, ge=0)  # 0 = off.
    tick_s: float = Field(0.5, gt=0)
    half_life_s: float = Field(1.0, gt=0)
    visibility_epsilon: float = Field(0.1, gt=0)
    trigger_start_threshold: float = Field(41.0, gt=0)
    trigger_decay_per_second: float = Field(0.05, ge=0, lt=1)
    trigger_refractory_s: float = Field(5.0, ge=0)
    short_message_reminder: bool = True


class ChatOptions(BaseModel):
    server: ChatServerSettings = ChatServerSettings()
    worker: ChatWorkerSettings = ChatWorkerSettings()
    llm: LLMSettings = LLMSettings()
    readout: ReadoutSettings = ReadoutSettings()
    system_prompt: Path = PROMPTS / "emili_system.txt"
    fer_target: str = "127.0.0.1:50051"  # The FER service (StreamAnalyze).
    default_arm: str = "base"
    max_message_chars: int = Field(4000, ge=1)
    max_frame_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    keep_last_messages: int = Field(6, ge=2)  # Kept verbatim when the context is condensed.
    adapter_cache: Path = Path("chat/adapters")  # Under EMILI_ARTIFACTS_DIR unless absolute.


class ChatSettings(CommonSettings):
    service_name: ClassVar[str] = "chat"
    chat: ChatOptions = ChatOptions()
