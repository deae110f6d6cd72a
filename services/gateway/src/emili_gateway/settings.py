"""The gateway's one settings class. Environment: ``EMILI_GATEWAY__<FIELD>`` (and the common ``EMILI_*``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field, field_validator

from emili_affect.canary import DEFAULT_TAU, CanaryRule, check_tau
from emili_core.settings import CommonSettings, HealthCheck
from emili_session.loop_records import STUDIES_PREFIX


class GatewayServerSettings(BaseModel):
    """Where the gateway listens. It serves HTTP, not gRPC, so it has its own server group."""

    host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    # /metrics on its own port, like every other EMILI process; 0 mounts it on the HTTP app instead (tests).
    metrics_port: int = Field(9105, ge=0, le=65535)
    grace_seconds: float = Field(10.0, ge=0)
    # Invite links are built from this, e.g. https://study.example.org; empty = the request's own address.
    public_base_url: str = Field("", pattern=r"^(https?://[^\s/]+(/[^\s]*)?)?$")
    # Proxies whose X-Forwarded-For is believed (the client address is what redeem rate limits count).
    forwarded_allow_ips: str = "127.0.0.1"


class LimitSettings(BaseModel):
    max_frame_bytes: int = Field(512 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_message_chars: int = Field(2000, ge=1, le=4000)  # Chat refuses over 4000 and ends the stream.
    max_survey_chars: int = Field(4000, ge=1, le=4000)
    max_comment_chars: int = Field(2000, ge=0, le=4000)
    max_body_bytes: int = Field(1024 * 1024, ge=4096)  # Any HTTP request body (a camera-check JPEG included).
    max_ws_message_bytes: int = Field(1024 * 1024, ge=4096)  # One WebSocket message (base64 frames are 4/3 larger).
    # Rate limits, per minute unless named otherwise; counted in Redis so every gateway replica shares them.
    redeem_per_minute: int = Field(20, ge=1)  # Per client address: invite codes must not be guessable by trying.
    requests_per_minute: int = Field(240, ge=1)  # Per participant, every REST call.
    messages_per_minute: int = Field(20, ge=1)  # Per session, chat messages.
    camera_checks_per_minute: int = Field(120, ge=1)  # Per participant.
    frames_per_second: float = Field(2.0, gt=0, le=30)  # Per connection; extra frames are dropped.
    admin_requests_per_minute: int = Field(600, ge=1)


class StudyStoreSettings(BaseModel):
    """Studies live in object storage (bucket ``sessions``, under ``prefix``); invites and counters in Redis."""

    prefix: str = Field(STUDIES_PREFIX, pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$")
    redis_prefix: str = Field("emili:gateway", pattern=r"^[a-z0-9:_-]{1,40}$")
    participant_token_ttl_seconds: int = Field(7 * 24 * 3600, ge=60)
    max_sessions_per_participant: int = Field(1, ge=1, le=100)
    # A session with no activity for this long counts as abandoned in the progress report.
    abandoned_after_seconds: int = Field(3600, ge=60)
    # How long an expired invite's record is kept, so its code gets "expired" rather than "unknown".
    keep_expired_invites_seconds: int = Field(30 * 24 * 3600, ge=0)


class WithdrawalSettings(BaseModel):
    """Deleting withdrawn participants' data: a loop in the gateway process takes each withdrawal off the Redis
    list, asks chat to delete the sessions (DeleteUserData) and the labeler to forget them (labeler.forget_sessions),
    then marks the withdrawal record deleted."""

    drain: bool = True  # Off: withdrawals are only recorded and queued (another gateway replica may drain them).
    poll_seconds: int = Field(1, ge=1, le=4)  # How long one wait for a withdrawal blocks (under Redis' timeout).
    labeler_timeout_seconds: float = Field(600.0, gt=0)  # Wait this long for labeler.forget_sessions, then retry.
    retry_seconds: float = Field(5.0, gt=0)  # After a failure, doubling up to max_retry_seconds.
    max_retry_seconds: float = Field(300.0, gt=0)


class CanarySettings(BaseModel):
    """Canaries (``EMILI_GATEWAY__CANARY__*``): a candidate version's share of a study's new participants and the
    sequential test that promotes or rolls it back (the rule: :mod:`emili_affect.canary`; the monitor:
    ``emili_gateway.canary``)."""

    share: float = Field(0.1, gt=0, le=0.5)  # Default share of the production arm's new participants.
    max_sessions: int = Field(100, ge=5, le=100_000)  # Rated sessions per arm before promoting (if no harm).
    # Sessions per arm before harm may be called: the test plugs in variances estimated from the data, which on 2 or
    # 3 ratings can be near 0 and make any gap look certain (a demo rolled back on 2 candidate ratings). A canary
    # planned smaller (max_sessions) waits for max_sessions.
    min_sessions: int = Field(10, ge=3, le=100_000)

    alpha: float = Field(0.05, gt=0, lt=0.5)  # Shared by the outcomes (Bonferroni) for harm.
    margin: float = Field(0.25, ge=0)  # Rating points the candidate may lose and still be promoted.
    # The mixture scale per outcome (emili_affect.canary.DEFAULT_TAU says in which units).
    tau: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TAU))
    # How long a finished session whose label cannot be read yet holds back a promotion.
    label_grace_s: float = Field(900.0, ge=0)

    @field_validator("tau")
    @classmethod
    def _every_outcome(cls, tau: dict[str, float]) -> dict[str, float]:
        """Outcomes a configuration leaves out keep their defaults; a scale that is not positive is an error."""
        return check_tau(tau)

    def rule(self) -> CanaryRule:
        """The decision rule these settings configure (shared with the loop simulation study's offline canary)."""
        return CanaryRule(self.max_sessions, self.min_sessions, self.alpha, self.margin, self.tau)

    interval_s: float = Field(30.0, gt=0)  # How often the monitor looks; only one gateway replica does.
    monitor: bool = True


class GatewayOptions(BaseModel):
    server: GatewayServerSettings = GatewayServerSettings()
    limits: LimitSettings = LimitSettings()
    studies: StudyStoreSettings = StudyStoreSettings()
    withdrawals: WithdrawalSettings = WithdrawalSettings()
    canary: CanarySettings = CanarySettings()
    chat_target: str = "127.0.0.1:50052"
    fer_target: str = "127.0.0.1:50051"  # Camera checks (Analyze) only; chat streams frames to FER itself.
    labeler_target: str = "127.0.0.1:50053"  # Canary outcomes (LabelSession) only.
    chat_timeout_seconds: float = Field(10.0, gt=0)
    # After a browser disconnects, wait this long for chat to finish (and record) a reply already started.
    drain_seconds: float = Field(30.0, ge=0)


class GatewaySettings(CommonSettings):
    service_name: ClassVar[str] = "gateway"
    has_worker: ClassVar[bool] = False  # No background jobs: the server is the whole service.
    gateway: GatewayOptions = GatewayOptions()

    def http_url(self) -> str:
        """Where a client on this machine reaches the gateway, e.g. http://127.0.0.1:8080 (``emili study``)."""
        server = self.gateway.server
        host = "127.0.0.1" if server.host in {"0.0.0.0", "::", ""} else server.host
        return f"http://[{host}]:{server.http_port}" if ":" in host else f"http://{host}:{server.http_port}"

    def studies_prefix(self) -> str:
        """Where studies and their sessions are kept in bucket ``sessions`` (the loop reads a study's sessions)."""
        return self.gateway.studies.prefix

    def public_url(self) -> str:
        """Where participants reach it: ``server.public_base_url`` when set, else :meth:`http_url`."""
        return (self.gateway.server.public_base_url or self.http_url()).rstrip("/")

    def health_check(self) -> HealthCheck:
        """The gateway serves HTTP, not gRPC: ready when /readyz answers 200 (Redis, S3 and chat reachable)."""
        return HealthCheck("http", f"{self.http_url()}/readyz")

    def links(self) -> dict[str, str]:
        return {"participant app": f"{self.public_url()}/"}
