"""A participant's live conversation: JSON messages from a browser in, chat's Converse stream out.

Knows no WebSocket: the app hands it a ``receive`` that yields parsed messages (raising ``ClientGone`` when
the browser leaves) and a ``send``. Messages from the client:

    {"type": "auth", "token": "..."}                                  (only as the first message, see app.py)
    {"type": "user_message", "text": "...", "client_time_ms": 0}
    {"type": "frame", "jpeg_b64": "...", "capture_time_ms": 0}

and to it: ``ready``, ``accepted``, ``delta``, ``message``, ``readout`` (only when the study shows them),
``limit`` and ``error`` (``{"type": "error", "error": code, "status": http_status, "detail": text}``). Replies
never name the model or arm: participants are blinded.

When the browser leaves, the chat stream is half-closed, so chat finishes and records a reply already under
way; the session stays open and a new connection continues it (chat rebuilds its context from the event log).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from emili_core.errors import EmiliError, FailedPrecondition, InvalidInput, PermissionDenied
from emili_gateway.chat_client import Accepted, Conversation, Delta, Readout, Reply
from emili_gateway.engine import GatewayEngine, check_jpeg
from emili_gateway.errors import PayloadTooLarge, RateLimited
from emili_gateway.models import SessionRecord, Study
from emili_gateway.ratelimit import TokenBucket
from emili_gateway.studies import now_ms

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[Any]]
ErrorBody = Callable[[BaseException], tuple[int, dict[str, Any]]]

# Close codes: 4000 + the HTTP status that describes why (browsers reconnect only on other codes).
CLOSE_REPLACED = 4409
NORMAL_CLOSE = 1000
CLOSE_RESTART = 1012
# A dropped-frame warning at most this often, so a misbehaving client is told without being flooded.
_WARN_EVERY_S = 5.0


class ClientGone(Exception):
    """The browser closed the connection."""


class ConverseBridge:
    def __init__(
        self,
        engine: GatewayEngine,
        record: SessionRecord,
        study: Study,
        token: str,
        send: Send,
        error_body: ErrorBody,
    ) -> None:
        self.engine = engine
        self.record = record
        self.study = study
        self.token = token
        self._send = send
        self.error_body = error_body
        self.limits = engine.limits
        self.frames = TokenBucket(self.limits.frames_per_second)
        self.metrics = engine.metrics
        self.client_gone = False
        self.replaced = False
        self.detached = False  # Draining after the connection's end: nothing more is sent.
        self.close_code = NORMAL_CLOSE
        self.close_reason = ""
        self.turn_limit_reached = False
        self.time_up = False
        self._warned_at = 0.0
        self._in_task: asyncio.Task[None] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        if self.client_gone or self.detached:
            return
        self.metrics.ws_message("out", message.get("type"))
        try:
            await self._send(message)
        except Exception:
            # The browser left while chat was still answering: the reply is recorded all the same.
            self.client_gone = True

    async def send_error(self, exc: BaseException) -> None:
        status, body = self.error_body(exc)
        await self.send({"type": "error", "status": status, **body})

    def kick(self) -> None:
        """Replaced by a newer connection to the same session (another tab, or a reconnect before this died)."""
        self.replaced = True
        if self._in_task is not None:
            self._in_task.cancel()

    # --- the stream -------------------------------------------------------------------------------------

    async def run(self, receive: Receive) -> None:
        session_id = self.record.session_id
        previous = self.engine.conversations.get(session_id)
        if previous is not None:
            previous.kick()
        self.engine.conversations[session_id] = self
        conversation = self.engine.chat.converse(self.token, session_id)
        timer = asyncio.create_task(self._time_limit())
        out_task = asyncio.create_task(self._pump_out(conversation))
        in_task = self._in_task = asyncio.create_task(self._pump_in(conversation, receive))
        try:
            await self._greet()
            done, _ = await asyncio.wait({out_task, in_task}, return_when=asyncio.FIRST_COMPLETED)
            if out_task in done:
                exc = out_task.exception()
                if exc is not None:
                    await self.send_error(exc)
                    status, body = self.error_body(exc)
                    self.close_code, self.close_reason = 4000 + status, body["error"]
                else:
                    # Chat closed the stream by itself (e.g. it is restarting): the browser should reconnect.
                    self.close_code, self.close_reason = CLOSE_RESTART, "chat ended the stream; reconnect"
            elif self.replaced:
                self.close_code, self.close_reason = CLOSE_REPLACED, "replaced"
        finally:
            timer.cancel()
            in_task.cancel()
            if out_task.done():
                conversation.cancel()
            else:
                # The browser left, was replaced, or this handler was cancelled: half-close, so that chat
                # finishes and records a reply under way, in a task that outlives this connection.
                self.detached = True
                conversation.close_input()
                self.engine.background(self._drain(out_task, conversation))
            for task in (timer, in_task):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.engine.conversations.get(session_id) is self:
                del self.engine.conversations[session_id]

    async def _drain(self, out_task: asyncio.Task[None], conversation: Conversation) -> None:
        try:
            with contextlib.suppress(TimeoutError, EmiliError):
                await asyncio.wait_for(out_task, self.engine.options.drain_seconds)
        finally:
            conversation.cancel()

    async def _greet(self) -> None:
        fresh = await self.engine.studies.session(self.record.session_id)
        left = self._seconds_left()
        await self.send(
            {
                "type": "ready",
                "session_id": fresh.session_id,
                "turns": fresh.turns,
                "max_turns": self.study.max_turns,
                "seconds_left": None if left is None else max(0, int(left)),
                "camera": fresh.camera,
            }
        )
        if self.study.max_turns is not None and fresh.turns >= self.study.max_turns:
            self.turn_limit_reached = True
            await self._limit("turns")
        elif left is not None and left <= 0:
            self.time_up = True
            await self._limit("time")

    def _seconds_left(self) -> float | None:
        if self.study.time_limit_seconds is None:
            return None
        return self.record.created_ms / 1000 + self.study.time_limit_seconds - time.time()

    async def _limit(self, reason: str) -> None:
        detail = (
            "That was the last message of this conversation. Please go on to the short survey."
            if reason == "turns"
            else "The time for this conversation is up. Please go on to the short survey."
        )
        await self.send({"type": "limit", "reason": reason, "detail": detail})

    async def _time_limit(self) -> None:
        left = self._seconds_left()
        if left is None:
            return
        await asyncio.sleep(max(0.0, left))
        if not self.time_up:
            self.time_up = True
            await self._limit("time")

    async def _pump_out(self, conversation: Conversation) -> None:
        async for output in conversation.outputs():
            if isinstance(output, Accepted):
                await self.send({"type": "accepted", "event_id": output.event_id, "time_ms": output.time_ms})
            elif isinstance(output, Delta):
                await self.send({"type": "delta", "turn_id": output.turn_id, "text": output.text})
            elif isinstance(output, Reply):
                await self.send(
                    {
                        "type": "message",
                        "turn_id": output.turn_id,
                        "text": output.text,
                        "unprompted": output.unprompted,
                        "time_ms": output.time_ms,
                    }
                )
                if self.turn_limit_reached and not output.unprompted:
                    await self._limit("turns")
            elif isinstance(output, Readout) and self.study.show_readouts:
                await self.send({"type": "readout", "text": output.text, "time_ms": output.time_ms})

    async def _pump_in(self, conversation: Conversation, receive: Receive) -> None:
        while True:
            try:
                message = await receive()
                await self._handle(message, conversation)
            except ClientGone:
                self.client_gone = True
                return
            except EmiliError as exc:
                # A participant's mistake (too long, too fast, ...) is told and the conversation goes on.
                await self.send_error(exc)

    async def _handle(self, message: Any, conversation: Conversation) -> None:
        kind = message.get("type") if isinstance(message, dict) else None
        self.metrics.ws_message("in", kind)
        if kind == "user_message":
            await self._user_message(message, conversation)
        elif kind == "frame":
            self._frame(message, conversation)
        elif kind == "auth":
            return  # Already authenticated; a client resending its token is harmless.
        else:
            raise InvalidInput('each message must be a JSON object whose "type" is "user_message" or "frame"')

    async def _user_message(self, message: dict[str, Any], conversation: Conversation) -> None:
        text = message.get("text")
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput('a user_message needs a non-empty "text"')
        if len(text) > self.limits.max_message_chars:
            raise InvalidInput(
                f"the message is {len(text)} characters; please keep it under {self.limits.max_message_chars}"
            )
        left = self._seconds_left()
        if self.time_up or (left is not None and left <= 0):
            raise FailedPrecondition("the time for this conversation is up; please go on to the survey")
        await self.engine.limiter.hit(
            "messages", self.record.session_id, self.limits.messages_per_minute, 60, "messages"
        )
        turns = await self.engine.studies.count_turn(self.record.session_id, self.study.max_turns)
        if turns is None:
            raise FailedPrecondition(
                f"this conversation has reached its {self.study.max_turns} messages; please go on to the survey"
            )
        if self.study.max_turns is not None and turns >= self.study.max_turns:
            self.turn_limit_reached = True
        client_time = message.get("client_time_ms")
        conversation.send_message(text, client_time if isinstance(client_time, int) else now_ms())

    def _frame(self, message: dict[str, Any], conversation: Conversation) -> None:
        if not self.record.camera:
            raise PermissionDenied("the camera is off for this session (not consented), so frames are not accepted")
        if not self.frames.take():
            self.metrics.frames_dropped.labels("rate").inc()
            now = time.monotonic()
            if now - self._warned_at >= _WARN_EVERY_S:
                self._warned_at = now
                limit = self.limits.frames_per_second
                raise RateLimited(f"frames are limited to {limit:g} per second; extra frames are dropped", 1)
            return
        encoded = message.get("jpeg_b64")
        if not isinstance(encoded, str) or not encoded:
            raise InvalidInput('a frame needs "jpeg_b64": the JPEG, base64-encoded')
        if len(encoded) > self.limits.max_frame_bytes * 4 // 3 + 4:
            self.metrics.frames_dropped.labels("size").inc()
            raise PayloadTooLarge(
                f"the frame is about {len(encoded) * 3 // 4} bytes; the limit is {self.limits.max_frame_bytes} "
                "(send a smaller JPEG)"
            )
        try:
            jpeg = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput("jpeg_b64 is not valid base64") from None
        check_jpeg(jpeg, self.limits.max_frame_bytes)
        capture = message.get("capture_time_ms")
        if not conversation.send_frame(jpeg, capture if isinstance(capture, int) else now_ms()):
            self.metrics.frames_dropped.labels("backlog").inc()
