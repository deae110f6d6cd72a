"""Sessions and their event log in Redis.

Every event is appended to the session's Redis stream (XADD) before the service acknowledges it, so a
crash or restart of the chat service loses nothing it acknowledged; the chat worker later copies the
stream to object storage as the session record. Session metadata lives in a hash beside it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from emili_core.auth import Principal
from emili_core.errors import DependencyUnavailable, FailedPrecondition, NotFound, PermissionDenied

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
        return cls(**{k.decode(): json.loads(v) for k, v in raw.items()})


@dataclass(frozen=True)
class Event:
    event_id: str
    kind: str
    time_ms: int
    payload: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "kind": self.kind, "time_ms": self.time_ms, **self.payload}


def _event(entry_id: Any, fields: Any) -> Event:
    return Event(
        event_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        kind=fields[b"kind"].decode(),
        time_ms=int(fields[b"time_ms"]),
        payload=json.loads(fields[b"payload"]),
    )


class SessionStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise DependencyUnavailable(f"Redis unavailable while trying to {what}: {exc}") from exc

    async def create(self, record: SessionRecord) -> SessionRecord:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(session_key(record.session_id), mapping=record.to_redis())  # type: ignore[arg-type]
        pipe.sadd(user_sessions_key(record.user_id), record.session_id)
        await self._call("create a session", pipe.execute())
        return record

    async def get(self, session_id: str) -> SessionRecord:
        if not session_id:
            raise NotFound("session_id is empty")
        raw = await self._call("read a session", self.redis.hgetall(session_key(session_id)))
        if not raw:
            raise NotFound(f"session {session_id} does not exist")
        return SessionRecord.from_redis(raw)

    async def get_owned(self, session_id: str, principal: Principal, *, active: bool = False) -> SessionRecord:
        """The session, if ``principal`` owns it (or is an admin); optionally it must still be active."""
        record = await self.get(session_id)
        if record.user_id != principal.subject and not principal.is_admin:
            raise PermissionDenied(f"session {session_id} belongs to another user")
        if active and record.state != ACTIVE:
            raise FailedPrecondition(f"session {session_id} has ended")
        return record

    async def end(self, record: SessionRecord) -> SessionRecord:
        record.state, record.ended_ms = ENDED, now_ms()
        await self._call(
            "end a session",
            self.redis.hset(
                session_key(record.session_id),
                mapping={"state": json.dumps(ENDED), "ended_ms": json.dumps(record.ended_ms)},
            ),
        )
        return record

    async def append(self, session_id: str, kind: str, payload: dict[str, Any], time_ms: int | None = None) -> Event:
        """Durably append one event; returns it with its stream id. Callers acknowledge only after this."""
        stamp = time_ms if time_ms is not None else now_ms()
        fields: dict[Any, Any] = {
            "kind": kind,
            "time_ms": str(stamp),
            "payload": json.dumps(payload, separators=(",", ":")),
        }
        entry_id = await self._call(f"record a {kind} event", self.redis.xadd(events_key(session_id), fields))
        return Event(entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id), kind, stamp, payload)

    async def events(self, session_id: str) -> list[Event]:
        entries = await self._call("read session events", self.redis.xrange(events_key(session_id)))
        return [_event(entry_id, fields) for entry_id, fields in entries]


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
