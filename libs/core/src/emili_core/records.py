"""Reading the records services share through object storage: session records (bucket ``sessions``, written
by the chat service) and dataset manifests (bucket ``datasets``, written by the labeler), read by the
labeler, trainer and pipeline."""

from __future__ import annotations

import json
from typing import Any

from emili_core.errors import InvalidInput, NotFound
from emili_core.keys import check_session_id, dataset_index_key, session_record_keys
from emili_core.objectstore import Bucket, ObjectStore


def load_session(store: ObjectStore, session_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A persisted session record: its manifest and its events."""
    check_session_id(session_id)
    keys = session_record_keys(session_id)
    try:
        manifest = store.get_json(Bucket.SESSIONS, keys["session.json"])
    except NotFound:
        raise NotFound(f"session {session_id} has no record in object storage (is it ended and persisted?)") from None
    lines = store.get_bytes(Bucket.SESSIONS, keys["events.jsonl"]).decode().splitlines()
    return manifest, [json.loads(line) for line in lines if line.strip()]


def recorded_sessions(store: ObjectStore) -> list[str]:
    """Ids of every persisted session, sorted."""
    return sorted(k.split("/")[0] for k in store.list_keys(Bucket.SESSIONS, "") if k.endswith("/session.json"))


def dataset_manifest(store: ObjectStore, dataset_id: str) -> dict[str, Any]:
    """A dataset version's manifest, found through its index entry."""
    if not dataset_id or "/" in dataset_id:
        raise InvalidInput(f"invalid dataset id {dataset_id!r}")
    try:
        index = store.get_json(Bucket.DATASETS, dataset_index_key(dataset_id))
    except NotFound:
        raise NotFound(f"dataset {dataset_id} does not exist; build it with the labeler first") from None
    return dict(store.get_json(Bucket.DATASETS, index["manifest"]))
