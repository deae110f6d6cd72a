"""``emili_objectstore_errors_total``: one count per failed attempt, with bounded labels (a fake minio client; the
real S3 server's failures are in tests/test_objectstore.py)."""

from __future__ import annotations

from typing import Any

import pytest
import urllib3
from minio.error import S3Error
from prometheus_client import REGISTRY

from emili_core.errors import DependencyUnavailable, NotFound
from emili_core.metrics import OBJECTSTORE_ERROR_KINDS, OBJECTSTORE_OPERATIONS, objectstore_errors
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import S3Settings


def count(operation: str, kind: str) -> float:
    return REGISTRY.get_sample_value("emili_objectstore_errors_total", {"operation": operation, "kind": kind}) or 0.0


def s3_error(code: str) -> S3Error:
    return S3Error(code, code, "resource", "request-id", "host-id", None)  # type: ignore[arg-type]


class FlakyClient:
    """Raises the queued errors, one per call, then answers."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    def _answer(self, value: Any) -> Any:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return value

    def stat_object(self, bucket: str, key: str) -> Any:
        return self._answer(object())

    def remove_object(self, bucket: str, key: str) -> None:
        self._answer(None)

    def list_buckets(self) -> list[Any]:
        return list(self._answer([]))


def store(client: FlakyClient, attempts: int = 3) -> ObjectStore:
    return ObjectStore(S3Settings(max_attempts=attempts), client=client)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("emili_core.objectstore.time.sleep", lambda seconds: None)


def test_every_series_exists_from_the_start() -> None:
    objectstore_errors()
    for operation in OBJECTSTORE_OPERATIONS:
        for kind in OBJECTSTORE_ERROR_KINDS:
            assert (
                REGISTRY.get_sample_value("emili_objectstore_errors_total", {"operation": operation, "kind": kind})
                is not None
            )


def test_retried_attempts_count_as_transient() -> None:
    before = count("delete", "transient"), count("delete", "final")
    client = FlakyClient(urllib3.exceptions.ProtocolError("reset"), s3_error("SlowDown"))
    store(client).delete(Bucket.SESSIONS, "s-1/events.jsonl")
    assert client.calls == 3
    assert (count("delete", "transient"), count("delete", "final")) == (before[0] + 2, before[1])


def test_spent_retries_count_the_last_attempt_as_final() -> None:
    before = count("stat", "transient"), count("stat", "final")
    client = FlakyClient(*(ConnectionRefusedError("refused") for _ in range(3)))
    with pytest.raises(DependencyUnavailable):
        store(client).metadata(Bucket.SESSIONS, "s-1/events.jsonl")
    assert (count("stat", "transient"), count("stat", "final")) == (before[0] + 2, before[1] + 1)


def test_an_error_retrying_cannot_fix_is_final_at_once() -> None:
    before = count("delete", "final")
    with pytest.raises(S3Error):
        store(FlakyClient(s3_error("AccessDenied"))).delete(Bucket.SESSIONS, "k")
    assert count("delete", "final") == before + 1


def test_not_found_and_the_caller_s_own_errors_are_not_store_errors() -> None:
    before = {(o, k): count(o, k) for o in OBJECTSTORE_OPERATIONS for k in OBJECTSTORE_ERROR_KINDS}
    assert not store(FlakyClient(s3_error("NoSuchKey"))).exists(Bucket.SESSIONS, "missing")
    with pytest.raises(NotFound):
        store(FlakyClient(s3_error("NoSuchKey"))).metadata(Bucket.SESSIONS, "missing")
    with pytest.raises(ValueError):
        store(FlakyClient(ValueError("a bug of ours"))).delete(Bucket.SESSIONS, "k")
    assert {(o, k): count(o, k) for o in OBJECTSTORE_OPERATIONS for k in OBJECTSTORE_ERROR_KINDS} == before


def test_a_failed_ping_counts() -> None:
    before = count("ping", "final")
    with pytest.raises(DependencyUnavailable):
        store(FlakyClient(ConnectionRefusedError("refused"))).ping()
    assert count("ping", "final") == before + 1
