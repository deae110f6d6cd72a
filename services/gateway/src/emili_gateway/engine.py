"""What the gateway does for participants and researchers, without HTTP: the app only parses and calls this.

Every chat call carries the caller's own token, so chat applies its ownership rules too; the gateway checks
ownership first so that a participant gets a clear answer without a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Iterator
from typing import Any, Literal, Protocol

from emili_core.auth import Principal, create_token, verify_token
from emili_core.errors import (
    DependencyUnavailable,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from emili_gateway.canary import CanariesRequest, Canary, CanaryGroup, CanaryRequest
from emili_gateway.chat_client import ChatClient, FerClient
from emili_gateway.errors import CanaryNotFound, NoStudyForCanary, PayloadTooLarge
from emili_gateway.export import export_row
from emili_gateway.metrics import GatewayMetrics
from emili_gateway.models import (
    Consent,
    DeletionSummary,
    Invite,
    InviteRequest,
    Me,
    Participant,
    Progress,
    RatingRequest,
    Redeemed,
    SessionRecord,
    SessionView,
    Study,
    StudyPublic,
    StudyReport,
    StudySpec,
    SurveyRequest,
    Transcript,
    TranscriptEntry,
    WithdrawalStatus,
    Withdrawn,
)
from emili_gateway.ratelimit import RateLimiter
from emili_gateway.reports import ReportFinder, study_report
from emili_gateway.settings import GatewaySettings
from emili_gateway.studies import StudyEngine, already_running, check_feelings, now_ms
from emili_session.events import EventKind
from emili_session.registry import check_version

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"


def check_jpeg(data: bytes, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the image is {len(data)} bytes; the limit is {max_bytes} (send a smaller JPEG)")
    if not data.startswith(JPEG_MAGIC):
        raise InvalidInput("the image must be a JPEG (it should start with the bytes FF D8 FF)")


class OpenConversation(Protocol):
    def kick(self) -> None: ...


class GatewayEngine:
    def __init__(
        self,
        settings: GatewaySettings,
        studies: StudyEngine,
        chat: ChatClient,
        fer: FerClient,
        limiter: RateLimiter,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.options = settings.gateway
        self.limits = settings.gateway.limits
        self.studies = studies
        self.chat = chat
        self.fer = fer
        self.limiter = limiter
        self.metrics = metrics
        self.reports = ReportFinder(studies.objects)  # Evaluation reports (bucket models), for researchers.
        self._secret = settings.auth.secret.get_secret_value()
        # The open conversation of each session in this process: a newer connection replaces an older one.
        self.conversations: dict[str, OpenConversation] = {}
        self._background: set[asyncio.Task[None]] = set()

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` beyond the request that started it (kept referenced; cancelled by ``close``)."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- callers --------------------------------------------------------------------------------------------

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthenticated(
                "this needs 'Authorization: Bearer <token>'; participants get one by opening their invite link"
            )
        return verify_token(self._secret, token, self.settings.auth.issuer)

    async def admin(self, principal: Principal) -> Principal:
        principal.require("admin")
        await self.limiter.hit("admin", principal.subject, self.limits.admin_requests_per_minute, 60, "requests")
        return principal

    async def participant(self, principal: Principal) -> Participant:
        principal.require("chat")
        participant = await self.studies.participant(principal.subject)
        if participant is None:
            raise PermissionDenied(
                "this token does not belong to a study participant; open your invite link to take part"
            )
        if participant.withdrawn:
            raise PermissionDenied("you have withdrawn from this study, so nothing more can be recorded")
        await self.limiter.hit("requests", participant.participant_id, self.limits.requests_per_minute, 60, "requests")
        return participant

    async def owned_session(
        self, principal: Principal, session_id: str, *, active: bool = False
    ) -> tuple[Participant, SessionRecord, Study]:
        participant = await self.participant(principal)
        record = await self.studies.session(session_id)
        if record.participant_id != participant.participant_id:
            raise PermissionDenied(f"session {session_id} belongs to another participant")
        if active and record.state != "active":
            raise FailedPrecondition("this conversation has already ended")
        return participant, record, await self.studies.get_study(record.study_id)

    # --- researchers ----------------------------------------------------------------------------------------

    async def create_study(self, principal: Principal, spec: StudySpec) -> Study:
        return await self.studies.create_study(spec, principal.subject)

    async def create_invites(self, study_id: str, request: InviteRequest) -> list[Invite]:
        return await self.studies.create_invites(await self.studies.get_study(study_id), request)

    async def list_invites(self, study_id: str) -> list[Invite]:
        return await self.studies.list_invites(await self.studies.get_study(study_id))

    async def start_canary(self, principal: Principal, study_id: str, request: CanaryRequest) -> Canary:
        study = await self.studies.get_study(study_id)
        production = request.production or await self.studies.serving_arm(study_id, study.arms[0].arm)
        share = request.share or self.settings.gateway.canary.share
        return await self.studies.start_canary(study, request.candidate, production, share, principal.subject)

    async def canary(self, study_id: str, candidate: str | None = None) -> Canary:
        await self.studies.get_study(study_id)
        if candidate is None:
            canary = await self.studies.canary(study_id)
        else:
            check_version(candidate)
            canary = await self.studies.canary_of(study_id, candidate)
        if canary is None:
            which = f"no canary of {candidate}" if candidate else "no canary"
            raise CanaryNotFound(f"study {study_id} has had {which}; start one with POST .../canary")
        return canary

    async def start_canaries(self, principal: Principal, request: CanariesRequest) -> CanaryGroup:
        share = request.share or self.settings.gateway.canary.share
        # A candidate that can never run (unknown, rejected, retired) is refused before any study is looked for: the
        # loop gives it up rather than waiting for a study.
        await self.studies.check_candidate(request.candidate, request.production)
        if request.studies is not None:  # Named: each must take it, or none starts.
            chosen = [await self.studies.get_study(study_id) for study_id in dict.fromkeys(request.studies)]
            for study in chosen:
                if request.synthetic and not study.synthetic:
                    raise InvalidInput(
                        f"study {study.study_id} is people's: a candidate of simulated sessions (synthetic: true) "
                        "runs only in studies of simulated participants"
                    )
                await self.studies.check_serves(study, request.production)
            skipped: dict[str, str] = {}
        else:
            chosen, skipped = await self._studies_for_canary(request)
        if not chosen:
            why = "; ".join(f"{study_id}: {reason}" for study_id, reason in skipped.items())
            raise NoStudyForCanary(
                f"no study can take a canary of {request.candidate} now: {request.production!r} serves no arm of a "
                f"running study of {'simulated participants' if request.synthetic else 'people'} (one with an invite "
                "left) without a canary of its own" + (f" ({why})" if why else "")
            )
        canaries = await self.studies.start_canaries(
            chosen, request.candidate, request.production, share, principal.subject
        )
        return CanaryGroup.of(canaries, skipped)

    async def _studies_for_canary(self, request: CanariesRequest) -> tuple[list[Study], dict[str, str]]:
        """Every running study (one taking new participants: an invite left) of people, or of simulated participants
        with ``request.synthetic``, that ``request.production`` serves now; and those of them left out because another
        canary runs there, with why."""
        chosen: list[Study] = []
        skipped: dict[str, str] = {}
        for study in await self.studies.list_studies():
            if study.synthetic != request.synthetic or not await self.studies.running(study):
                continue
            if request.production not in (await self.studies.serving_versions(study)).values():
                continue
            if (current := await self.studies.running_canary(study.study_id)) is not None:
                skipped[study.study_id] = str(already_running(current))
                continue
            chosen.append(study)
        return chosen, skipped

    async def canary_group(self, candidate: str) -> CanaryGroup:
        check_version(candidate)
        canaries = await self.studies.candidate_canaries(candidate)
        if not canaries:
            raise CanaryNotFound(f"{candidate} has had no canary; start one with POST /api/v1/canaries")
        return CanaryGroup.of(canaries)

    async def roll_back_canaries(self, principal: Principal, candidate: str) -> CanaryGroup:
        group = await self.canary_group(candidate)
        if group.state != "running":
            raise FailedPrecondition(f"the canary of {candidate} was already {group.state.replace('_', ' ')}")
        await self._roll_back(principal, group.canaries[0])
        return await self.canary_group(candidate)

    async def roll_back_canary(self, principal: Principal, study_id: str) -> Canary:
        """The study's running canary, and with it its experiment's canaries in other studies."""
        canary = await self.canary(study_id)
        if canary.state != "running":
            raise FailedPrecondition(f"the canary of {canary.candidate} was already {canary.state.replace('_', ' ')}")
        return await self._roll_back(principal, canary)

    async def _roll_back(self, principal: Principal, canary: Canary) -> Canary:
        """Claim the rollback as the decision of ``canary``'s experiment and write it into each of its studies; a
        decision claimed first (the monitor's promotion) stands, and the rollback is refused."""
        stopped = canary.model_copy(
            update={"state": "rolled_back", "reason": f"rolled back by {principal.subject}", "decided_ms": now_ms()}
        )
        decision, claimed = await self.studies.claim_decision(stopped)
        if claimed:  # Counted once claimed: it stands even if writing it into every study fails now.
            self.metrics.canary_decisions.labels("rolled_back").inc()
        await self.studies.apply_decision(decision)  # Also finishes writing an earlier decision, if one was claimed.
        if not claimed:
            raise FailedPrecondition(
                f"the canary of {canary.candidate} was decided meanwhile ({decision.state.replace('_', ' ')}: "
                f"{decision.reason}); read it again"
            )
        return decision

    async def progress(self, study_id: str) -> Progress:
        return await self.studies.progress(await self.studies.get_study(study_id))

    async def export(self, token: str, study_id: str) -> list[dict[str, Any]]:
        """One row per session that is not withdrawn, with chat's transcript read with the researcher's token."""
        study = await self.studies.get_study(study_id)
        records = [r for r in await self.studies.study_sessions(study.study_id) if not r.withdrawn]
        limit = asyncio.Semaphore(4)

        async def row(record: SessionRecord) -> dict[str, Any]:
            async with limit:
                try:
                    _, events = await self.chat.transcript(token, record.session_id)
                except NotFound:
                    events = []  # Chat no longer holds it (e.g. its Redis was reset): the gateway's record remains.
            return export_row(study, record, events)

        return list(await asyncio.gather(*(row(r) for r in records)))

    async def report(self, study_id: str, api: str) -> StudyReport:
        """The newest evaluation report covering the study's arms (NotFound says so when there is none)."""
        study = await self.studies.get_study(study_id)
        found = await asyncio.to_thread(self.reports.newest_for, [a.arm for a in study.arms])
        return study_report(study, found, api)

    async def report_plot(self, study_id: str, run_id: str, plot: str) -> Iterator[bytes]:
        """A plot of an evaluation report covering the study's arms, in chunks (NotFound before the first)."""
        study = await self.studies.get_study(study_id)
        run = await asyncio.to_thread(self.reports.run_for, run_id, [a.arm for a in study.arms])
        return await asyncio.to_thread(self.reports.plot, run, plot)

    # --- participants ---------------------------------------------------------------------------------------

    async def redeem(self, code: str, client: str) -> Redeemed:
        await self.limiter.hit("redeem", client, self.limits.redeem_per_minute, 60, "invite attempts from here")
        ttl = self.options.studies.participant_token_ttl_seconds
        try:
            participant, withdraw_code = await self.studies.redeem(code, ttl)
        except Exception as exc:
            self.metrics.redemptions.labels(type(exc).__name__).inc()
            raise
        self.metrics.redemptions.labels("ok").inc()
        token = create_token(self._secret, participant.participant_id, ["chat"], ttl, issuer=self.settings.auth.issuer)
        study = await self.studies.get_study(participant.study_id)
        return Redeemed(
            token=token,
            token_expires_ms=now_ms() + ttl * 1000,
            participant_id=participant.participant_id,
            withdraw_code=withdraw_code,
            study=StudyPublic.of(study),
        )

    async def me(self, principal: Principal) -> Me:
        participant = await self.participant(principal)
        study = await self.studies.get_study(participant.study_id)
        sessions = await self.studies.participant_sessions(participant.participant_id)
        return Me(
            participant_id=participant.participant_id,
            study=StudyPublic.of(study),
            sessions=[SessionView.of(r, study) for r in sessions],
        )

    async def create_session(self, principal: Principal, token: str, consent: Consent) -> SessionView:
        participant = await self.participant(principal)
        study = await self.studies.get_study(participant.study_id)
        if not consent.agree:
            raise InvalidInput(
                "consent.agree must be true to take part; if you do not want to take part, just close the page: "
                "nothing has been stored"
            )
        if consent.store_frames and not consent.camera:
            raise InvalidInput("store_frames needs camera: face frames can only be kept when the camera is on")
        if not consent.camera and study.without_camera == "stop":
            raise FailedPrecondition(
                "this study needs your camera, so it cannot go on without it; thank you for your interest"
            )
        await self.studies.start_session(participant)
        try:
            arm = await self.studies.assign_arm(study, participant)
            chat_session = await self.chat.create_session(
                token,
                arm=arm,
                store_frames=consent.store_frames,
                use_for_training=consent.use_for_training,
                cadence=study.readout_cadence,
                speak_on_change=study.speak_on_change,
                synthetic=study.synthetic,
            )
        except BaseException:
            await self.studies.cancel_session_start(participant)
            raise
        record = SessionRecord(
            session_id=chat_session.session_id,
            study_id=study.study_id,
            participant_id=participant.participant_id,
            arm=arm,
            created_ms=chat_session.created_ms or now_ms(),
            camera=consent.camera,
            store_frames=consent.store_frames,
            use_for_training=consent.use_for_training,
            last_activity_ms=now_ms(),
            synthetic=study.synthetic,
        )
        await self.studies.save_session(record)
        self.metrics.sessions_created.labels(self.metrics.study_label(study.study_id), arm).inc()
        return SessionView.of(record, study)

    async def session_view(self, principal: Principal, session_id: str) -> SessionView:
        _, record, study = await self.owned_session(principal, session_id)
        return SessionView.of(record, study)

    async def submit_survey(
        self, principal: Principal, token: str, session_id: str, phase: Literal["pre", "post"], survey: SurveyRequest
    ) -> None:
        _, record, study = await self.owned_session(principal, session_id, active=phase == "pre")
        current = check_feelings(survey.current_feelings, study.current_feelings, "current feelings")
        desired = check_feelings(survey.desired_feelings, study.desired_feelings, "desired feelings")
        if len(survey.text) > self.limits.max_survey_chars:
            raise InvalidInput(
                f"the text is {len(survey.text)} characters; please keep it under {self.limits.max_survey_chars}"
            )
        await self.chat.submit_survey(token, session_id, phase, current, desired, survey.text)
        await self.studies.update_session(record, **{f"{phase}_survey": True})

    async def submit_rating(self, principal: Principal, token: str, session_id: str, rating: RatingRequest) -> None:
        _, record, _ = await self.owned_session(principal, session_id)
        if len(rating.comment) > self.limits.max_comment_chars:
            raise InvalidInput(
                f"the comment is {len(rating.comment)} characters; please keep it under {self.limits.max_comment_chars}"
            )
        await self.chat.submit_rating(
            token,
            session_id,
            empathy=rating.empathy,
            relevance=rating.relevance,
            fluency=rating.fluency,
            comment=rating.comment,
        )
        answers = {"empathy": rating.empathy, "relevance": rating.relevance, "fluency": rating.fluency}
        await self.studies.update_session(record, rated=True, rating=answers)

    async def end_session(self, principal: Principal, token: str, session_id: str) -> SessionView:
        """Ends the session (chat then persists its record). Ending an ended session is not an error."""
        _, record, study = await self.owned_session(principal, session_id)
        if record.state == "active":
            # Chat saying it has ended already (a retry after a lost reply) is the outcome wanted.
            with contextlib.suppress(FailedPrecondition):
                await self.chat.end_session(token, session_id)
            fresh = await self.studies.session(session_id)
            record = await self.studies.update_session(fresh, state="ended", ended_ms=now_ms())
        return SessionView.of(record, study)

    async def transcript(self, principal: Principal, token: str, session_id: str) -> Transcript:
        _, _, study = await self.owned_session(principal, session_id)
        _, events = await self.chat.transcript(token, session_id)
        entries = []
        for event in events:
            text = event.payload.get("text")
            if not isinstance(text, str):
                continue
            if event.kind == EventKind.USER_MESSAGE:
                entries.append(TranscriptEntry(kind="user_message", text=text, time_ms=event.time_ms))
            elif event.kind == EventKind.ASSISTANT_MESSAGE:
                unprompted = bool(event.payload.get("unprompted", False))
                entries.append(
                    TranscriptEntry(kind="assistant_message", text=text, time_ms=event.time_ms, unprompted=unprompted)
                )
            elif event.kind == EventKind.READOUT_INJECTED and study.show_readouts:
                entries.append(TranscriptEntry(kind="readout", text=text, time_ms=event.time_ms))
        return Transcript(session_id=session_id, entries=entries)

    async def camera_check(self, principal: Principal, jpeg: bytes) -> bool:
        participant = await self.participant(principal)
        await self.limiter.hit(
            "camera", participant.participant_id, self.limits.camera_checks_per_minute, 60, "camera checks"
        )
        check_jpeg(jpeg, self.limits.max_frame_bytes)
        return await self.fer.face_found(jpeg)

    async def withdraw(self, code: str, client: str) -> Withdrawn:
        await self.limiter.hit("withdraw", client, self.limits.redeem_per_minute, 60, "withdraw attempts from here")
        participant = await self.studies.participant_by_withdraw_code(code)
        if participant is None:
            raise NotFound(
                "this withdraw code is not known; check it (four groups of letters and digits, e.g. "
                "ABCD-EFGH-IJKL-MNOP) or contact the researcher"
            )
        sessions = await self.studies.participant_sessions(participant.participant_id)
        detail = (
            "your withdrawal is recorded: your conversations are excluded from this study's results and their "
            "deletion has been requested"
        )
        if participant.withdrawn:
            # Once the data are deleted the gateway's session records are gone too: the request still lists them.
            request = await self.studies.withdrawal(participant.study_id, participant.participant_id) or {}
            count = max(len(sessions), len(request.get("session_ids", [])))
            return Withdrawn(withdrawn=True, sessions=count, detail=detail)
        # Recorded before anything else, so that a chat outage cannot keep the participant in the study.
        await self.studies.withdraw(participant, sessions)
        token = create_token(self._secret, participant.participant_id, ["chat"], 300, issuer=self.settings.auth.issuer)
        for record in sessions:
            if record.state == "active":
                try:
                    with contextlib.suppress(FailedPrecondition, NotFound):
                        await self.chat.end_session(token, record.session_id)
                except DependencyUnavailable as exc:
                    log.warning("withdrawal: could not end session %s in chat: %s", record.session_id, exc)
                    continue
                try:
                    fresh = await self.studies.session(record.session_id)
                except NotFound:  # The withdrawal drainer already deleted the data, the gateway's record too.
                    continue
                await self.studies.update_session(fresh, state="ended", ended_ms=now_ms())
        return Withdrawn(withdrawn=True, sessions=len(sessions), detail=detail)

    async def withdrawal_status(self, code: str, client: str) -> WithdrawalStatus:
        """Where the deletion of a withdrawn participant's data stands, and once done what was removed."""
        await self.limiter.hit(
            "withdraw-status", client, self.limits.requests_per_minute, 60, "withdrawal status checks from here"
        )
        participant = await self.studies.participant_by_withdraw_code(code)
        if participant is None:
            raise NotFound("this withdraw code is not known; check it or contact the researcher")
        if not participant.withdrawn:
            raise FailedPrecondition("you have not withdrawn from this study; withdraw first with this code")
        record = await self.studies.withdrawal(participant.study_id, participant.participant_id) or {}
        sessions = len(record.get("deleted_session_ids", record.get("session_ids", [])))
        if not record.get("deleted"):
            return WithdrawalStatus(
                withdrawn=True,
                deleted=False,
                sessions=sessions,
                requested_ms=int(record.get("requested_ms", 0)),
                detail="your withdrawal is recorded and your data are being deleted; this takes a few minutes",
            )
        removed = record.get("removed", {})
        chat, labeler, gateway = (removed.get(k, {}) for k in ("chat", "labeler", "gateway"))
        summary = DeletionSummary(
            conversations=int(chat.get("sessions", 0)),
            events=int(chat.get("events", 0)),
            stored_objects=int(chat.get("record_objects", 0)),
            face_frames=int(chat.get("frames", 0)),
            labels=int(labeler.get("labels", 0)),
            datasets_withdrawn=int(labeler.get("datasets_withdrawn", 0)),
            datasets_rebuilt=int(labeler.get("datasets_rebuilt", 0)),
            models_marked=int(labeler.get("models_marked", 0)),
            models_retired=int(labeler.get("models_retired", 0)),
            study_records=int(gateway.get("session_records", 0)),
        )
        return WithdrawalStatus(
            withdrawn=True,
            deleted=True,
            sessions=sessions,
            requested_ms=int(record.get("requested_ms", 0)),
            deleted_ms=int(record.get("deleted_ms", 0)) or None,
            removed=summary,
            detail=(
                "your data have been deleted: your conversations, any stored face frames and the labels made from "
                "them; training datasets that held them are withdrawn"
            ),
        )
