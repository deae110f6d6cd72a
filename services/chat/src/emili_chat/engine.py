"""The chat data plane, free of any transport: sessions, surveys, ratings, and opening live conversations."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from emili_chat.adapters import AdapterRegistry
from emili_chat.conversation import Conversation
from emili_chat.deletion import DeletedSession, Deletion, persisted_owner, sweep_objects
from emili_chat.frames import FrameSpill, FrameUploader
from emili_chat.io_types import ConverseInput, ConverseOutput, SessionOptions
from emili_chat.llm import ChatBackend
from emili_chat.metrics import chat_metrics
from emili_chat.settings import ChatSettings
from emili_chat.store import ACTIVE, SessionRecord, SessionStore, ended_message, new_session_id
from emili_core.auth import Principal
from emili_core.deletion import MAX_REASON_CHARS, audit_deletion, session_deleted, tombstone, write_tombstone
from emili_core.errors import FailedPrecondition, InvalidInput, NotFound, PermissionDenied
from emili_core.keys import check_session_id
from emili_core.objectstore import ObjectStore
from emili_session.events import Event, PostSurvey, PreSurvey, Rating, SessionCreated, SessionEnded

log = logging.getLogger(__name__)


def _frame_spill(folder: Path, max_bytes: int) -> FrameSpill | None:
    """The spill folder, or None (frames beyond memory are dropped) when it is turned off or cannot be made: a
    read-only disk must not stop conversations."""
    if not max_bytes:
        return None
    try:
        return FrameSpill(folder, max_bytes)
    except OSError as exc:
        log.warning("frames will not spill to %s (%s): beyond the memory buffer they are dropped", folder, exc)
        return None


CADENCES = ("before_user_message", "fixed_interval", "on_change")
LIKERT = range(1, 6)
SURVEYS: dict[str, type[PreSurvey] | type[PostSurvey]] = {"pre": PreSurvey, "post": PostSurvey}
MAX_DELETE_SESSIONS = 10_000
_PAGE_TOKEN = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")  # A Redis stream id: the last event of the page before.


@dataclass(frozen=True)
class TranscriptPage:
    record: SessionRecord
    events: list[Event]
    next_page_token: str  # The last event id of this page; empty when no event follows.


def normalise_feelings(chosen: Iterable[str], vocabulary: Sequence[str], what: str, limit: int) -> tuple[str, ...]:
    """The chosen feelings in the vocabulary's spelling (matched ignoring case), each once, in the order chosen;
    ``InvalidInput`` naming the allowed words for any other, and for more than ``limit``."""
    allowed = {word.casefold(): word for word in vocabulary}
    chosen = [str(c) for c in chosen]
    if len(chosen) > 2 * max(limit, len(allowed)):  # Refused before looking at them: a bound on the work too.
        raise InvalidInput(f"{what}: {len(chosen)} given, over the limit of {limit}")
    unknown = [c for c in chosen if c.strip().casefold() not in allowed]
    if unknown:
        shown = ", ".join(repr(u[:40]) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise InvalidInput(f"{what}: {shown} not offered; choose from {', '.join(vocabulary)}")
    result = tuple(dict.fromkeys(allowed[c.strip().casefold()] for c in chosen))
    if len(result) > limit:
        raise InvalidInput(f"{what}: {len(result)} chosen, over the limit of {limit}")
    return result


class ChatEngine:
    def __init__(
        self,
        settings: ChatSettings,
        backend: ChatBackend,
        store: SessionStore,
        *,
        fer_channel: grpc.aio.Channel | None = None,
        objects: ObjectStore | None = None,
        on_session_ended: Callable[[str], None] = lambda session_id: None,
    ) -> None:
        self.settings = settings
        self.options = settings.chat
        self.backend = backend
        self.store = store
        self.fer_channel = fer_channel
        self.objects = objects
        self.on_session_ended = on_session_ended
        self.adapters = AdapterRegistry(backend, objects, settings.artifact(self.options.adapter_cache))
        self.system_prompt = self.options.system_prompt.read_text().strip()
        self.metrics = chat_metrics()
        buffer = self.options.frame_buffer
        self.frames = (
            FrameUploader(
                objects,
                store,
                max_bytes=buffer.max_bytes,
                uploaders=buffer.uploaders,
                retry_max_s=buffer.retry_max_s,
                spill=_frame_spill(settings.artifact(buffer.spill_dir), buffer.spill_max_bytes),
            )
            if objects is not None
            else None
        )

    async def start(self) -> None:
        if self.frames is not None and self.frames.spill is not None and len(self.frames.spill):
            log.info("uploading %d frames spilled by an earlier process", len(self.frames.spill))
            self.frames.start()
        await self.backend.load()

    def _resolve_options(self, requested: SessionOptions) -> dict[str, Any]:
        defaults = self.options.readout
        cadence = requested.cadence or defaults.cadence
        if cadence not in CADENCES:
            raise InvalidInput(f"unknown readout cadence {cadence!r}; one of {CADENCES}")
        delay = (
            defaults.post_response_reading_s
            if requested.post_response_reading_s is None
            else requested.post_response_reading_s
        )
        if not 0 <= delay <= 60:
            raise InvalidInput("post_response_reading_seconds must be between 0 and 60")
        speak = defaults.speak_on_change if requested.speak_on_change is None else requested.speak_on_change
        return {
            "cadence": cadence,
            "speak_on_change": speak or cadence == "on_change",
            "post_response_reading_s": delay,
        }

    async def create_session(
        self,
        principal: Principal,
        *,
        store_frames: bool,
        use_for_training: bool,
        arm: str,
        options: SessionOptions,
        synthetic: bool = False,
    ) -> SessionRecord:
        principal.require("chat")
        arm = arm or self.options.default_arm
        adapter = await self.adapters.resolve(arm, synthetic=synthetic)
        record = SessionRecord(
            session_id=new_session_id(),
            user_id=principal.subject,
            model_arm=arm,
            model_id=self.backend.model_id(adapter),
            store_frames=store_frames,
            use_for_training=use_for_training,
            options=self._resolve_options(options),
            synthetic=synthetic,
        )
        await self.store.create(record)
        # The prompt is recorded with the session, so labels and datasets use exactly what the model saw.
        await self.store.record(
            record.session_id,
            SessionCreated(
                model_arm=arm,
                model_id=record.model_id,
                options=record.options,
                system_prompt=self.system_prompt,
                synthetic=synthetic,
            ),
        )
        return record

    async def _active(self, principal: Principal, session_id: str) -> SessionRecord:
        """The caller's own session, still active: after EndSession nothing more reaches its record; an admin
        may not write into someone else's."""
        record = await self.store.get_owned(session_id, principal, write=True)
        if record.state != ACTIVE:
            raise FailedPrecondition(ended_message(session_id))
        return record

    async def submit_survey(self, principal: Principal, session_id: str, phase: str, survey: dict[str, Any]) -> None:
        """Record a pre- or post-chat survey. A session keeps one of each: submitting one again replaces it (the
        record holds both; readers take the last), up to ``surveys.max_submissions`` times; only before
        EndSession."""
        if phase not in SURVEYS:
            raise InvalidInput(f"unknown survey phase {phase!r}; one of {sorted(SURVEYS)}")
        limits = self.options.surveys
        text = str(survey.get("text", ""))
        if len(text) > limits.max_text_chars:
            raise InvalidInput(f"survey text is {len(text)} characters, over the {limits.max_text_chars} limit")
        payload = SURVEYS[phase](
            current_feelings=normalise_feelings(
                survey.get("current_feelings", ()), limits.current_feelings, "current_feelings", limits.max_feelings
            ),
            desired_feelings=normalise_feelings(
                survey.get("desired_feelings", ()), limits.desired_feelings, "desired_feelings", limits.max_feelings
            ),
            text=text,
        )
        await self._active(principal, session_id)
        await self.store.record(session_id, payload, limit=limits.max_submissions)

    async def submit_rating(self, principal: Principal, session_id: str, ratings: dict[str, int], comment: str) -> None:
        """Record the session's rating. A session keeps one: submitting again replaces it (readers take the last),
        up to ``surveys.max_submissions`` times; only before EndSession."""
        for name, value in ratings.items():
            if value not in LIKERT:
                raise InvalidInput(f"{name} must be a Likert score from 1 to 5, got {value}")
        if set(ratings) != {"empathy", "relevance", "fluency"}:
            raise InvalidInput(f"a rating needs exactly empathy, relevance and fluency; got {sorted(ratings)}")
        limit = self.options.surveys.max_comment_chars
        if len(comment) > limit:
            raise InvalidInput(f"rating comment is {len(comment)} characters, over the {limit} limit")
        await self._active(principal, session_id)
        await self.store.record(
            session_id,
            Rating(
                empathy=ratings["empathy"],
                relevance=ratings["relevance"],
                fluency=ratings["fluency"],
                comment=comment,
            ),
            limit=self.options.surveys.max_submissions,
        )

    async def end_session(self, principal: Principal, session_id: str) -> SessionRecord:
        record = await self.store.get_owned(session_id, principal, active=True, write=True)
        await self.store.record(session_id, SessionEnded())
        record = await self.store.end(record)
        self.on_session_ended(session_id)
        return record

    async def transcript(self, principal: Principal, session_id: str) -> tuple[SessionRecord, list[Event]]:
        """The whole event log (in-process callers; over gRPC, :meth:`transcript_page`)."""
        record = await self.store.get_owned(session_id, principal)
        return record, await self.store.events(session_id)

    async def transcript_page(
        self, principal: Principal, session_id: str, page_size: int = 0, page_token: str = ""
    ) -> TranscriptPage:
        """One page of the event log: up to ``page_size`` events (0: the default; at most the maximum) after the
        event ``page_token``; a page also ends before its events pass ``transcript.max_page_bytes``."""
        limits = self.options.transcript
        if page_size < 0:
            raise InvalidInput(f"page_size must not be negative, got {page_size}")
        if page_token and not _PAGE_TOKEN.match(page_token):
            raise InvalidInput("page_token is not one this service returned (an event id, like 1700000000000-0)")
        size = min(page_size or limits.default_page_size, limits.max_page_size)
        record = await self.store.get_owned(session_id, principal)
        fetched = await self.store.events_page(session_id, page_token, size + 1)
        events: list[Event] = []
        used = 0
        for event in fetched[:size]:
            cost = len(json.dumps(event.payload)) + len(event.event_id) + 32
            if events and used + cost > limits.max_page_bytes:
                break
            events.append(event)
            used += cost
        more = len(events) < len(fetched)
        return TranscriptPage(record, events, events[-1].event_id if more and events else "")

    async def converse(
        self, principal: Principal, session_id: str, inputs: AsyncIterator[ConverseInput]
    ) -> AsyncIterator[ConverseOutput]:
        record = await self._active(principal, session_id)
        conversation = Conversation(self, record, await self.store.events(session_id))
        self.metrics.active_sessions.inc()
        try:
            async for output in conversation.run(inputs):
                yield output
        finally:
            self.metrics.active_sessions.dec()

    # --- deleting a person's data ------------------------------------------------------------------------

    def _objects(self) -> ObjectStore:
        if self.objects is None:
            raise FailedPrecondition("this chat service has no object storage configured, so it cannot delete data")
        return self.objects

    async def _owner(self, session_id: str) -> str | None:
        """Who owns the session: its Redis hash, else its persisted record; None when neither is left."""
        try:
            return (await self.store.get(session_id)).user_id
        except NotFound:
            return await asyncio.to_thread(persisted_owner, self._objects(), session_id)

    async def _delete(self, session_id: str, owner: str | None) -> DeletedSession:
        objects = self._objects()
        # The tombstone first: from here on no job writes this session's data (they check it before and after).
        key, existed = await asyncio.to_thread(write_tombstone, objects, session_id)
        marked = await asyncio.to_thread(tombstone, objects, session_id)
        removed = await self.store.delete(session_id, owner)
        # After Redis: a conversation still streaming can no longer record a frame it stores, so it deletes it.
        record_objects, frames = await asyncio.to_thread(sweep_objects, objects, session_id)
        return DeletedSession(
            session_id=session_id,
            already_deleted=existed,
            redis_keys=removed.keys,
            events=removed.events,
            record_objects=record_objects,
            frames=frames,
            tombstone_key=key,
            deleted_ms=int((marked or {}).get("deleted_ms", 0)),
        )

    async def _audit(self, principal: Principal, action: str, deletion: Deletion, reason: str) -> Deletion:
        key = await asyncio.to_thread(
            audit_deletion,
            self._objects(),
            service="chat",
            action=action,
            requested_by=principal.subject,
            session_ids=[s.session_id for s in deletion.sessions],
            removed=deletion.totals(),
            reason=reason,
        )
        return Deletion(deletion.user_id, deletion.sessions, key)

    @staticmethod
    def _check_reason(reason: str) -> None:
        if len(reason) > MAX_REASON_CHARS:
            raise InvalidInput(f"reason is over {MAX_REASON_CHARS} characters; it is a short label for the audit log")

    async def delete_session_data(self, principal: Principal, session_id: str, reason: str = "") -> Deletion:
        """Delete one session's data (its owner or an admin); deleting it again sweeps again and says so."""
        principal.require("chat")
        check_session_id(session_id)
        self._check_reason(reason)
        owner = await self._owner(session_id)
        if owner is None:
            deleted = await asyncio.to_thread(session_deleted, self._objects(), session_id)
            if not deleted and not principal.is_admin:
                raise NotFound(f"session {session_id} does not exist")
        elif owner != principal.subject and not principal.is_admin:
            raise PermissionDenied(f"session {session_id} belongs to another user")
        deleted_session = await self._delete(session_id, owner)
        return await self._audit(
            principal, "delete_session_data", Deletion(owner or "", (deleted_session,), ""), reason
        )

    async def delete_user_data(
        self, principal: Principal, user_id: str, session_ids: list[str], reason: str = ""
    ) -> Deletion:
        """Delete every session of ``user_id`` (empty: the caller): those in chat's index of their sessions and
        ``session_ids``. The user themself or an admin. Every session is checked before anything is deleted."""
        principal.require("chat")
        user_id = user_id or principal.subject
        if user_id != principal.subject and not principal.is_admin:
            raise PermissionDenied("only an admin may delete another user's data")
        self._check_reason(reason)
        indexed = set(await self.store.user_sessions(user_id))
        extra = sorted(set(session_ids) - indexed)
        if len(indexed) + len(extra) > MAX_DELETE_SESSIONS:
            raise InvalidInput(f"over {MAX_DELETE_SESSIONS} sessions in one request; delete them in parts")
        for session_id in extra:
            check_session_id(session_id)
            owner = await self._owner(session_id)
            if owner is None and not principal.is_admin:
                if not await asyncio.to_thread(session_deleted, self._objects(), session_id):
                    raise NotFound(f"session {session_id} does not exist")
            elif owner is not None and owner != user_id:
                problem = f"session {session_id} is not {user_id}'s"
                raise InvalidInput(problem) if principal.is_admin else PermissionDenied(problem)
        sessions = [await self._delete(session_id, user_id) for session_id in sorted(indexed | set(extra))]
        return await self._audit(principal, "delete_user_data", Deletion(user_id, tuple(sessions), ""), reason)
