"""The object-store client against a real S3 server (rclone serve s3)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from minio.error import S3Error
from prometheus_client import REGISTRY
from pydantic import SecretStr

from emili_core.errors import DependencyUnavailable, NotFound
from emili_core.objectstore import Bucket, ObjectStore, content_key
from emili_core.settings import S3Settings
from emili_testing.plugin import free_port

pytestmark = pytest.mark.integration


def test_buckets_are_created_once_and_idempotently(object_store: ObjectStore) -> None:
    object_store.ensure_buckets()
    names = {b.name for b in object_store.client.list_buckets()}
    assert {object_store.bucket(b) for b in Bucket} <= names


def test_services_creating_the_buckets_at_once_all_succeed(object_store: ObjectStore) -> None:
    """Workers start together on an empty store: each checks, finds no bucket and creates it. The losers' 409
    (which rclone's server sends as text/xml, unparseable for minio) must not crash them."""
    import threading
    import uuid

    settings = object_store.settings.model_copy(update={"bucket_prefix": f"race{uuid.uuid4().hex[:8]}-"})
    stores = [ObjectStore(settings) for _ in range(6)]
    start, errors = threading.Barrier(len(stores)), []

    def create(store: ObjectStore) -> None:
        start.wait()
        try:
            store.ensure_buckets()
        except Exception as exc:  # The test reports whatever escaped.
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert {stores[0].bucket(b) for b in Bucket} <= {b.name for b in object_store.client.list_buckets()}


def test_put_and_read_back(object_store: ObjectStore) -> None:
    digest = object_store.put_bytes(Bucket.SESSIONS, "s-1/events.jsonl", b'{"a":1}\n')
    assert digest == hashlib.sha256(b'{"a":1}\n').hexdigest()
    assert object_store.get_bytes(Bucket.SESSIONS, "s-1/events.jsonl") == b'{"a":1}\n'
    assert object_store.metadata(Bucket.SESSIONS, "s-1/events.jsonl")["sha256"] == digest
    object_store.put_json(Bucket.SESSIONS, "s-1/meta.json", {"b": [1, 2]})
    assert object_store.get_json(Bucket.SESSIONS, "s-1/meta.json") == {"b": [1, 2]}


def test_large_file_streams_in_parts(object_store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "adapter.bin"
    with source.open("wb") as f:
        for _ in range(40):  # 40 MiB: three multipart parts of 16 MiB.
            f.write(os.urandom(1024 * 1024))
    digest = object_store.put_file(Bucket.MODELS, "adapters/test/adapter.bin", source)
    copy = object_store.get_file(Bucket.MODELS, "adapters/test/adapter.bin", tmp_path / "copy.bin")
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest
    streamed = hashlib.sha256()
    for chunk in object_store.iter_chunks(Bucket.MODELS, "adapters/test/adapter.bin"):
        streamed.update(chunk)
    assert streamed.hexdigest() == digest
    with pytest.raises(ValueError, match="in-memory limit"):
        object_store.get_bytes(Bucket.MODELS, "adapters/test/adapter.bin", max_bytes=1024)


def test_content_addressed_keys_are_deterministic(object_store: ObjectStore) -> None:
    first = object_store.put_content_addressed(Bucket.FRAMES, "uploads", b"same bytes", ".bin")
    second = object_store.put_content_addressed(Bucket.FRAMES, "uploads", b"same bytes", ".bin")
    assert first == second == content_key("uploads", hashlib.sha256(b"same bytes").hexdigest(), ".bin")
    assert object_store.list_keys(Bucket.FRAMES, "uploads/").count(first) == 1


def test_missing_object_is_not_found(object_store: ObjectStore) -> None:
    assert not object_store.exists(Bucket.SESSIONS, "nope/never.json")
    with pytest.raises(NotFound):
        object_store.get_bytes(Bucket.SESSIONS, "nope/never.json")


def _errors(operation: str, kind: str) -> float:
    return REGISTRY.get_sample_value("emili_objectstore_errors_total", {"operation": operation, "kind": kind}) or 0.0


def test_an_unreachable_store_counts_each_failed_attempt(
    s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("emili_core.objectstore.time.sleep", lambda seconds: None)  # The backoff, not the failure.
    dead = ObjectStore(s3_settings.model_copy(update={"endpoint": f"127.0.0.1:{free_port()}", "max_attempts": 3}))
    before = _errors("upload", "transient"), _errors("upload", "final")
    with pytest.raises(DependencyUnavailable):
        dead.put_bytes(Bucket.SESSIONS, "s-1/events.jsonl", b"{}\n")
    assert (_errors("upload", "transient"), _errors("upload", "final")) == (before[0] + 2, before[1] + 1)
    pings = _errors("ping", "final")
    with pytest.raises(DependencyUnavailable):
        dead.ping()
    assert _errors("ping", "final") == pings + 1


def test_a_store_refusing_the_credentials_counts_one_final_error(
    object_store: ObjectStore, s3_settings: S3Settings
) -> None:
    refused = ObjectStore(s3_settings.model_copy(update={"secret_key": SecretStr("not-the-secret")}))
    before = _errors("download", "transient"), _errors("download", "final")
    with pytest.raises(S3Error):  # Not transient: no retry would help.
        refused.get_bytes(Bucket.SESSIONS, "s-1/events.jsonl")
    assert (_errors("download", "transient"), _errors("download", "final")) == (before[0], before[1] + 1)
    # The same call with the right credentials: "not found" is an answer, not an error.
    with pytest.raises(NotFound):
        object_store.get_bytes(Bucket.SESSIONS, "never/written.json")
    assert _errors("download", "final") == before[1] + 1
