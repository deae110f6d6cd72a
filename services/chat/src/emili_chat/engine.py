"""The chat data plane, free of any transport: sessions, surveys, ratings and live conversations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from emili_chat.fer_client import FaceReading, FerStream
from emili_chat.history import condense, messages_from_events
from emili_chat.llm import BackendError, ChatBackend, GenerationParams, stream_with_retries
from emili_chat.metrics import chat_metrics
from emili_chat.readout import (
    EMOTIONS,
    Aggregator,
    ChangeTrigger,
    change_is_large,
    readout_message,
    short_message_reminder,
)
from emili_chat.settings import ChatSettings
from emili_chat.store import Event, SessionRecord, SessionStore, new_session_id, now_ms
from emili_core.auth import Principal
from emili_core.errors import DependencyUnavailable, InvalidInput, NotFound
from emili_core.keys import frame_key, model_registry_key
from emili_core.objectstore import Bucket, ObjectStore

log = logging.getLogger(__name__)

CADENCES = ("before_user_message", "fixed_interval", "on_change")
LIKERT = range(1, 6)
ARM_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


# --- conversation inputs and outputs (what the gRPC adapter converts to and from) --------------------


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


@dataclass(frozen=True)
class SessionOptions:
    cadence: str | None = None
    speak_on_change: bool | None = None
    post_response_reading_s: float | None = None


# --- adapters ------------------------------------------------------------------------------------------


class AdapterRegistry:
    """Model arms: "base" or a registered model version whose LoRA adapter is loaded on first use."""

    def __init__(self, backend: ChatBackend, objects: ObjectStore | None, cache_dir: Path) -> None:
        self.backend = backend
        self.objects = objects
        self.cache_dir = cache_dir
        self._lock = asyncio.Lock()

    async def resolve(self, arm: str) -> str | None:
        if arm == "base":
            return None
        if not ARM_PATTERN.match(arm):
            raise InvalidInput(f"invalid model arm {arm!r}: letters, digits, '.', '_' or '-', at most 64")
        async with self._lock:
            if arm in self.backend.adapters():
                return arm
            if self.objects is None:
                raise NotFound(f"model arm {arm!r} is not loaded and no object store is configured")
            path = await asyncio.to_thread(self._download, arm)
            await self.backend.add_adapter(arm, path)
            log.info("loaded adapter %s from object storage", arm)
            return arm

    def _download(self, arm: str) -> Path:
        assert self.objects is not None
        try:
            manifest = self.objects.get_json(Bucket.MODELS, model_registry_key(arm))
        except NotFound:
            raise NotFound(f"model arm {arm!r} is not a registered model version") from None
        prefix = str(manifest["adapter_prefix"])
        target = self.cache_dir / arm
        if not self.objects.get_folder(Bucket.MODELS, prefix, target):
            raise NotFound(f"model version {arm!r} names adapter files under {prefix}, but there are none")
        return target


# --- the engine ------------------------------------------------------------------------------------------


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

    async def start(self) -> None:
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
        adapter = await self.adapters.resolve(arm)
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
        await self.store.append(
            record.session_id,
            "session_created",
            {
                "model_arm": arm,
                "model_id": record.model_id,
                "options": record.options,
                "system_prompt": self.system_prompt,
                "synthetic": synthetic,
            },
        )
        return record

    async def submit_survey(self, principal: Principal, session_id: str, phase: str, survey: dict[str, Any]) -> None:
        await self.store.get_owned(session_id, principal, active=phase == "pre")
        if len(str(survey.get("text", ""))) > self.options.max_message_chars:
            raise InvalidInput(f"survey text is over {self.options.max_message_chars} characters")
        await self.store.append(session_id, f"{phase}_survey", survey)

    async def submit_rating(self, principal: Principal, session_id: str, ratings: dict[str, int], comment: str) -> None:
        await self.store.get_owned(session_id, principal)
        for name, value in ratings.items():
            if value not in LIKERT:
                raise InvalidInput(f"{name} must be a Likert score from 1 to 5, got {value}")
        await self.store.append(session_id, "rating", {**ratings, "comment": comment[: self.options.max_message_chars]})

    async def end_session(self, principal: Principal, session_id: str) -> SessionRecord:
        record = await self.store.get_owned(session_id, principal, active=True)
        await self.store.append(session_id, "session_ended", {})
        record = await self.store.end(record)
        self.on_session_ended(session_id)
        return record

    async def transcript(self, principal: Principal, session_id: str) -> tuple[SessionRecord, list[Event]]:
        record = await self.store.get_owned(session_id, principal)
        return record, await self.store.events(session_id)

    async def converse(
        self, principal: Principal, session_id: str, inputs: AsyncIterator[ConverseInput]
    ) -> AsyncIterator[ConverseOutput]:
        record = await self.store.get_owned(session_id, principal, active=True)
        conversation = Conversation(self, record, await self.store.events(session_id))
        self.metrics.active_sessions.inc()
        try:
            async for output in conversation.run(inputs):
                yield output
        finally:
            self.metrics.active_sessions.dec()


_END = object()


class Conversation:
    """One open Converse stream: reads inputs, keeps the face aggregate, injects readouts, generates."""

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
        self.turns: asyncio.Queue[UserText | None] = asyncio.Queue()
        self.generating = asyncio.Lock()
        self.last_readout_scores: dict[str, int] | None = None
        self.previous_aggregate: dict[str, int] | None = None  # The tick before the latest one.
        self.last_fixed_readout = 0.0
        self.fer: FerStream | None = None
        self.timers: set[asyncio.Task[None]] = set()
        self.adapter: str | None = None

    # --- the stream ---------------------------------------------------------------------------------

    async def run(self, inputs: AsyncIterator[ConverseInput]) -> AsyncIterator[ConverseOutput]:
        self.adapter = await self.engine.adapters.resolve(self.record.model_arm)
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
        try:
            async for item in inputs:
                if isinstance(item, UserText):
                    self._check_text(item.text)
                    await self.turns.put(item)
                elif isinstance(item, Frame):
                    await self._frame(item)
                else:
                    await self._on_reading(self._client_reading(item))
        finally:
            await self.turns.put(None)

    async def _turn_loop(self) -> None:
        while (message := await self.turns.get()) is not None:
            await self._user_turn(message)
        await self.out.put(_END)

    async def _tick_loop(self) -> None:
        tick = self.settings.readout.tick_s
        while True:
            await asyncio.sleep(tick)
            now = time.time()
            aggregate = self.aggregator.tick(now)
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
        if self.record.store_frames and self.engine.objects is not None:
            key = frame_key(self.record.session_id, capture)
            await asyncio.to_thread(self.engine.objects.put_bytes, Bucket.FRAMES, key, frame.jpeg, "image/jpeg")
            await self._record("frame_stored", {"key": key, "capture_time_ms": capture})
        if self.engine.fer_channel is None:
            raise DependencyUnavailable("this chat service has no FER service configured; send FER readings instead")
        if self.fer is None:
            self.fer = FerStream(self.engine.fer_channel, self.record.session_id, self._on_reading)
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

    async def _on_reading(self, reading: FaceReading) -> None:
        self.engine.metrics.fer_readings.labels(reading.source).inc()
        await self._record(
            "fer_reading",
            {
                "capture_time_ms": reading.capture_time_ms,
                "face_found": reading.face_found,
                "probabilities": reading.probabilities,
                "source": reading.source,
            },
        )
        if reading.face_found:
            scores = {e: 100.0 * reading.probabilities.get(e, 0.0) for e in EMOTIONS}
            self.aggregator.add(scores, time.time())
        else:
            self.aggregator.add_no_face(time.time())

    # --- turns --------------------------------------------------------------------------------------------

    async def _record(self, kind: str, payload: dict[str, Any]) -> Event:
        event = await self.engine.store.append(self.record.session_id, kind, payload)
        self.events.append(event)
        return event

    async def _inject_readout(
        self, cadence: str, aggregate: dict[str, int] | None, previous: dict[str, int] | None = None
    ) -> None:
        """Record and send a readout; ``previous`` defaults to what the last readout showed."""
        started = time.perf_counter()
        previous = previous if previous is not None else self.last_readout_scores
        changed = (
            previous is not None
            and aggregate is not None
            and change_is_large(previous, aggregate, self.settings.readout.trigger_start_threshold)
        )
        text = readout_message(aggregate, previous, changed)
        event = await self._record("readout_injected", {"text": text, "cadence": cadence, "scores": aggregate})
        self.last_readout_scores = aggregate
        self.engine.metrics.readouts.labels(cadence).inc()
        self.engine.metrics.readout_build.observe(time.perf_counter() - started)
        await self.out.put(Readout(text, cadence, event.time_ms))

    async def _user_turn(self, message: UserText) -> None:
        async with self.generating:
            if self.cadence == "before_user_message":
                await self._inject_readout("before_user_message", self.aggregator.tick(time.time()))
            reminder = short_message_reminder(message.text) if self.settings.readout.short_message_reminder else None
            if reminder:
                await self._record("reminder", {"text": reminder})
            event = await self._record("user_message", {"text": message.text, "client_time_ms": message.client_time_ms})
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
        started, first, parts = time.perf_counter(), None, []
        try:
            async for delta in stream_with_retries(
                backend,
                messages,
                params,
                self.adapter,
                attempts=llm.attempts,
                first_token_timeout_s=llm.first_token_timeout_s,
                idle_timeout_s=llm.idle_timeout_s,
            ):
                if first is None:
                    first = time.perf_counter()
                    self.engine.metrics.ttft.observe(first - started)
                parts.append(delta)
                await self.out.put(Delta(turn_id, delta))
        except BackendError as exc:
            self.engine.metrics.backend_errors.labels(type(exc).__name__).inc()
            raise DependencyUnavailable(f"the language model failed: {exc}") from exc
        self.engine.metrics.generation.observe(time.perf_counter() - started)
        self.engine.metrics.turns.labels("unprompted" if unprompted else "reply").inc()
        text = "".join(parts).strip()
        model_id = backend.model_id(self.adapter)
        event = await self._record(
            "assistant_message",
            {
                "text": text,
                "turn_id": turn_id,
                "unprompted": unprompted,
                "model_id": model_id,
                "adapter": self.adapter,
                "model_arm": self.record.model_arm,
                "params": {"temperature": params.temperature, "max_new_tokens": params.max_new_tokens},
            },
        )
        await self.out.put(AssistantReply(turn_id, text, unprompted, model_id, event.time_ms))
        delay = float(self.record.options["post_response_reading_s"])
        if delay > 0:
            timer = asyncio.create_task(self._post_response_reading(turn_id, delay))
            self.timers.add(timer)
            timer.add_done_callback(self.timers.discard)

    async def _post_response_reading(self, turn_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        aggregate = self.aggregator.tick(time.time())
        await self._record("post_response_reading", {"turn_id": turn_id, "delay_s": delay, "scores": aggregate})
