"""The model registry reader against a real S3 server: entries, the list, adapter downloads, bad versions."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from emili_core.errors import InvalidInput, NotFound
from emili_core.keys import adapter_prefix, model_registry_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_session.registry import check_version, download_adapter, list_models, registered_model

pytestmark = pytest.mark.integration


def register(store: ObjectStore, version: str, files: dict[str, bytes]) -> dict[str, object]:
    """A registry entry the way the trainer publishes one: adapter files first, then the entry."""
    prefix = adapter_prefix(version)
    for name, data in files.items():
        store.put_bytes(Bucket.MODELS, prefix + name, data)
    entry = {"version": version, "adapter_prefix": prefix, "kind": "sft", "files": sorted(files)}
    store.put_json(Bucket.MODELS, model_registry_key(version), entry)
    return entry


def test_entries_list_and_download(object_store: ObjectStore, tmp_path: Path) -> None:
    version = f"sft-{uuid.uuid4().hex[:12]}"
    entry = register(object_store, version, {"adapter_config.json": b"{}", "sub/tokenizer.json": b"tok"})
    assert registered_model(object_store, version) == entry
    assert entry in list_models(object_store)
    folder = download_adapter(object_store, version, tmp_path / version)
    assert folder == tmp_path / version
    assert (folder / "adapter_config.json").read_bytes() == b"{}"
    assert (folder / "sub" / "tokenizer.json").read_bytes() == b"tok"


def test_missing_versions_and_files_are_not_found(object_store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="'v-nowhere' is not registered"):
        registered_model(object_store, "v-nowhere")
    with pytest.raises(NotFound, match="is not registered"):
        download_adapter(object_store, "v-nowhere", tmp_path / "x")
    empty = f"dpo-{uuid.uuid4().hex[:12]}"
    register(object_store, empty, {})
    with pytest.raises(NotFound, match="but there are none"):
        download_adapter(object_store, empty, tmp_path / empty)


@pytest.mark.parametrize("version", ["", "..", "a/b", "../etc", "x" * 65, "v 1"])
def test_versions_that_could_leave_their_prefix_are_invalid(version: str) -> None:
    with pytest.raises(InvalidInput, match="invalid model version"):
        check_version(version)


def test_valid_versions() -> None:
    for version in ("sft-0123456789abcdef", "v1.2", "base_2"):
        check_version(version)


def test_an_entry_without_its_version_is_listed_under_its_key(object_store: ObjectStore) -> None:
    version = f"bare-{uuid.uuid4().hex[:8]}"
    object_store.put_json(Bucket.MODELS, model_registry_key(version), {"adapter_prefix": adapter_prefix(version)})
    assert any(m["version"] == version for m in list_models(object_store))
