"""Reading the records services share through object storage: session records (bucket ``sessions``, written
by the chat service) and dataset manifests (bucket ``datasets``, written by the labeler), read by the
labeler, trainer and pipeline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from emili_core.errors import InvalidInput, NotFound
from emili_core.keys import check_session_id, dataset_index_key, dataset_withdrawal_key, session_record_keys
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


# The chat service's Redis hash of a live session (``emili_chat.store.session_key``; a chat test keeps them equal):
# what the session's consent is before its record reaches object storage.
CHAT_SESSION_HASH = "emili:chat:session:{}"


class HashReader(Protocol):
    def hgetall(self, name: str) -> Any: ...


@dataclass(frozen=True)
class Consent:
    """What the session's user agreed to, and where it was read (``session.json`` or ``redis``)."""

    store_frames: bool
    use_for_training: bool
    source: str


def session_consent(store: ObjectStore, session_id: str, client: HashReader | None = None) -> Consent | None:
    """The session's consent from its persisted record, else (a live session) from chat's Redis hash; None when
    neither exists: such a session has no consent to anything."""
    check_session_id(session_id)
    try:
        manifest = store.get_json(Bucket.SESSIONS, session_record_keys(session_id)["session.json"])
    except NotFound:
        manifest = None
    if isinstance(manifest, dict):
        return Consent(
            bool(manifest.get("store_frames", False)), bool(manifest.get("use_for_training", False)), "session.json"
        )
    if client is None:
        return None
    raw = client.hgetall(CHAT_SESSION_HASH.format(session_id)) or {}
    fields = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in raw.items()}
    if not fields:
        return None

    def flag(name: str) -> bool:
        try:
            return bool(json.loads(fields.get(name) or "false"))
        except ValueError:
            return False

    return Consent(flag("store_frames"), flag("use_for_training"), "redis")


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


def dataset_withdrawal(store: ObjectStore, dataset_id: str) -> dict[str, Any] | None:
    """Why a dataset version may no longer be trained on (the labeler's ``withdrawn.json`` beside its manifest:
    the sessions withdrawn, when, and the dataset rebuilt without them), or None when it may."""
    if not dataset_id or "/" in dataset_id:
        raise InvalidInput(f"invalid dataset id {dataset_id!r}")
    try:
        index = store.get_json(Bucket.DATASETS, dataset_index_key(dataset_id))
    except NotFound:
        raise NotFound(f"dataset {dataset_id} does not exist; build it with the labeler first") from None
    try:
        return dict(
            store.get_json(Bucket.DATASETS, index.get("withdrawn") or dataset_withdrawal_key(index["manifest"]))
        )
    except NotFound:
        return None
