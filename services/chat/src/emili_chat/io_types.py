"""The engine's inputs and outputs: what the gRPC adapter (``codec``) converts to and from."""

from __future__ import annotations

from dataclasses import dataclass

# --- what a Converse stream brings in ---------------------------------------------------------------------


@dataclass(frozen=True)
class UserText:
    text: str
    client_time_ms: int = 0


@dataclass(frozen=True)
class Frame:
    jpeg: bytes
    capture_time_ms: int


@dataclass(frozen=True)
class ClientReading:
    face_found: bool
    probabilities: dict[str, float]
    capture_time_ms: int


ConverseInput = UserText | Frame | ClientReading


# --- what it sends back -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delta:
    turn_id: str
    text: str


@dataclass(frozen=True)
class AssistantReply:
    turn_id: str
    text: str
    unprompted: bool
    model_id: str
    time_ms: int


@dataclass(frozen=True)
class Readout:
    text: str
    cadence: str
    time_ms: int


@dataclass(frozen=True)
class Accepted:
    event_id: str
    time_ms: int


ConverseOutput = Delta | AssistantReply | Readout | Accepted


# --- a session's options as requested (None: the service's default) -----------------------------------------


@dataclass(frozen=True)
class SessionOptions:
    cadence: str | None = None
    speak_on_change: bool | None = None
    post_response_reading_s: float | None = None
