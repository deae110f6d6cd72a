"""One open Converse stream: reads inputs, keeps the face aggregate, injects readouts, generates replies.

Three tasks run per conversation: a reader (frames go to FER ``StreamAnalyze`` over one stream per
conversation; client readings are validated), a turn loop (one user message at a time: readout, the user
message, an optional short-message reminder, generation), and a ticker (the decayed aggregate, the
fixed-interval cadence, the change trigger that makes EMILI speak unprompted). Every event is recorded
before the client hears of it, and the model's context is rebuilt from the recorded events.

Faults (numbers in ``ChatOptions.resilience``):

* FER down: the FER stream reconnects with capped backoff (``fer_client.FerStream``). Until FER reads a frame
  again the face is *unknown*, which is not "no face": the gap is recorded (``fer_unavailable`` then
  ``fer_restored``), readouts say :data:`FER_UNAVAILABLE_MESSAGE` with no scores, post-response readings are
  marked ``fer_unavailable`` and the change trigger is paused. We say so rather than skip the readout: a
  cadence that silently stops would leave the model reading an older readout as current, and the record would
  not show why a turn had none.
* Redis blips: ``SessionStore`` retries writes briefly. A reply lost with its stream (no ``assistant_message``
  after the last acknowledged ``user_message``) is generated when the next Converse stream of the session
  opens, before anything it sends.
* Flooding: user messages wait in a bounded inbox (``inbox_size``); one more is refused with
  RESOURCE_EXHAUSTED (``Overloaded``) rather than queued in memory without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from emili_chat.adapters import BASE_ARM
from emili_chat.fer_client import FaceReading, FerStream
from emili_chat.history import condense, messages_from_events
from emili_chat.io_types import (
    Accepted,
    AssistantReply,
    ClientReading,
    ConverseInput,
    ConverseOutput,
    Delta,
    Frame,
    Readout,
    UserText,
)
from emili_chat.llm import BackendError, GenerationParams, ReplyEnd, stream_with_retries
from emili_chat.metrics import reply_tokens
from emili_chat.readout import Aggregator, ChangeTrigger, change_is_large, readout_message, short_message_reminder
from emili_chat.store import SessionRecord, now_ms
from emili_core.errors import DependencyUnavailable, InvalidInput, Overloaded
from emili_core.keys import frame_key
from emili_session.emotions import EMOTIONS
from emili_session.events import (
    AssistantMessage,
    Event,
    EventKind,
    FerReading,
    FerRestored,
    FerUnavailable,
    FramesDropped,
    FrameStored,
    Payload,
    PostResponseReading,
    ReadoutInjected,
    Reminder,
    UserMessage,
)

if TYPE_CHECKING:
    from emili_chat.engine import ChatEngine

_END = object()
# What the model is told while the FER service is down (frames arrive but nobody reads them). Not EMILI's
# wording (the reference has none for this); "not visible" would be false and would teach the model so.
FER_UNAVAILABLE_MESSAGE = "The user's face cannot be read right now (emotion recognition is unavailable)."


class _Resume:
    """A turn-loop item: answer the acknowledged user message whose reply was lost with an earlier stream."""


RESUME = _Resume()


def unanswered_message(events: list[Event]) -> Event | None:
    """The last ``user_message`` when no prompted ``assistant_message`` follows it (its reply was lost)."""
    for event in reversed(events):
        if event.kind == EventKind.ASSISTANT_MESSAGE and not event.payload.get("unprompted", False):
            return None
        if event.kind == EventKind.USER_MESSAGE:
            return event
    return None


class Conversation:
    def __init__(self, engine: ChatEngine, record: SessionRecord, events: list[Event]) -> None:
        self.engine = engine
        self.record = record
        self.events = events
        self.settings = engine.options
        r = engine.options.readout
        self.cadence: str = record.options["cadence"]
        self.aggregator = Aggregator(
            tick_seconds=r.tick_s, half_life_seconds=r.half_life_s, visibility_epsilon=r.visibility_epsilon
        )
        self.trigger = ChangeTrigger(
            start_threshold=r.trigger_start_threshold,
            decay_per_second=r.trigger_decay_per_second,
            refractory_seconds=r.trigger_refractory_s,
        )
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        # The inbox: user messages waiting for their turn (bounded; see _read).
        self.turns: asyncio.Queue[UserText | _Resume | None] = asyncio.Queue(self.settings.resilience.inbox_size)
        self.inbox_high_water = 0  # The most messages the inbox held at once (tests and metrics read it).
        self.generating = asyncio.Lock()
        self.last_readout_scores: dict[str, int] | None = None
        self.previous_aggregate: dict[str, int] | None = None  # The tick before the latest one.
        self.last_fixed_readout = 0.0
        self.fer: FerStream | None = None
        self.timers: set[asyncio.Task[None]] = set()
        self.adapter: str | None = None

    # --- the stream ---------------------------------------------------------------------------------

    async def run(self, inputs: AsyncIterator[ConverseInput]) -> AsyncIterator[ConverseOutput]:
        self.adapter = await self.engine.adapters.resolve(self.record.model_arm, synthetic=self.record.synthetic)
        if unanswered_message(self.events) is not None:
            self.turns.put_nowait(RESUME)  # Before anything this stream sends: the reply the last one lost.
        tasks = [
            asyncio.create_task(self._guard(self._read(inputs))),
            asyncio.create_task(self._guard(self._turn_loop())),
            asyncio.create_task(self._guard(self._tick_loop())),
        ]
        try:
            while (item := await self.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in [*tasks, *self.timers]:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.fer is not None:
                await self.fer.close()

    async def _guard(self, work: Any) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self.out.put(exc)

    async def _read(self, inputs: AsyncIterator[ConverseInput]) -> None:
        async for item in inputs:
            if isinstance(item, UserText):
                self._check_text(item.text)
                self._enqueue(item)
            elif isinstance(item, Frame):
                await self._frame(item)
            else:
                await self._on_reading(self._client_reading(item))
        # The client is done: answer what is waiting, then end. (On an error the stream fails at once instead;
        # waiting here for room in a full inbox would hold that error back until a turn finished.)
        await self.turns.put(None)

    def _enqueue(self, message: UserText) -> None:
        try:
            self.turns.put_nowait(message)
        except asyncio.QueueFull:
            raise Overloaded(
                f"{self.turns.maxsize} messages are already waiting for a reply on this conversation; "
                "wait for EMILI to answer before sending more, then reconnect to continue the session"
            ) from None
        self.inbox_high_water = max(self.inbox_high_water, self.turns.qsize())

    async def _turn_loop(self) -> None:
        while (message := await self.turns.get()) is not None:
            if isinstance(message, _Resume):
                async with self.generating:
                    await self._generate(unprompted=False)
            else:
                await self._user_turn(message)
        await self.out.put(_END)

    @property
    def fer_unavailable(self) -> bool:
        return self.fer is not None and not self.fer.available

    def _aggregate(self, now: float) -> dict[str, int] | None:
        """The decayed aggregate; None (unknown) while FER is unavailable, whatever older readings say."""
        aggregate = self.aggregator.tick(now)
        return None if self.fer_unavailable else aggregate

    async def _tick_loop(self) -> None:
        tick = self.settings.readout.tick_s
        while True:
            await asyncio.sleep(tick)
            now = time.time()
            aggregate = self._aggregate(now)
            if self.cadence == "fixed_interval" and now - self.last_fixed_readout >= self.settings.readout.interval_s:
                self.last_fixed_readout = now
                await self._inject_readout("fixed_interval", aggregate)
            fired = self.trigger.update(aggregate, now)
            previous, self.previous_aggregate = self.previous_aggregate, aggregate
            if fired and self.record.options["speak_on_change"] and not self.generating.locked() and self.turns.empty():
                await self._unprompted_turn(previous, aggregate)

    # --- inputs ---------------------------------------------------------------------------------------

    def _check_text(self, text: str) -> None:
        if not text.strip():
            raise InvalidInput("user message is empty")
        if len(text) > self.settings.max_message_chars:
            raise InvalidInput(
                f"user message is {len(text)} characters, over the {self.settings.max_message_chars} limit"
            )

    async def _frame(self, frame: Frame) -> None:
        if not frame.jpeg:
            raise InvalidInput("face frame is empty")
        if len(frame.jpeg) > self.settings.max_frame_bytes:
            raise InvalidInput(f"face frame is {len(frame.jpeg)} bytes, over the {self.settings.max_frame_bytes} limit")
        capture = frame.capture_time_ms or now_ms()
        if self.record.store_frames and self.engine.frames is not None:
            # Uploaded off this path (emili_chat.frames): an object-storage outage delays storing, never the talk.
            key = frame_key(self.record.session_id, capture)
            if self.engine.frames.submit(self.record.session_id, key, frame.jpeg, capture):
                await self._record(FrameStored(key=key, capture_time_ms=capture))
            else:  # The upload buffer is full (storage down for long): this frame is not kept.
                await self._record(FramesDropped(1, capture, capture, "frame upload buffer full"))
        if self.engine.fer_channel is None:
            raise DependencyUnavailable("this chat service has no FER service configured; send FER readings instead")
        if self.fer is None:
            resilience = self.settings.resilience
            self.fer = FerStream(
                self.engine.fer_channel,
                self.record.session_id,
                self._on_reading,
                on_unavailable=self._on_fer_unavailable,
                on_restored=self._on_fer_restored,
                reconnect_initial_s=resilience.fer_reconnect_initial_s,
                reconnect_max_s=resilience.fer_reconnect_max_s,
            )
        self.fer.send(frame.jpeg, capture)

    def _client_reading(self, reading: ClientReading) -> FaceReading:
        if reading.face_found:
            unknown = set(reading.probabilities) - set(EMOTIONS)
            if unknown or not reading.probabilities:
                raise InvalidInput(
                    f"FER reading needs probabilities for {list(EMOTIONS)}; got {sorted(reading.probabilities)}"
                )
            if any(not 0.0 <= p <= 1.0 for p in reading.probabilities.values()):
                raise InvalidInput("FER probabilities must be between 0 and 1")
        return FaceReading(
            reading.capture_time_ms or now_ms(), reading.face_found, dict(reading.probabilities), "client"
        )

    async def _on_fer_unavailable(self, since_ms: int, error: str) -> None:
        await self._record(FerUnavailable(since_ms=since_ms, error=error[:500]))

    async def _on_fer_restored(self, restored_ms: int, reconnects: int) -> None:
        await self._record(FerRestored(restored_ms=restored_ms, reconnects=reconnects))

    async def _on_reading(self, reading: FaceReading) -> None:
        self.engine.metrics.fer_readings.labels(reading.source).inc()
        await self._record(
            FerReading(
                capture_time_ms=reading.capture_time_ms,
                face_found=reading.face_found,
                probabilities=reading.probabilities,
                source=reading.source,
            )
        )
        if reading.face_found:
            scores = {e: 100.0 * reading.probabilities.get(e, 0.0) for e in EMOTIONS}
            self.aggregator.add(scores, time.time())
        else:
            self.aggregator.add_no_face(time.time())

    # --- turns --------------------------------------------------------------------------------------------

    async def _record(self, payload: Payload) -> Event:
        event = await self.engine.store.record(self.record.session_id, payload)
        self.events.append(event)
        return event

    async def _inject_readout(
        self, cadence: str, aggregate: dict[str, int] | None, previous: dict[str, int] | None = None
    ) -> None:
        """Record and send a readout; ``previous`` defaults to what the last readout showed.

        Before a user message the readout is one line unless ``change_block_before_user_message`` is set:
        the original sends the three-line change block only when its change trigger fires.
        """
        started = time.perf_counter()
        previous = previous if previous is not None else self.last_readout_scores
        block_allowed = cadence != "before_user_message" or self.settings.readout.change_block_before_user_message
        changed = (
            block_allowed
            and previous is not None
            and aggregate is not None
            and change_is_large(previous, aggregate, self.settings.readout.trigger_start_threshold)
        )
        text = FER_UNAVAILABLE_MESSAGE if self.fer_unavailable else readout_message(aggregate, previous, changed)
        event = await self._record(ReadoutInjected(text=text, cadence=cadence, scores=aggregate))
        self.last_readout_scores = aggregate
        self.engine.metrics.readouts.labels(cadence).inc()
        self.engine.metrics.readout_build.observe(time.perf_counter() - started)
        await self.out.put(Readout(text, cadence, event.time_ms))

    async def _user_turn(self, message: UserText) -> None:
        async with self.generating:
            if self.cadence == "before_user_message":
                await self._inject_readout("before_user_message", self._aggregate(time.time()))
            event = await self._record(UserMessage(text=message.text, client_time_ms=message.client_time_ms))
            # After the message, where the original puts it: the model reads it as a comment on that message.
            reminder = short_message_reminder(message.text) if self.settings.readout.short_message_reminder else None
            if reminder:
                await self._record(Reminder(text=reminder))
            await self.out.put(Accepted(event.event_id, event.time_ms))
            await self._generate(unprompted=False)

    async def _unprompted_turn(self, before: dict[str, int] | None, aggregate: dict[str, int] | None) -> None:
        async with self.generating:
            await self._inject_readout("on_change", aggregate, previous=before)
            await self._generate(unprompted=True)

    async def _generate(self, *, unprompted: bool) -> None:
        llm = self.settings.llm
        backend = self.engine.backend
        params = GenerationParams(
            temperature=llm.temperature,
            max_new_tokens=llm.unprompted_max_new_tokens if unprompted else llm.max_new_tokens,
        )
        messages = condense(
            messages_from_events(self.engine.system_prompt, self.events),
            backend.count_tokens,
            backend.context_window - params.max_new_tokens,
            self.settings.keep_last_messages,
        )
        turn_id = uuid.uuid4().hex[:16]
        arm = self.adapter or BASE_ARM
        self.engine.metrics.tokens.labels("in", arm).inc(backend.count_tokens(messages))
        started, first, parts, end = time.perf_counter(), None, [], ReplyEnd()
        try:
            async for delta in stream_with_retries(
                backend,
                messages,
                params,
                self.adapter,
                attempts=llm.attempts,
                first_token_timeout_s=llm.first_token_timeout_s,
                idle_timeout_s=llm.idle_timeout_s,
                end=end,
            ):
                if first is None:
                    first = time.perf_counter()
                    self.engine.metrics.ttft.labels(arm).observe(first - started)
                parts.append(delta)
                await self.out.put(Delta(turn_id, delta))
        except BackendError as exc:
            self.engine.metrics.backend_errors.labels(type(exc).__name__).inc()
            raise DependencyUnavailable(f"the language model failed: {exc}") from exc
        self.engine.metrics.generation.observe(time.perf_counter() - started)
        self.engine.metrics.turns.labels("unprompted" if unprompted else "reply").inc()
        text = "".join(parts).strip()
        self.engine.metrics.tokens.labels("out", arm).inc(reply_tokens(backend.count_tokens, text))
        model_id = backend.model_id(self.adapter)
        event = await self._record(
            AssistantMessage(
                text=text,
                turn_id=turn_id,
                unprompted=unprompted,
                model_id=model_id,
                adapter=self.adapter,
                model_arm=self.record.model_arm,
                params={"temperature": params.temperature, "max_new_tokens": params.max_new_tokens},
                at_limit=end.at_limit,
            )
        )
        await self.out.put(AssistantReply(turn_id, text, unprompted, model_id, event.time_ms))
        delay = float(self.record.options["post_response_reading_s"])
        if delay > 0:
            timer = asyncio.create_task(self._post_response_reading(turn_id, delay))
            self.timers.add(timer)
            timer.add_done_callback(self.timers.discard)

    async def _post_response_reading(self, turn_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        aggregate = self._aggregate(time.time())
        await self._record(
            PostResponseReading(turn_id=turn_id, delay_s=delay, scores=aggregate, fer_unavailable=self.fer_unavailable)
        )
