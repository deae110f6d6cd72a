"""Retention of a session's live data in Redis (its event stream and hash).

Once ``chat.persist_session`` has copied an ended session to object storage, its stream and hash expire
``retention.event_stream_days`` later: the live data go, the record in ``emili-sessions`` stays. A session never
ended expires ``retention.idle_session_days`` after its last write. ``0`` keeps them forever. The sweeper
(``chat.retention_sweep``) gives an expiry to every session that has none yet (sessions from before retention, or
whose persist never ran), and expires frames and offline FER readings (:func:`emili_core.retention.sweep`).
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from emili_chat.store import ENDED, events_key, now_ms, read_session, session_key
from emili_core.errors import NotFound
from emili_core.keys import session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.retention import sweep
from emili_core.settings import RetentionSettings

log = logging.getLogger(__name__)
DAY_S = 24 * 3600


def _last_write_ms(client: redis.Redis, session_id: str, created_ms: int) -> int:
    last: Any = client.xrevrange(events_key(session_id), count=1) or []
    if last:
        entry_id = last[0][0]
        entry_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return max(created_ms, int(entry_id.split("-")[0]))
    return created_ms


def expiry_seconds(client: redis.Redis, session_id: str, settings: RetentionSettings) -> int | None:
    """How long the session's Redis data should still live (None: keep; at least 1 s), from its state."""
    try:
        record = read_session(client, session_id)
    except NotFound:
        return None
    if record.state == ENDED:
        return settings.event_stream_days * DAY_S if settings.event_stream_days > 0 else None
    if settings.idle_session_days <= 0:
        return None
    idle_s = (now_ms() - _last_write_ms(client, session_id, record.created_ms)) // 1000
    return max(1, settings.idle_session_days * DAY_S - idle_s)


def apply_retention(
    client: redis.Redis, session_id: str, settings: RetentionSettings, seconds: int | None = None
) -> int | None:
    """EXPIRE the session's event stream and hash (``seconds``, else from its state and ``settings``); returns
    the expiry set, or None when they are kept."""
    ttl = seconds if seconds is not None else expiry_seconds(client, session_id, settings)
    if ttl is None:
        return None
    pipe = client.pipeline(transaction=True)
    pipe.expire(session_key(session_id), ttl)
    pipe.expire(events_key(session_id), ttl)
    pipe.execute()
    log.info("session %s: its Redis stream and hash expire in %d s", session_id, ttl)
    return ttl


def _persisted(store: ObjectStore, session_id: str) -> bool:
    return store.exists(Bucket.SESSIONS, session_record_keys(session_id)["session.json"])


def sweep_redis(client: redis.Redis, store: ObjectStore, settings: RetentionSettings) -> dict[str, int]:
    """An active session's expiry is (re)set to the idle period from its last write; an ended one without an
    expiry whose record is persisted gets the event-stream period; an ended one not persisted yet is left for
    ``chat.persist_session`` (never expire the only copy)."""
    scanned = expiring = malformed = 0
    prefix = session_key("")
    for raw_key in client.scan_iter(match=f"{prefix}*", count=500):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        session_id = key[len(prefix) :]
        scanned += 1
        try:
            state = read_session(client, session_id).state
        except NotFound:
            continue
        except (TypeError, ValueError) as exc:  # Not a record chat wrote: one bad hash must not stop the sweep.
            log.warning("retention sweep: skipping %s, not a session record (%s)", key, exc)
            malformed += 1
            continue
        ttl: Any = client.ttl(key)
        if state == ENDED and (int(ttl) != -1 or not _persisted(store, session_id)):
            continue  # Expiring already, or its record is not in object storage yet.
        if apply_retention(client, session_id, settings) is not None:
            expiring += 1
    return {"sessions_scanned": scanned, "sessions_given_expiry": expiring, "malformed_skipped": malformed}


def retention_sweep(client: redis.Redis, store: ObjectStore, settings: RetentionSettings) -> dict[str, Any]:
    """One retention pass: Redis session data, frames, offline FER readings. Returns what it did."""
    summary: dict[str, Any] = {**sweep(store, settings), "redis": sweep_redis(client, store, settings)}
    log.info("retention sweep: %s", summary)
    return summary
