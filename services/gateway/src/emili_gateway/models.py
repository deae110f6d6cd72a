"""The gateway's data: studies, invites, participants and their sessions, and the API's request and reply bodies.

Plain pydantic models, shared by the engine (which knows no HTTP) and the FastAPI app (which serialises them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from emili_session import surveys

# The EMILI survey vocabularies and the paper's Likert ratings, defined once in emili_session.surveys.
DEFAULT_CURRENT_FEELINGS = surveys.CURRENT_FEELINGS
DEFAULT_DESIRED_FEELINGS = surveys.DESIRED_FEELINGS
RATING_QUESTIONS = dict(surveys.RATING_QUESTIONS)
LIKERT_LABELS = dict(surveys.LIKERT_LABELS)

Cadence = Literal["before_user_message", "fixed_interval", "on_change"]
ArmId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
Feeling = Annotated[str, StringConstraints(min_length=1, max_length=40, pattern=r"^[^\x00-\x1f]+$")]
Likert = Annotated[int, Field(ge=1, le=5)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- studies ------------------------------------------------------------------------------------------------


class ArmSpec(_Strict):
    arm: ArmId = Field(description='"base" or a registered model version id (as chat\'s model_arm)')
    weight: float = Field(1.0, gt=0, le=1000, description="Allocation weight: arms get sessions in this ratio")


def _unique(values: list[str], what: str) -> None:
    seen = {v.casefold() for v in values}
    if len(seen) != len(values):
        raise ValueError(f"{what} must not repeat")


class StudySpec(_Strict):
    """What a researcher sets when creating a study."""

    name: str = Field(min_length=1, max_length=200)
    arms: list[ArmSpec] = Field(min_length=1, max_length=10)
    consent_text: str = Field(min_length=1, max_length=20000)
    current_feelings: list[Feeling] = Field(
        default_factory=lambda: list(DEFAULT_CURRENT_FEELINGS), min_length=1, max_length=40
    )
    desired_feelings: list[Feeling] = Field(
        default_factory=lambda: list(DEFAULT_DESIRED_FEELINGS), min_length=1, max_length=40
    )
    readout_cadence: Cadence = "before_user_message"
    speak_on_change: bool = True
    max_turns: int | None = Field(10, ge=1, le=200, description="User messages per session; null = no limit")
    time_limit_seconds: int | None = Field(None, ge=30, le=4 * 3600, description="null = no limit")
    show_readouts: bool = Field(False, description="Whether participants see the face readouts EMILI sees")
    without_camera: Literal["continue", "stop"] = Field(
        "continue", description="A participant without a camera (or declining it) chats without face, or stops"
    )
    synthetic: bool = Field(
        False,
        description="A study for SIMULATED participants (demos, simulation studies): every session of it is recorded "
        "as synthetic, so it is never counted or exported as people's data. Set when the study is created; "
        "participants see it.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        _unique([a.arm for a in self.arms], "arms")
        _unique(self.current_feelings, "current_feelings")
        _unique(self.desired_feelings, "desired_feelings")
        if self.max_turns is None and self.time_limit_seconds is None:
            raise ValueError("a study needs max_turns or time_limit_seconds (or both)")
        return self


class Study(StudySpec):
    study_id: str
    created_ms: int
    created_by: str


class RatingQuestion(BaseModel):
    name: str
    question: str


class StudyPublic(BaseModel):
    """What a participant may see of a study: never its arms."""

    study_id: str
    name: str
    consent_text: str
    current_feelings: list[str]
    desired_feelings: list[str]
    max_turns: int | None
    time_limit_seconds: int | None
    show_readouts: bool
    without_camera: Literal["continue", "stop"]
    synthetic: bool = Field(description="Sessions are recorded as made by a simulator, not a person")
    rating_questions: list[RatingQuestion]
    likert_labels: dict[int, str]

    @classmethod
    def of(cls, study: Study) -> StudyPublic:
        return cls(
            study_id=study.study_id,
            name=study.name,
            consent_text=study.consent_text,
            current_feelings=study.current_feelings,
            desired_feelings=study.desired_feelings,
            max_turns=study.max_turns,
            time_limit_seconds=study.time_limit_seconds,
            show_readouts=study.show_readouts,
            without_camera=study.without_camera,
            synthetic=study.synthetic,
            rating_questions=[RatingQuestion(name=k, question=v) for k, v in RATING_QUESTIONS.items()],
            likert_labels=LIKERT_LABELS,
        )


class StudyList(BaseModel):
    studies: list[Study]


# --- invites and participants -------------------------------------------------------------------------------


class InviteRequest(_Strict):
    count: int = Field(1, ge=1, le=1000, description="How many invite codes to make")
    max_uses: int = Field(1, ge=1, le=100000, description="1 = single-use; more = one link for many people")
    expires_in_seconds: int = Field(14 * 24 * 3600, ge=60, le=366 * 24 * 3600)


class Invite(BaseModel):
    code: str
    study_id: str
    max_uses: int
    uses: int
    expires_ms: int
    created_ms: int
    url: str = ""


class InviteList(BaseModel):
    invites: list[Invite]


class Redeemed(BaseModel):
    token: str = Field(description="Bearer token for the participant API and the conversation WebSocket")
    token_expires_ms: int
    participant_id: str
    withdraw_code: str = Field(description="Keep it: it lets the participant withdraw their data later")
    study: StudyPublic


class Participant(BaseModel):
    participant_id: str
    study_id: str
    invite: str
    created_ms: int
    withdraw_hash: str
    arm: str = ""  # The version serving them: their study arm's, a promoted candidate or a canary's.
    study_arm: str = ""  # The study arm allocation chose: where they go back to when their version is retired.
    withdrawn: bool = False


# --- sessions -----------------------------------------------------------------------------------------------


class Consent(_Strict):
    agree: bool = Field(description="Takes part; must be true (declining creates and stores nothing)")
    camera: bool = Field(False, description="Face frames go to EMILI during the chat")
    store_frames: bool = Field(False, description="The face frames are kept (needs camera)")
    use_for_training: bool = Field(False, description="The conversation may be used to train models")


class CreateSessionRequest(_Strict):
    consent: Consent


class SessionRecord(BaseModel):
    """The gateway's record of one session; the arm is here, never in what a participant is sent."""

    session_id: str
    study_id: str
    participant_id: str
    arm: str
    created_ms: int
    camera: bool
    store_frames: bool
    use_for_training: bool
    state: Literal["active", "ended"] = "active"
    ended_ms: int = 0
    last_activity_ms: int = 0
    turns: int = 0
    pre_survey: bool = False
    post_survey: bool = False
    rated: bool = False
    rating: dict[str, int] | None = None  # The participant's answers (a canary's outcome); replaced on resubmission.
    withdrawn: bool = False
    synthetic: bool = False  # The study's participants are simulated: chat records the session as synthetic too.


class SessionView(BaseModel):
    """A session as its participant sees it (blinded: no arm, no model)."""

    session_id: str
    state: Literal["active", "ended"]
    created_ms: int
    camera: bool
    store_frames: bool
    use_for_training: bool
    turns: int
    max_turns: int | None
    time_limit_seconds: int | None
    pre_survey: bool
    post_survey: bool
    rated: bool

    @classmethod
    def of(cls, record: SessionRecord, study: Study) -> SessionView:
        return cls(
            session_id=record.session_id,
            state=record.state,
            created_ms=record.created_ms,
            camera=record.camera,
            store_frames=record.store_frames,
            use_for_training=record.use_for_training,
            turns=record.turns,
            max_turns=study.max_turns,
            time_limit_seconds=study.time_limit_seconds,
            pre_survey=record.pre_survey,
            post_survey=record.post_survey,
            rated=record.rated,
        )


class Me(BaseModel):
    participant_id: str
    study: StudyPublic
    sessions: list[SessionView]


class SurveyRequest(_Strict):
    current_feelings: list[Feeling] = Field(default_factory=list, max_length=40)
    desired_feelings: list[Feeling] = Field(default_factory=list, max_length=40)
    text: str = Field("", max_length=100000, description="Free text: how the participant feels, in their words")


class RatingRequest(_Strict):
    empathy: Likert = Field(description=RATING_QUESTIONS["empathy"])
    relevance: Likert = Field(description=RATING_QUESTIONS["relevance"])
    fluency: Likert = Field(description=RATING_QUESTIONS["fluency"])
    comment: str = Field("", max_length=100000)


class Ok(BaseModel):
    ok: bool = True


class TranscriptEntry(BaseModel):
    kind: Literal["user_message", "assistant_message", "readout"]
    text: str
    time_ms: int
    unprompted: bool = False


class Transcript(BaseModel):
    session_id: str
    entries: list[TranscriptEntry]


class CameraCheck(BaseModel):
    face_found: bool


class WithdrawRequest(_Strict):
    withdraw_code: str = Field(min_length=1, max_length=200)


class Withdrawn(BaseModel):
    withdrawn: bool
    sessions: int
    detail: str


class DeletionSummary(BaseModel):
    """What deleting a withdrawn participant's data removed (counts only)."""

    conversations: int = Field(description="Sessions deleted from chat (Redis and object storage)")
    events: int = Field(description="Messages, face readings and other events of those sessions")
    stored_objects: int = Field(description="Session record files and FER readings in object storage")
    face_frames: int = Field(description="Stored face frames")
    labels: int = Field(description="Emotion labels computed from the sessions")
    datasets_withdrawn: int = Field(description="Training datasets that held the sessions, now withdrawn")
    datasets_rebuilt: int = Field(description="Of those, rebuilt without the sessions")
    models_marked: int = Field(0, description="Model versions trained on the sessions, marked in their lineage")
    models_retired: int = Field(0, description="Of those, retired: no longer used in conversations")
    study_records: int = Field(description="The gateway's own records of the sessions")


class WithdrawalStatus(BaseModel):
    withdrawn: bool
    deleted: bool = Field(description="True once the data are deleted everywhere; until then, deletion is under way")
    sessions: int
    requested_ms: int
    deleted_ms: int | None = None
    removed: DeletionSummary | None = None
    detail: str


# --- researchers -------------------------------------------------------------------------------------------


class ArmProgress(BaseModel):
    arm: str
    weight: float
    assigned: int
    active: int
    completed: int
    abandoned: int
    withdrawn: int


class Progress(BaseModel):
    study_id: str
    participants: int
    invites: int
    invite_uses: int
    sessions: int
    arms: list[ArmProgress]


class ReportPlot(BaseModel):
    name: str = Field(description="The plot's file name, e.g. table1.png")
    title: str
    url: str = Field(description="GET it with the admin token: the PNG")


class StudyReport(BaseModel):
    """The newest evaluation report whose arms include all of a study's arms (written by the trainer)."""

    study_id: str
    run_id: str = Field(description="The evaluation run (emili report RUN_ID shows the same report)")
    title: str
    arms: list[str] = Field(description="The arms the evaluation compared")
    study_arms: list[str]
    created_ms: int = Field(description="When the evaluation run was created (0: not recorded)")
    updated_ms: int = Field(description="When the evaluation run last changed (0: not recorded)")
    synthetic: bool | None = Field(
        description="True when the report says its data came from simulated users; null when it does not say"
    )
    ratings_table: dict[str, Any] = Field(
        description='Table 1: {arm: {"n", "empathy"|"relevance"|"fluency": {"mean", "ci95": [lo, hi]}}}'
    )
    delta_table: dict[str, Any] | None = Field(
        description='Table 2: {"lexicon", "sessions", "arms": {arm: {"n", "valence"|"arousal"|"dominance": '
        '{"mean", "ci95"}}}}; null when the evaluation had none'
    )
    plots: list[ReportPlot]


class ErrorBody(BaseModel):
    error: str = Field(description="A stable machine-readable code, e.g. invalid_input, canary_not_found")
    detail: str = Field(description="What went wrong and what to do about it, for a person")
