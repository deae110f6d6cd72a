"""Sessions and their event log in Redis.

Every event is appended to the session's Redis stream (XADD) before the service acknowledges it, so a
crash or restart of the chat service loses nothing it acknowledged; the chat worker later copies the
stream to object storage as the session record. Session metadata lives in a hash beside it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from emili_core.auth import Principal
from emili_core.errors import DependencyUnavailable, FailedPrecondition, NotFound, PermissionDenied
from emili_session.events import Event, EventKind, Payload, payload_fields

log = logging.getLogger(__name__)
PREFIX = "emili:chat"
ACTIVE, ENDED = "active", "ended"


def now_ms() -> int:
    return int(time.time() * 1000)


def session_key(session_id: str) -> str:
    return f"{PREFIX}:session:{session_id}"


def events_key(session_id: str) -> str:
    return f"{PREFIX}:events:{session_id}"


def user_sessions_key(user_id: str) -> str:
    return f"{PREFIX}:user:{user_id}:sessions"


# The reconciler's bookkeeping (emili_chat.reconcile) names sessions too, so deleting a session clears it.
PERSISTED_KEY = f"{PREFIX}:persisted"  # Hash: session id -> the last event id in its stored record.


def enqueued_key(session_id: str) -> str:
    return f"{PREFIX}:reconciler:enqueued:{session_id}"


@dataclass
class SessionRecord:
    session_id: str
    user_id: str
    model_arm: str
    model_id: str
    store_frames: bool
    use_for_training: bool
    options: dict[str, Any]
    state: str = ACTIVE
    created_ms: int = field(default_factory=now_ms)
    ended_ms: int = 0
    synthetic: bool = False  # Made by the user simulator, not a person.

    def to_redis(self) -> dict[str, str]:
        return {k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> SessionRecord:
        # The hash also holds the counts of capped event kinds (COUNT_FIELD): not part of the record.
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k.decode(): json.loads(v) for k, v in raw.items() if k.decode() in known})


COUNT_FIELD = "count:{kind}"  # In the session hash: events of a kind recorded with a limit (see _APPEND).
ENDED_ERROR, LIMIT_ERROR = "EMILI_SESSION_ENDED", "EMILI_EVENT_LIMIT"


def ended_message(session_id: str) -> str:
    return (
        f"session {session_id} has ended: nothing more is recorded after EndSession "
        "(submit the post-survey and rating before EndSession)"
    )


# Appends only to a session that still exists, so a conversation still streaming when its session is deleted
# cannot make a new event stream (KEYS: hash, stream; ARGV: kind, time_ms, payload, limit). Nil when it is gone.
# Only to an active session (session_ended itself aside): the worker persists the record once the session has
# ended, so an event accepted after that would never reach it. With a limit > 0, at most that many events of the
# kind (counted in the hash's COUNT_FIELD). Both checks are atomic with the append.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[1] ~= 'session_ended' and redis.call('HGET', KEYS[1], 'state') == '"ended"' then
  return redis.error_reply('EMILI_SESSION_ENDED')
end
local limit = tonumber(ARGV[4] or '0')
if limit > 0 then
  local field = 'count:' .. ARGV[1]
  local count = tonumber(redis.call('HGET', KEYS[1], field) or '0')
  if count >= limit then return redis.error_reply('EMILI_EVENT_LIMIT ' .. count) end
  redis.call('HINCRBY', KEYS[1], field, 1)
end
return redis.call('XADD', KEYS[2], '*', 'kind', ARGV[1], 'time_ms', ARGV[2], 'payload', ARGV[3])
"""
# HSET only on a session that still exists (KEYS: hash; ARGV: field, value, ...); 0 when it is gone.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


@dataclass(frozen=True)
class RedisDeletion:
    """What deleting a session removed from Redis."""

    keys: tuple[str, ...]  # The keys that existed and were removed.
    events: int  # Events in the removed stream.
    user_id: str | None  # The owner, when the session hash was still there.


def _event(entry_id: Any, fields: Any) -> Event:
    return Event(
        event_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        kind=EventKind(fields[b"kind"].decode()),
        time_ms=int(fields[b"time_ms"]),
        payload=json.loads(fields[b"payload"]),
    )


def redis_client(
    url: str,
    *,
    health_check_interval_s: int = 15,
    command_retries: int = 3,
    socket_timeout_s: float = 10.0,
) -> aioredis.Redis:
    """The chat server's Redis client: a pooled connection idle for ``health_check_interval_s`` is checked
    (PING) before use, and a command that meets a dropped connection is retried on a fresh one with
    exponential backoff (redis-py's ``Retry``), so connections left stale by a Redis restart recover."""
    return aioredis.Redis.from_url(
        url,
        health_check_interval=health_check_interval_s,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), command_retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=min(socket_timeout_s, 5.0),
        socket_keepalive=True,
    )


class SessionStore:
    """``retry_s``: how long a call that meets a connection error (Redis restarting, a network blip) is
    retried, with backoff from ``retry_initial_s`` doubling to at most 1 s apart, before it fails with
    DependencyUnavailable. A retried append may rarely record an event twice (when Redis applied it but the
    reply was lost); readers see a duplicate, never a gap."""

    def __init__(self, client: aioredis.Redis, *, retry_s: float = 5.0, retry_initial_s: float = 0.05) -> None:
        self.redis = client
        self.retry_s = retry_s
        self.retry_initial_s = retry_initial_s
        self._append = client.register_script(_APPEND)
        self._update = client.register_script(_UPDATE)

    async def _call(self, what: str, call: Any) -> Any:
        """Await ``call``: a coroutine (tried once), or a function making one (retried for ``retry_s``)."""
        deadline = time.monotonic() + self.retry_s
        delay = self.retry_initial_s
        while True:
            try:
                return await (call() if callable(call) else call)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                remaining = deadline - time.monotonic()
                if not callable(call) or remaining <= 0:
                    raise DependencyUnavailable(f"Redis unavailable while trying to {what}: {exc}") from exc
                log.warning("Redis unavailable while trying to %s (%s); retrying in %.2f s", what, exc, delay)
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)

    async def create(self, record: SessionRecord) -> SessionRecord:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(session_key(record.session_id), mapping=record.to_redis())  # type: ignore[arg-type]
        pipe.sadd(user_sessions_key(record.user_id), record.session_id)
        await self._call("create a session", pipe.execute())
        return record

    async def get(self, session_id: str) -> SessionRecord:
        if not session_id:
            raise NotFound("session_id is empty")
        raw = await self._call("read a session", lambda: self.redis.hgetall(session_key(session_id)))
        if not raw:
            raise NotFound(f"session {session_id} does not exist")
        return SessionRecord.from_redis(raw)

    async def get_owned(
        self, session_id: str, principal: Principal, *, active: bool = False, write: bool = False
    ) -> SessionRecord:
        """The session, if ``principal`` owns it; optionally it must still be active.

        An admin may read anyone's session (``write=False``) but writes into none but its own: turns, surveys,
        ratings and EndSession belong to the person whose session it is. (Deleting data is checked apart.)"""
        record = await self.get(session_id)
        if record.user_id != principal.subject:
            if write and principal.is_admin:
                raise PermissionDenied(
                    f"session {session_id} belongs to another user: the admin scope reads people's sessions "
                    "but may not write into them (only the session's owner may)"
                )
            if not principal.is_admin:
                raise PermissionDenied(f"session {session_id} belongs to another user")
        if active and record.state != ACTIVE:
            raise FailedPrecondition(f"session {session_id} has ended")
        return record

    async def end(self, record: SessionRecord) -> SessionRecord:
        record.state, record.ended_ms = ENDED, now_ms()
        args = ["state", json.dumps(ENDED), "ended_ms", json.dumps(record.ended_ms)]
        updated = await self._call("end a session", self._update(keys=[session_key(record.session_id)], args=args))
        if not updated:
            raise NotFound(f"session {record.session_id} does not exist (its data were deleted)")
        return record

    async def record(self, session_id: str, payload: Payload, time_ms: int | None = None, *, limit: int = 0) -> Event:
        """Durably append one event of ``payload``'s kind; returns it with its stream id."""
        return await self.append(session_id, payload.KIND, payload_fields(payload), time_ms, limit=limit)

    async def append(
        self,
        session_id: str,
        kind: EventKind,
        payload: dict[str, Any],
        time_ms: int | None = None,
        *,
        limit: int = 0,
    ) -> Event:
        """Durably append one event; returns it with its stream id. Callers acknowledge only after this.

        Refused (``FailedPrecondition``) once the session has ended, and when ``limit`` > 0 and the session holds
        that many events of the kind already."""
        kind = EventKind(kind)
        stamp = time_ms if time_ms is not None else now_ms()
        args = [str(kind), str(stamp), json.dumps(payload, separators=(",", ":")), str(limit)]
        try:
            entry_id = await self._call(
                f"record a {kind} event",
                lambda: self._append(keys=[session_key(session_id), events_key(session_id)], args=args),
            )
        except redis.ResponseError as exc:
            if str(exc).startswith(ENDED_ERROR):
                raise FailedPrecondition(ended_message(session_id)) from None
            if str(exc).startswith(LIMIT_ERROR):
                raise FailedPrecondition(
                    f"session {session_id} already holds {limit} {kind} events, the most one session may have"
                ) from None
            raise
        if entry_id is None:
            raise NotFound(f"session {session_id} does not exist (its data were deleted)")
        return Event(entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id), kind, stamp, payload)

    async def events_page(self, session_id: str, after: str = "", count: int = 500) -> list[Event]:
        """Up to ``count`` events in order, those after the event id ``after`` (from the first when empty)."""
        start = f"({after}" if after else "-"
        entries = await self._call(
            "read session events", self.redis.xrange(events_key(session_id), min=start, max="+", count=count)
        )
        return [_event(entry_id, fields) for entry_id, fields in entries]

    async def events(self, session_id: str) -> list[Event]:
        entries = await self._call("read session events", lambda: self.redis.xrange(events_key(session_id)))
        return [_event(entry_id, fields) for entry_id, fields in entries]

    async def user_sessions(self, user_id: str) -> list[str]:
        """Ids in the index of the user's sessions (made as each session is created), sorted."""
        members = await self._call("list a user's sessions", self.redis.smembers(user_sessions_key(user_id)))
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def delete(self, session_id: str, user_id: str | None = None) -> RedisDeletion:
        """Remove the session's hash and event stream, and its entry in its owner's index (``user_id`` when the
        hash is gone already), in one transaction. Deleting a deleted session removes nothing."""
        raw = await self._call("read a session", self.redis.hgetall(session_key(session_id)))
        if raw:
            user_id = SessionRecord.from_redis(raw).user_id
        keys = (session_key(session_id), events_key(session_id), enqueued_key(session_id))
        pipe = self.redis.pipeline(transaction=True)
        pipe.xlen(keys[1])
        for key in keys:
            pipe.delete(key)
        pipe.hdel(PERSISTED_KEY, session_id)
        if user_id:
            pipe.srem(user_sessions_key(user_id), session_id)
        results = await self._call("delete a session", pipe.execute())
        events, removed = int(results[0]), results[1 : 1 + len(keys)]
        return RedisDeletion(tuple(k for k, n in zip(keys, removed, strict=True) if n), events, user_id)


def read_events(client: redis.Redis, session_id: str) -> list[Event]:
    """Synchronous read of a session's whole event log (the worker's side)."""
    entries: list[Any] = client.xrange(events_key(session_id)) or []  # type: ignore[assignment]
    return [_event(entry_id, fields) for entry_id, fields in entries]


def read_session(client: redis.Redis, session_id: str) -> SessionRecord:
    raw = client.hgetall(session_key(session_id))
    if not raw:
        raise NotFound(f"session {session_id} does not exist")
    return SessionRecord.from_redis(raw)  # type: ignore[arg-type]


def new_session_id() -> str:
    return uuid.uuid4().hex
