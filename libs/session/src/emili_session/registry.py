"""Reading the model registry: ``registry/<version>.json`` in the models bucket, and the adapters it names.

The trainer writes an entry after uploading a run's adapter to ``adapters/<version>/`` (entry written last, so
a visible entry means complete files); the chat service serves a version as a model arm, and the trainer
continues or evaluates one. An entry holds at least ``version`` and ``adapter_prefix``; the trainer adds the
recipe, dataset, base model and metrics. Keys come from :mod:`emili_core.keys`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from emili_core.errors import InvalidInput, NotFound
from emili_core.keys import MODEL_REGISTRY_PREFIX, model_registry_key
from emili_core.objectstore import Bucket, ObjectStore

__all__ = ["check_version", "download_adapter", "list_models", "registered_model"]

# A version names object keys and a chat model arm: no '/' or other characters that could leave its prefix.
_VERSION = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def check_version(version: str) -> None:
    if not _VERSION.match(version) or version.strip(".") == "":
        raise InvalidInput(f"invalid model version {version!r}: letters, digits, '.', '_' or '-', at most 64")


def registered_model(store: ObjectStore, version: str) -> dict[str, Any]:
    """The registry entry of ``version``; NotFound names the version when it is not registered."""
    check_version(version)
    try:
        return dict(store.get_json(Bucket.MODELS, model_registry_key(version)))
    except NotFound:
        raise NotFound(f"model version {version!r} is not registered") from None


def list_models(store: ObjectStore) -> list[dict[str, Any]]:
    """Every registry entry, in key order."""
    return [
        dict(store.get_json(Bucket.MODELS, key))
        for key in store.list_keys(Bucket.MODELS, MODEL_REGISTRY_PREFIX)
        if key.endswith(".json")
    ]


def download_adapter(store: ObjectStore, version: str, target: Path) -> Path:
    """Download the adapter files of ``version`` into ``target``; NotFound when it has none."""
    entry = registered_model(store, version)
    prefix = entry.get("adapter_prefix")
    if not isinstance(prefix, str) or not prefix:
        raise NotFound(f"model version {version!r} has a registry entry without an adapter_prefix")
    if not store.get_folder(Bucket.MODELS, prefix, target):
        raise NotFound(f"model version {version!r} names adapter files under {prefix}, but there are none")
    return target
