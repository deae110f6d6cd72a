"""S3-compatible object storage (MinIO in production, rclone's S3 server locally) over the minio SDK.

Keys are deterministic: content-addressed objects live under ``<prefix>/<sha256>``, and the same
bytes always land on the same key, so retried uploads are harmless. Large objects are streamed
(multipart upload from a file, download to a file); nothing reads a whole large object into memory.
"""

from __future__ import annotations

import datetime
import enum
import functools
import hashlib
import io
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from emili_core.errors import DependencyUnavailable, NotFound
from emili_core.metrics import ObjectStoreOperation, objectstore_errors
from emili_core.settings import S3Settings

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
PART_BYTES = 16 * 1024 * 1024
T = TypeVar("T")


class Bucket(enum.StrEnum):
    """The bucket catalogue; names get the configured prefix (``emili-frames`` by default)."""

    FRAMES = "frames"  # Face frames, only with the user's consent; uploaded videos.
    SESSIONS = "sessions"  # Session records: events JSONL, FER time series.
    DATASETS = "datasets"  # Immutable labelled datasets with manifests.
    MODELS = "models"  # LoRA adapters, checkpoints and the model registry.
    CACHE = "cache"  # Derived, recomputable artefacts (embedding caches, reports' inputs).


_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}
# Another process made the bucket first (ensure_buckets): an answer, not the store failing.
_CREATED_ALREADY_CODES = {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}


def _is_store_error(exc: BaseException) -> bool:
    """The store or the way to it failed, as opposed to the caller (a ValueError of our own) or a bug."""
    if isinstance(exc, S3Error) and exc.code in _CREATED_ALREADY_CODES:
        return False
    return isinstance(exc, MinioException | urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, S3Error):
        return exc.code in {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"}
    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_key(prefix: str, digest: str, suffix: str = "") -> str:
    """``<prefix>/<aa>/<sha256><suffix>``: the two-character fan-out keeps listings small."""
    return f"{prefix.strip('/')}/{digest[:2]}/{digest}{suffix}"


class ObjectStore:
    def __init__(self, settings: S3Settings, client: Minio | None = None) -> None:
        self.settings = settings
        self.client = client or Minio(
            settings.endpoint,
            access_key=settings.access_key.get_secret_value(),
            secret_key=settings.secret_key.get_secret_value(),
            secure=settings.secure,
            region=settings.region,
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=5, read=60), retries=urllib3.Retry(total=0), maxsize=16
            ),
        )

    def bucket(self, bucket: Bucket) -> str:
        return f"{self.settings.bucket_prefix}{bucket.value}"

    def _retry(self, operation: ObjectStoreOperation, what: str, fn: Callable[[], T]) -> T:
        """Retry transient failures with jittered exponential backoff; others go straight up. Every failed attempt
        counts in emili_objectstore_errors_total; "not found" is an answer, not a failure."""
        attempts = self.settings.max_attempts
        errors = objectstore_errors()
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if isinstance(exc, S3Error) and exc.code in _NOT_FOUND_CODES:
                    raise NotFound(f"{what}: not found") from exc
                transient = _is_transient(exc)
                if _is_store_error(exc):
                    errors.labels(operation, "transient" if transient and attempt < attempts else "final").inc()
                if not transient:
                    raise
                if attempt == attempts:
                    raise DependencyUnavailable(
                        f"object store at {self.settings.endpoint} failed {attempts} times: {what}: {exc}"
                    ) from exc
                delay = min(5.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.0)
                log.warning("object store: %s failed (%s); retry %d/%d in %.2fs", what, exc, attempt, attempts, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def ensure_buckets(self) -> None:
        for bucket in Bucket:
            name = self.bucket(bucket)
            if not self._retry("bucket", f"check bucket {name}", functools.partial(self.client.bucket_exists, name)):
                try:
                    self._retry("bucket", f"create bucket {name}", functools.partial(self.client.make_bucket, name))
                except (S3Error, InvalidResponseError) as exc:
                    # Another service created it between the check and the create. Some servers (rclone's)
                    # answer that 409 as text/xml, which minio cannot parse into an error code: look again.
                    code = getattr(exc, "code", None)
                    if code in _CREATED_ALREADY_CODES:
                        continue
                    if not self._retry(
                        "bucket", f"check bucket {name}", functools.partial(self.client.bucket_exists, name)
                    ):
                        raise

    def ping(self) -> None:
        try:
            self.client.list_buckets()
        except Exception as exc:
            objectstore_errors().labels("ping", "final").inc()
            raise DependencyUnavailable(f"object store at {self.settings.endpoint} unreachable: {exc}") from exc

    def exists(self, bucket: Bucket, key: str) -> bool:
        try:
            self._retry("stat", f"stat {key}", functools.partial(self.client.stat_object, self.bucket(bucket), key))
        except NotFound:
            return False
        return True

    def put_file(self, bucket: Bucket, key: str, path: Path, content_type: str = "application/octet-stream") -> str:
        """Upload a file in parts (never whole in memory); returns its sha256, stored as metadata too."""
        digest = sha256_file(path)
        self._retry(
            "upload",
            f"upload {key}",
            functools.partial(
                self.client.fput_object,
                self.bucket(bucket),
                key,
                str(path),
                content_type=content_type,
                metadata={"sha256": digest},
                part_size=PART_BYTES,
            ),
        )
        return digest

    def put_bytes(self, bucket: Bucket, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """For small objects (JSON, frames). Returns the sha256."""
        digest = sha256_bytes(data)

        def upload() -> Any:
            return self.client.put_object(
                self.bucket(bucket),
                key,
                io.BytesIO(data),
                len(data),
                content_type=content_type,
                metadata={"sha256": digest},
            )

        self._retry("upload", f"upload {key}", upload)
        return digest

    def put_content_addressed(self, bucket: Bucket, prefix: str, data: bytes, suffix: str = "") -> str:
        """Store bytes under their content hash; uploading the same bytes again is a no-op. Returns the key."""
        key = content_key(prefix, sha256_bytes(data), suffix)
        if not self.exists(bucket, key):
            self.put_bytes(bucket, key, data)
        return key

    def put_json(self, bucket: Bucket, key: str, value: Any) -> str:
        data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        return self.put_bytes(bucket, key, data, content_type="application/json")

    def get_bytes(self, bucket: Bucket, key: str, max_bytes: int = 64 * 1024 * 1024) -> bytes:
        """For small objects only: refuses anything larger than ``max_bytes`` (use ``get_file``)."""

        def download() -> bytes:
            size = self.client.stat_object(self.bucket(bucket), key).size or 0
            if size > max_bytes:
                raise ValueError(f"{key} is {size} bytes, over the {max_bytes}-byte in-memory limit; use get_file")
            response = self.client.get_object(self.bucket(bucket), key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._retry("download", f"download {key}", download)

    def get_json(self, bucket: Bucket, key: str) -> Any:
        return json.loads(self.get_bytes(bucket, key))

    def get_file(self, bucket: Bucket, key: str, path: Path) -> Path:
        """Stream an object to a file (the SDK writes a part file and renames it when complete)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._retry(
            "download",
            f"download {key}",
            functools.partial(self.client.fget_object, self.bucket(bucket), key, str(path)),
        )
        return path

    def iter_chunks(self, bucket: Bucket, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        response = self._retry(
            "download", f"open {key}", functools.partial(self.client.get_object, self.bucket(bucket), key)
        )
        try:
            yield from response.stream(chunk_bytes)
        finally:
            response.close()
            response.release_conn()

    def list_keys(self, bucket: Bucket, prefix: str) -> list[str]:
        return [key for key, _ in self.list_entries(bucket, prefix)]

    def metadata(self, bucket: Bucket, key: str) -> dict[str, str]:
        stat = self._retry("stat", f"stat {key}", functools.partial(self.client.stat_object, self.bucket(bucket), key))
        return {k.lower().removeprefix("x-amz-meta-"): v for k, v in (stat.metadata or {}).items()}

    def list_entries(self, bucket: Bucket, prefix: str) -> list[tuple[str, str]]:
        """(key, etag) of every object under ``prefix``, sorted by key."""
        objects = self._retry(
            "list",
            f"list {prefix}",
            lambda: list(self.client.list_objects(self.bucket(bucket), prefix=prefix, recursive=True)),
        )
        return sorted((o.object_name, o.etag or "") for o in objects if o.object_name)

    def list_modified(self, bucket: Bucket, prefix: str) -> list[tuple[str, datetime.datetime | None]]:
        """(key, last modified) of every object under ``prefix``, sorted by key (for retention sweeps)."""
        objects = self._retry(
            "list",
            f"list {prefix}",
            lambda: list(self.client.list_objects(self.bucket(bucket), prefix=prefix, recursive=True)),
        )
        return sorted((o.object_name, o.last_modified) for o in objects if o.object_name)

    def apply_lifecycle(self, bucket: Bucket, prefix: str, days: int) -> bool:
        """Ask the server to expire objects under ``prefix`` after ``days`` days (an S3 lifecycle rule; ``days`` 0
        removes the rule). False when the server has no lifecycle support (rclone's S3 server): sweep instead."""
        from emili_core.retention import lifecycle_config  # Beside the sweeper that stands in for it.

        name = self.bucket(bucket)
        try:
            if days > 0:
                self.client.set_bucket_lifecycle(name, lifecycle_config(prefix, days))
            else:
                self.client.delete_bucket_lifecycle(name)
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
            # No answer at all is an unreachable store, not a store without lifecycle support.
            objectstore_errors().labels("bucket", "final").inc()
            raise DependencyUnavailable(f"object store at {self.settings.endpoint} unreachable: {exc}") from exc
        except MinioException as exc:  # rclone answers PUT ?lifecycle as a bucket creation: 409.
            log.info("object store: no lifecycle rule on %s (%s): the retention sweeper expires it", name, exc)
            return False
        return True

    def delete(self, bucket: Bucket, key: str) -> None:
        """Remove one object; removing a missing one is not an error (so retries are safe)."""
        self._retry("delete", f"delete {key}", functools.partial(self.client.remove_object, self.bucket(bucket), key))

    def put_folder(self, bucket: Bucket, prefix: str, folder: Path) -> list[str]:
        """Upload every file under ``folder`` to ``prefix`` + its relative path; returns the keys, sorted."""
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
            self.put_file(bucket, key, path)
            keys.append(key)
        return keys

    def get_folder(self, bucket: Bucket, prefix: str, folder: Path) -> list[Path]:
        """Download every object under ``prefix`` into ``folder``, keeping relative paths."""
        prefix = prefix.rstrip("/") + "/"
        return [self.get_file(bucket, key, folder / key[len(prefix) :]) for key in self.list_keys(bucket, prefix)]
