"""The chat service's one settings class. Environment: ``EMILI_CHAT__<FIELD>`` (and the common ``EMILI_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

from emili_core.settings import CommonSettings, ServerSettings, WorkerSettings
from emili_session.surveys import CURRENT_FEELINGS, DESIRED_FEELINGS

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
    local_max_batch: int = Field(16, ge=1, le=256)  # Replies the local model generates together (1 = one at a time).
    # KV caches of recent prompts and replies kept for reuse, in tokens; 0 = none. SmolLM2-135M, float32: 46 KB a
    # token, so 12288 tokens (about ten sessions of a dozen turns) take 550 MB, within the chat pod's 3 GiB.
    local_prefix_cache_tokens: int = Field(12288, ge=0)
    # float16: the local model's linear layers on packed float16 weights (float32 models on the CPU only; adapters
    # stay float32): half the bytes read per step, 10-session steps 1.8x faster (BENCHMARKS.md). as_loaded: as is.
    local_weights: Literal["as_loaded", "float16"] = "float16"
    base_url: str = ""  # OpenAI-compatible or Anthropic endpoint.
    api_key: SecretStr = SecretStr("")
    model: str = ""  # Remote model name (with vLLM: the base model's served name).
    # vLLM runtime LoRA loading: the folder in which the server sees adapter_cache's adapter folders (a volume both
    # mount). Empty: adapters only when the server already lists them (preloaded with --lora-modules).
    lora_dir: str = ""
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
    short_message_reminder: bool = True  # Sent right after a user message under 10 characters, as EMILI did.
    # The original always sends the one-line readout before a user message; the three-line change block only
    # when the change trigger fires. True: a before_user_message readout may be the change block too.
    change_block_before_user_message: bool = False


class SurveySettings(BaseModel):
    """What a person may submit around a chat: the feelings offered, text lengths, and resubmissions.

    A session keeps one pre-survey, one post-survey and one rating: submitting one again replaces the one before
    (readers take the last), up to ``max_submissions`` of each kind per session. A gateway study's own survey words
    must be in these vocabularies.
    """

    current_feelings: tuple[str, ...] = CURRENT_FEELINGS
    desired_feelings: tuple[str, ...] = DESIRED_FEELINGS
    max_feelings: int = Field(12, ge=1, le=100)  # Per list of one survey, after duplicates are removed.
    max_text_chars: int = Field(4000, ge=1, le=100_000)  # A survey's free text.
    max_comment_chars: int = Field(2000, ge=0, le=100_000)  # A rating's comment.
    max_submissions: int = Field(10, ge=1, le=1000)  # Pre-surveys, post-surveys and ratings, each, per session.


class TranscriptSettings(BaseModel):
    """GetTranscript pages: events per response, so a response stays far below the gRPC message limit."""

    default_page_size: int = Field(500, ge=1)  # Lowered to max_page_size when over it.
    max_page_size: int = Field(1000, ge=1)
    max_page_bytes: int = Field(1024 * 1024, ge=64 * 1024)  # A page ends early when its events reach this size.


class ResilienceSettings(BaseModel):
    """How a live conversation rides out faults (``EMILI_CHAT__RESILIENCE__<FIELD>``).

    * FER: a conversation's ``StreamAnalyze`` stream that ends is reopened after ``fer_reconnect_initial_s``,
      doubling up to ``fer_reconnect_max_s`` between tries, for as long as the conversation lasts; meanwhile
      readouts say the face cannot be read and the record marks the gap (``fer_unavailable``/``fer_restored``).
    * Redis: an event write (or read) that meets a connection error is retried with backoff from
      ``redis_retry_initial_s`` (doubling, at most 1 s apart) for up to ``redis_retry_s`` before the call fails
      with UNAVAILABLE; the client checks an idle pooled connection after ``redis_health_check_interval_s``
      and redis-py itself retries a command ``redis_command_retries`` times on a dropped connection.
    * ``inbox_size``: user messages waiting for their turn on one Converse stream; one more is refused with
      RESOURCE_EXHAUSTED instead of queueing without bound.
    """

    fer_reconnect_initial_s: float = Field(0.25, gt=0)
    fer_reconnect_max_s: float = Field(5.0, gt=0)
    redis_retry_s: float = Field(5.0, ge=0)  # 0: no retries beyond redis-py's own.
    redis_retry_initial_s: float = Field(0.05, gt=0)
    redis_health_check_interval_s: int = Field(15, ge=0)  # 0: off.
    redis_command_retries: int = Field(3, ge=0, le=20)
    redis_socket_timeout_s: float = Field(10.0, gt=0)
    inbox_size: int = Field(32, ge=1, le=100_000)


class FrameBufferSettings(BaseModel):
    """Frames a conversation stores (with consent) are uploaded off its path by a background uploader that
    retries while object storage is down; frames beyond ``max_bytes`` waiting are dropped (counted, and recorded
    as a ``frames_dropped`` event)."""

    max_bytes: int = Field(128 * 1024 * 1024, ge=1024)
    uploaders: int = Field(4, ge=1, le=64)  # Concurrent uploads.
    retry_max_s: float = Field(10.0, gt=0)  # The longest wait between tries while storage is down.
    drain_s: float = Field(10.0, ge=0)  # At shutdown, how long to keep uploading what is buffered.
    # Beyond max_bytes, frames spill to files here (under EMILI_ARTIFACTS_DIR unless absolute; a volume that
    # outlives the container in production) up to spill_max_bytes; 0 turns spilling off.
    spill_dir: Path = Path("chat/frame-spill")
    spill_max_bytes: int = Field(2 * 1024 * 1024 * 1024, ge=0)


class ReconcileSettings(BaseModel):
    """The chat worker's reconciler: finds ended sessions with no current record and enqueues them again."""

    interval_s: float = Field(30.0, gt=0)  # 0 < interval; one worker at a time runs it (a Redis lock).
    requeue_after_s: float = Field(120.0, gt=0)  # A session still unpersisted is enqueued again this often.
    enabled: bool = True
    # chat.retention_sweep is enqueued once per this period across all workers (0 = never: run it by hand or
    # from a CronJob with `emili retention sweep`).
    retention_sweep_interval_s: float = Field(24 * 3600.0, ge=0)


class ChatOptions(BaseModel):
    server: ChatServerSettings = ChatServerSettings()
    worker: ChatWorkerSettings = ChatWorkerSettings()
    llm: LLMSettings = LLMSettings()
    readout: ReadoutSettings = ReadoutSettings()
    system_prompt: Path = PROMPTS / "emili_system.txt"
    fer_target: str = "127.0.0.1:50051"  # The FER service (StreamAnalyze).
    default_arm: str = "base"
    max_message_chars: int = Field(4000, ge=1)  # A user message in Converse.
    surveys: SurveySettings = SurveySettings()
    transcript: TranscriptSettings = TranscriptSettings()
    max_frame_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    keep_last_messages: int = Field(6, ge=2)  # Kept verbatim when the context is condensed.
    adapter_cache: Path = Path("chat/adapters")  # Under EMILI_ARTIFACTS_DIR unless absolute.
    frame_buffer: FrameBufferSettings = FrameBufferSettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    resilience: ResilienceSettings = ResilienceSettings()


class ChatSettings(CommonSettings):
    service_name: ClassVar[str] = "chat"
    chat: ChatOptions = ChatOptions()
