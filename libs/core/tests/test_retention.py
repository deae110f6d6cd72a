"""Retention: the lifecycle rule built for S3, the fallback to the sweeper where the server has no lifecycle
support (rclone's S3 server), the sweeper deleting what is past its period and keeping the rest, and the consent
reader the FER worker and the labeler use."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
from minio.error import S3Error
from minio.lifecycleconfig import LifecycleConfig
from minio.xml import marshal

from emili_core import retention
from emili_core.keys import frame_key, session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.records import CHAT_SESSION_HASH, session_consent
from emili_core.settings import CommonSettings, RetentionSettings, S3Settings


class FakeLifecycleClient:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[tuple[str, Any]] = []

    def set_bucket_lifecycle(self, bucket: str, config: LifecycleConfig) -> None:
        self.calls.append((bucket, config))
        if self.error is not None:
            raise self.error

    def delete_bucket_lifecycle(self, bucket: str) -> None:
        self.calls.append((bucket, None))


def test_retention_settings_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = RetentionSettings()
    assert (defaults.frames_days, defaults.event_stream_days, defaults.idle_session_days) == (30, 7, 30)
    monkeypatch.setenv("EMILI_RETENTION__FRAMES_DAYS", "0")
    monkeypatch.setenv("EMILI_RETENTION__EVENT_STREAM_DAYS", "2")
    settings = CommonSettings()
    assert settings.retention.frames_days == 0 and settings.retention.event_stream_days == 2


def test_lifecycle_config_expires_the_prefix_after_the_period() -> None:
    xml = marshal(retention.lifecycle_config("", 30)).decode()
    assert "<Expiration><Days>30</Days></Expiration>" in xml
    assert "<Status>Enabled</Status>" in xml and f"<ID>{retention.RULE_ID}</ID>" in xml
    with pytest.raises(ValueError, match="at least one day"):
        retention.lifecycle_config("", 0)


def test_apply_lifecycle_sets_the_rule_or_reports_it_unsupported() -> None:
    ok = FakeLifecycleClient()
    store = ObjectStore(S3Settings(), client=ok)  # type: ignore[arg-type]
    assert store.apply_lifecycle(Bucket.FRAMES, "", 30) is True
    [(bucket, config)] = ok.calls
    assert bucket == "emili-frames" and config.rules[0].expiration.days == 30
    assert store.apply_lifecycle(Bucket.FRAMES, "", 0) is True and ok.calls[-1] == ("emili-frames", None)

    error = S3Error("NotImplemented", "not implemented", "", "", "", None)  # type: ignore[arg-type]
    refused = ObjectStore(S3Settings(), client=FakeLifecycleClient(error))  # type: ignore[arg-type]
    assert refused.apply_lifecycle(Bucket.FRAMES, "", 30) is False


class FakeListing:
    """list_modified/delete over a dict of key → last modified (one bucket; the others are empty)."""

    def __init__(self, objects: dict[str, datetime.datetime], bucket: Bucket = Bucket.FRAMES) -> None:
        self.objects = dict(objects)
        self.holds = bucket

    def bucket(self, bucket: Bucket) -> str:
        return f"emili-{bucket.value}"

    def list_modified(self, bucket: Bucket, prefix: str) -> list[tuple[str, datetime.datetime]]:
        if bucket != self.holds:
            return []
        return sorted((k, v) for k, v in self.objects.items() if k.startswith(prefix))

    def delete(self, bucket: Bucket, key: str) -> None:
        assert bucket == self.holds
        self.objects.pop(key, None)

    def apply_lifecycle(self, bucket: Bucket, prefix: str, days: int) -> bool:
        return False


def test_sweep_deletes_only_what_is_past_the_period() -> None:
    now = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
    listing = FakeListing(
        {
            "s1/frames/0000000000001.jpg": now - datetime.timedelta(days=31),
            "s1/frames/0000000000002.jpg": now - datetime.timedelta(days=29),
            "uploads/clip.avi": now - datetime.timedelta(days=40),
        }
    )
    before = retention.OBJECTS_DELETED.labels("emili-frames")._value.get()
    result = retention.sweep_objects(listing, Bucket.FRAMES, "", 30, now=now)  # type: ignore[arg-type]
    assert (result.scanned, result.deleted) == (3, 2)
    assert list(listing.objects) == ["s1/frames/0000000000002.jpg"]
    assert retention.OBJECTS_DELETED.labels("emili-frames")._value.get() == before + 2
    assert retention.sweep_objects(listing, Bucket.FRAMES, "", 0, now=now + 1000 * retention.DAY).deleted == 0


def test_sweep_expires_fer_readings_but_never_session_records() -> None:
    now = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
    old = now - datetime.timedelta(days=400)
    listing = FakeListing(
        {
            "s1/session.json": old,
            "s1/events.jsonl": old,
            "s1/labels/abc.json": old,
            "s1/fer/readings-abc.jsonl": old,
        },
        Bucket.SESSIONS,
    )
    summary = retention.sweep(listing, RetentionSettings(), now=now)  # type: ignore[arg-type]
    assert summary["fer_readings"]["deleted"] == 1 and summary["frames"]["by_lifecycle"] is False
    assert "s1/fer/readings-abc.jsonl" not in listing.objects and "s1/session.json" in listing.objects


@pytest.mark.integration
def test_rclone_has_no_lifecycle_so_the_sweeper_deletes_old_frames_and_keeps_new_ones(
    object_store: ObjectStore,
) -> None:
    assert object_store.apply_lifecycle(Bucket.FRAMES, "", 30) is False  # rclone: the sweeper's job.
    old, new = frame_key("ret-sweep", 1), frame_key("ret-sweep", 2)
    object_store.put_bytes(Bucket.FRAMES, old, b"\xff\xd8 old face")
    time.sleep(1.2)  # LastModified has one-second resolution.
    object_store.put_bytes(Bucket.FRAMES, new, b"\xff\xd8 new face")
    modified = dict(object_store.list_modified(Bucket.FRAMES, "ret-sweep/"))
    assert modified[old] is not None and modified[new] is not None and modified[new] > modified[old]
    now = modified[old] + retention.DAY + datetime.timedelta(seconds=0.5)  # The old one is a day and more old.
    result = retention.sweep_objects(object_store, Bucket.FRAMES, "ret-sweep/", 1, now=now)
    assert (result.scanned, result.deleted, result.deleted_keys) == (2, 1, [old])
    assert object_store.list_keys(Bucket.FRAMES, "ret-sweep/") == [new]
    # Nothing written in this test run is a day old: a real sweep keeps it all.
    summary = retention.sweep(object_store, RetentionSettings(frames_days=1, fer_readings_days=1))
    assert summary["frames"]["by_lifecycle"] is False and summary["frames"]["deleted"] == 0
    assert object_store.list_keys(Bucket.FRAMES, "ret-sweep/") == [new]


class FakeRedis:
    def __init__(self, hashes: dict[str, dict[bytes, bytes]]) -> None:
        self.hashes = hashes

    def hgetall(self, name: str) -> dict[bytes, bytes]:
        return self.hashes.get(name, {})


@pytest.mark.integration
def test_session_consent_from_the_record_then_redis(object_store: ObjectStore) -> None:
    assert session_consent(object_store, "ret-consent-none") is None
    live = {CHAT_SESSION_HASH.format("ret-consent-live"): {b"store_frames": b"true", b"use_for_training": b"false"}}
    consent = session_consent(object_store, "ret-consent-live", FakeRedis(live))
    assert consent is not None and consent.store_frames and not consent.use_for_training and consent.source == "redis"
    key = session_record_keys("ret-consent-rec")["session.json"]
    object_store.put_json(Bucket.SESSIONS, key, {"store_frames": False, "use_for_training": True})
    recorded = session_consent(object_store, "ret-consent-rec", FakeRedis({}))
    assert recorded is not None and not recorded.store_frames and recorded.use_for_training
    assert recorded.source == "session.json"


@pytest.mark.integration
def test_emili_retention_sweep_local(s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from emili_core.cli import app

    monkeypatch.setenv("EMILI_S3__ENDPOINT", s3_settings.endpoint)
    monkeypatch.setenv("EMILI_S3__ACCESS_KEY", s3_settings.access_key.get_secret_value())
    monkeypatch.setenv("EMILI_S3__SECRET_KEY", s3_settings.secret_key.get_secret_value())
    monkeypatch.setenv("EMILI_S3__BUCKET_PREFIX", s3_settings.bucket_prefix)
    result = CliRunner().invoke(app, ["retention", "sweep", "--local"])
    assert result.exit_code == 0, result.output
    assert '"by_lifecycle": false' in result.output and '"fer_readings"' in result.output
