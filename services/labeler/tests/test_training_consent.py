"""Training labels and datasets only for sessions whose users consented to training (``use_for_training``):
``label_session`` refuses the others and stores nothing; the dataset builders, the pipeline's label and datasets
steps, the weight fit and the delta table skip them and count them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from emili_core.errors import FailedPrecondition, NotFound
from emili_core.keys import session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import S3Settings
from emili_labeler import jobs, pipeline_steps
from emili_labeler.runtime import build_runtime
from emili_labeler.settings import LabelerSettings
from emili_session.events import Event, EventKind

pytestmark = pytest.mark.integration
T0 = 1_790_000_000_000
HAPPY = {"angry": 0.0, "disgust": 0.0, "fear": 0.0, "happy": 0.9, "sad": 0.0, "surprise": 0.0, "neutral": 0.1}
NEUTRAL = {"angry": 0.0, "disgust": 0.0, "fear": 0.0, "happy": 0.1, "sad": 0.1, "surprise": 0.0, "neutral": 0.8}


def store_session(store: ObjectStore, session_id: str, use_for_training: bool) -> None:
    """A persisted session record: one user message, one reply the user smiled at."""
    events: list[Event] = []

    def add(kind: EventKind, at: int, **payload: Any) -> None:
        events.append(Event(f"{at}-0", kind, at, payload))

    def reading(at: int, probabilities: dict[str, float]) -> None:
        add(
            EventKind.FER_READING, at, capture_time_ms=at, face_found=True, probabilities=probabilities, source="client"
        )

    add(
        EventKind.SESSION_CREATED, T0, model_arm="base", model_id="scripted", options={}, system_prompt="You are EMILI."
    )
    add(EventKind.PRE_SURVEY, T0 + 100, current_feelings=["Sad"], desired_feelings=[], text="I feel sad and tired.")
    reading(T0 + 900, NEUTRAL)
    add(EventKind.USER_MESSAGE, T0 + 1000, text="I failed my driving test today.")
    add(
        EventKind.ASSISTANT_MESSAGE,
        T0 + 3000,
        text="Oh no, I'm sorry. How are you holding up?",
        turn_id="t1",
        unprompted=False,
        model_id="scripted",
    )
    reading(T0 + 3500, HAPPY)
    add(EventKind.POST_SURVEY, T0 + 20000, current_feelings=[], desired_feelings=[], text="I feel happy and calm.")
    keys = session_record_keys(session_id)
    lines = "".join(json.dumps(e.to_json()) + "\n" for e in events).encode()
    store.put_bytes(Bucket.SESSIONS, keys["events.jsonl"], lines)
    manifest = {
        "session_id": session_id,
        "user_id": f"user-{session_id}",
        "model_arm": "base",
        "use_for_training": use_for_training,
        "store_frames": False,
        "synthetic": False,
        "last_event_id": events[-1].event_id,
    }
    store.put_json(Bucket.SESSIONS, keys["session.json"], manifest)


@pytest.fixture(scope="module")
def runtime(s3_settings: S3Settings) -> jobs.Runtime:
    settings = LabelerSettings(s3=s3_settings)
    return build_runtime(
        settings.model_copy(update={"labeler": settings.labeler.model_copy(update={"oov_method": "none"})})
    )


def test_label_session_refuses_a_session_without_training_consent(runtime: jobs.Runtime) -> None:
    store_session(runtime.store, "tc-no", use_for_training=False)
    with pytest.raises(FailedPrecondition, match="did not consent to training"):
        jobs.label_session(runtime, "tc-no")
    assert runtime.store.list_keys(Bucket.SESSIONS, "tc-no/labels/") == []


def test_builders_and_pipeline_steps_skip_and_count_sessions_without_consent(runtime: jobs.Runtime) -> None:
    store = runtime.store
    store_session(store, "tc-yes", use_for_training=True)
    store_session(store, "tc-no-1", use_for_training=False)
    store_session(store, "tc-no-2", use_for_training=False)
    sessions = ["tc-yes", "tc-no-1", "tc-no-2"]

    sft = jobs.build_sft_dataset(runtime, sessions)
    assert sft["source_sessions"] == ["tc-yes"] and sft["skipped_no_training_consent"] == 2
    with pytest.raises(NotFound, match="2 sessions without training consent skipped"):  # One reply: no pairs.
        jobs.build_dpo_dataset(runtime, "feedback", sessions)
    table = jobs.delta_table(runtime, sessions)
    assert table["sessions"] == 1 and table["skipped_no_training_consent"] == 2
    for session_id in ("tc-no-1", "tc-no-2"):
        assert store.list_keys(Bucket.SESSIONS, f"{session_id}/labels/") == []

    step = pipeline_steps.delta_table(runtime, {"sessions": sessions, "steps": {}})
    assert step["table"]["sessions"] == 1 and list(step["gate_items"]) == ["base"]
    real = step["gate_items"]["base"]["real"]
    assert real["sessions"] == 1 and len(real["delta_v"]) == 1 and real["delta_v"][0] > 0  # Sad, then happy.

    labelled = pipeline_steps.label(runtime, {"sessions": sessions})
    assert labelled["labelled"] == 1 and labelled["failed"] == {}
    assert labelled["skipped_no_training_consent"] == 2
    assert labelled["notes"] == ["2 sessions without training consent skipped"]
