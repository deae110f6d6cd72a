"""Reading the model registry: ``registry/<version>.json`` in the models bucket, and the adapters it names.

The trainer writes an entry after uploading a run's adapter to ``adapters/<version>/`` (entry written last, so
a visible entry means complete files); the chat service serves a version as a model arm, and the trainer
continues or evaluates one. An entry holds at least ``version`` and ``adapter_prefix``; the trainer adds the
recipe, dataset, base model, metrics and ``lineage``: the datasets and sessions the version learned from,
its own and those of the version it started from. When people withdraw, the versions that learned from their
sessions get a withdrawal mark (``withdrawals/<version>.json``) and, by the ``retention.withdrawn_models``
policy, are retired: never served or built on again. Keys come from :mod:`emili_core.keys`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from emili_core.deletion import now_ms
from emili_core.errors import FailedPrecondition, InvalidInput, NotFound
from emili_core.keys import MODEL_REGISTRY_PREFIX, model_registry_key, model_withdrawal_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.records import dataset_manifest

__all__ = [
    "check_servable",
    "check_version",
    "download_adapter",
    "is_retired",
    "lineage_sessions",
    "list_models",
    "mark_models_withdrawn",
    "model_withdrawal",
    "models_trained_on",
    "registered_model",
]

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
    """Every registry entry, in key order; an entry without its ``version`` gets the one its key names."""
    entries = []
    for key in store.list_keys(Bucket.MODELS, MODEL_REGISTRY_PREFIX):
        if key.endswith(".json"):
            entry = dict(store.get_json(Bucket.MODELS, key))
            entry.setdefault("version", key.removeprefix(MODEL_REGISTRY_PREFIX).removesuffix(".json"))
            entries.append(entry)
    return entries


def download_adapter(store: ObjectStore, version: str, target: Path) -> Path:
    """Download the adapter files of ``version`` into ``target``; NotFound when it has none."""
    entry = registered_model(store, version)
    prefix = entry.get("adapter_prefix")
    if not isinstance(prefix, str) or not prefix:
        raise NotFound(f"model version {version!r} has a registry entry without an adapter_prefix")
    if not store.get_folder(Bucket.MODELS, prefix, target):
        raise NotFound(f"model version {version!r} names adapter files under {prefix}, but there are none")
    return target


def lineage_sessions(entry: Mapping[str, Any]) -> set[str]:
    """The sessions a registry entry learned from (its own dataset's and, through ``init_version``, its parents')."""
    lineage = entry.get("lineage") or {}
    return {str(s) for s in lineage.get("sessions", [])}


def _sessions_learned(store: ObjectStore, entry: Mapping[str, Any]) -> set[str]:
    # Entries registered before lineage was recorded: their dataset's sessions are the best record there is.
    if "lineage" in entry or not entry.get("dataset_id"):
        return lineage_sessions(entry)
    try:
        return {str(s) for s in dataset_manifest(store, str(entry["dataset_id"])).get("source_sessions", [])}
    except (NotFound, InvalidInput):
        return set()


def models_trained_on(store: ObjectStore, session_ids: Iterable[str]) -> list[str]:
    """The registered versions that learned from any of ``session_ids``, in version order."""
    wanted = set(session_ids)
    return sorted(str(m["version"]) for m in list_models(store) if _sessions_learned(store, m) & wanted)


def model_withdrawal(store: ObjectStore, version: str) -> dict[str, Any] | None:
    """The withdrawal mark of ``version`` (sessions withdrawn, when, retired or not), or None when it has none."""
    check_version(version)
    try:
        return dict(store.get_json(Bucket.MODELS, model_withdrawal_key(version)))
    except NotFound:
        return None


def mark_models_withdrawn(
    store: ObjectStore, session_ids: Iterable[str], *, retire: bool, versions: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """Mark every version (of ``versions``, when given) that learned from any of ``session_ids``; ``retire`` also
    takes it out of service. Returns the marks of the versions concerned.

    Idempotent: marks accumulate the withdrawn sessions, keep the first time, and never un-retire a version; a mark
    that would not change is not written again."""
    withdrawn = set(session_ids)
    wanted = None if versions is None else set(versions)
    marks = []
    for entry in list_models(store):
        version = str(entry["version"])
        if wanted is not None and version not in wanted:
            continue
        hit = _sessions_learned(store, entry) & withdrawn
        if not hit:
            continue
        previous = model_withdrawal(store, version) or {}
        sessions = sorted(set(previous.get("withdrawn_sessions", [])) | hit)
        retired = bool(previous.get("retired")) or retire
        if previous and (previous.get("withdrawn_sessions"), bool(previous.get("retired"))) == (sessions, retired):
            marks.append(previous)
            continue
        mark = {
            "version": version,
            "withdrawn_sessions": sessions,
            "withdrawn_ms": previous.get("withdrawn_ms") or now_ms(),
            "updated_ms": now_ms(),
            "retired": retired,
        }
        store.put_json(Bucket.MODELS, model_withdrawal_key(version), mark)
        marks.append(mark)
    return marks


def is_retired(store: ObjectStore, version: str) -> bool:
    """Whether ``version`` was retired because people it learned from withdrew (``base`` never is)."""
    if version == "base":
        return False
    mark = model_withdrawal(store, version)
    return bool(mark and mark.get("retired"))


def check_servable(store: ObjectStore, version: str) -> None:
    """FailedPrecondition when ``version`` was retired because people it learned from withdrew."""
    mark = model_withdrawal(store, version)
    if mark and mark.get("retired"):
        raise FailedPrecondition(
            f"model version {version!r} was retired: {len(mark.get('withdrawn_sessions', []))} of the sessions it "
            "learned from were withdrawn by the people in them; train a new version without them"
        )
