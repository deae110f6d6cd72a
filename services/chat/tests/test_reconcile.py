"""The reconciler finds ended sessions whose record is missing or behind; the frame uploader rides out outages."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import redis

from emili_chat.frames import FrameSpill, FrameUploader
from emili_chat.persist import persist_session
from emili_chat.reconcile import PERSISTED_KEY, Reconciler, mark_persisted, reconcile
from emili_chat.store import ENDED, SessionRecord, events_key, session_key
from emili_core.errors import DependencyUnavailable
from emili_core.objectstore import Bucket, ObjectStore


def _session(client: redis.Redis, session_id: str, *, ended: bool, ended_ms: int = 1_000) -> None:
    record = SessionRecord(session_id, "ursula", "base", "scripted", False, False, {})
    if ended:
        record.state, record.ended_ms = ENDED, ended_ms
    client.hset(session_key(session_id), mapping=record.to_redis())  # type: ignore[arg-type]
    client.xadd(events_key(session_id), {"kind": "session_created", "time_ms": "1", "payload": "{}"})


@pytest.mark.integration
def test_reconciler_enqueues_ended_sessions_without_a_current_record(
    isolated_redis_url: str, object_store: ObjectStore
) -> None:
    client = redis.Redis.from_url(isolated_redis_url)
    ids = {name: (name * 32)[:32] for name in "abcd"}
    for key in [session_key(i) for i in ids.values()] + [events_key(i) for i in ids.values()] + [PERSISTED_KEY]:
        client.delete(key)
    _session(client, ids["a"], ended=True, ended_ms=1_000_000)  # Never persisted.
    _session(client, ids["b"], ended=True)  # Persisted and current.
    persist_session(client, object_store, ids["b"])
    _session(client, ids["c"], ended=True, ended_ms=2_000_000)  # Persisted, then an event came.
    persist_session(client, object_store, ids["c"])
    mark_persisted(client, ids["c"], json.loads(json.dumps(client.xrevrange(events_key(ids["c"]))[0][0].decode())))
    client.xadd(events_key(ids["c"]), {"kind": "rating", "time_ms": "2", "payload": "{}"})
    _session(client, ids["d"], ended=False)  # Still active.
    enqueued: list[str] = []
    result = reconcile(client, object_store, enqueued.append, requeue_after_s=60, now=3_000.0)
    assert set(enqueued) == {ids["a"], ids["c"]}
    assert result.oldest_age_s == pytest.approx(2_000.0)
    assert client.hget(PERSISTED_KEY, ids["b"]) is not None  # Found current in storage: marked, not enqueued.
    again: list[str] = []
    reconcile(client, object_store, again.append, requeue_after_s=60)
    assert again == []  # Enqueued a moment ago: not again before requeue_after_s.
    reconciler = Reconciler(client, object_store, again.append, interval_s=1, requeue_after_s=60)
    other = Reconciler(client, object_store, again.append, interval_s=1, requeue_after_s=60)
    assert reconciler.holds_lock() and reconciler.holds_lock() and not other.holds_lock()
    client.delete(*[session_key(i) for i in ids.values()], *[events_key(i) for i in ids.values()], PERSISTED_KEY)
    client.delete("emili:chat:reconciler:lock")


class _Objects:
    def __init__(self) -> None:
        self.up = False
        self.stored: dict[str, bytes] = {}

    def put_bytes(self, bucket: Bucket, key: str, data: bytes, content_type: str) -> str:
        if not self.up:
            raise DependencyUnavailable("object store down")
        self.stored[key] = data
        return ""

    def delete(self, bucket: Bucket, key: str) -> None:
        self.stored.pop(key, None)


class _Redis:
    async def exists(self, key: str) -> int:
        return 1


class _Store:
    redis = _Redis()

    async def _call(self, what: str, call: Any) -> Any:
        return await call()


async def test_frames_wait_out_an_outage_and_overflow_is_dropped() -> None:
    objects = _Objects()
    uploader = FrameUploader(objects, _Store(), max_bytes=3 * 1024, uploaders=2, retry_max_s=0.05)  # type: ignore[arg-type]
    frame = b"x" * 1024
    assert all(uploader.submit("s", f"s/frames/{i}.jpg", frame, i) for i in range(3))
    assert not uploader.submit("s", "s/frames/3.jpg", frame, 3)  # Over the bound: dropped, at once.
    await asyncio.sleep(0.3)
    assert objects.stored == {} and len(uploader.pending) + uploader.in_flight == 3
    objects.up = True
    assert await uploader.drain(5)
    assert sorted(objects.stored) == [f"s/frames/{i}.jpg" for i in range(3)]
    await uploader.close()


async def test_frames_beyond_memory_spill_to_disk_and_a_new_process_uploads_them(tmp_path: Path) -> None:
    objects = _Objects()
    spill = FrameSpill(tmp_path / "spill", max_bytes=2 * 1100)
    uploader = FrameUploader(objects, _Store(), max_bytes=1024, uploaders=2, retry_max_s=0.05, spill=spill)  # type: ignore[arg-type]
    frames = {f"s/frames/{i}.jpg": bytes([i]) * 1024 for i in range(4)}
    accepted = [uploader.submit("s", key, jpeg, i) for i, (key, jpeg) in enumerate(frames.items())]
    assert accepted == [True, True, True, False]  # One in memory, two on disk, the fourth fits nowhere.
    assert len(list((tmp_path / "spill").glob("*.frame"))) == 2
    await asyncio.sleep(0.2)
    await uploader.close()  # The process ends during the outage: the in-memory frame is lost, the spilled are not.

    restarted = FrameUploader(  # type: ignore[arg-type]
        objects, _Store(), max_bytes=1024, retry_max_s=0.05, spill=FrameSpill(tmp_path / "spill", max_bytes=2 * 1100)
    )
    assert restarted.spill is not None and len(restarted.spill) == 2
    objects.up = True
    restarted.start()
    assert await restarted.drain(5)
    assert objects.stored == {k: frames[k] for k in ("s/frames/1.jpg", "s/frames/2.jpg")}
    assert list((tmp_path / "spill").iterdir()) == [] and restarted.spill.bytes == 0
    await restarted.close()


def test_a_spill_folder_that_cannot_be_made_turns_spilling_off(tmp_path: Path) -> None:
    from emili_chat.engine import _frame_spill

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert _frame_spill(blocked / "spill", 1024) is None
    assert _frame_spill(tmp_path / "spill", 0) is None
    spill = _frame_spill(tmp_path / "spill", 1024)
    assert spill is not None and spill.folder.is_dir()
