"""Simulated users for demos, CI and load tests: they drive the chat API like a client app (see SIMULATOR.md)."""

from emili_pipeline.simulator.faces import FaceSet, load_face_set
from emili_pipeline.simulator.personas import Persona, load_personas
from emili_pipeline.simulator.run import (
    SessionOutcome,
    SimulatorSettings,
    TurnResult,
    lost_events,
    run_user,
    run_users,
    summarize,
    transcript_events,
    user_subject,
)
from emili_pipeline.simulator.state import EmotionState, HiddenState, ReplyQuality, reply_quality
from emili_pipeline.simulator.user import SimulatedUser

__all__ = [
    "EmotionState",
    "FaceSet",
    "HiddenState",
    "Persona",
    "ReplyQuality",
    "SessionOutcome",
    "SimulatedUser",
    "SimulatorSettings",
    "TurnResult",
    "load_face_set",
    "load_personas",
    "lost_events",
    "reply_quality",
    "run_user",
    "run_users",
    "summarize",
    "transcript_events",
    "user_subject",
]
