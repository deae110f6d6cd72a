"""Deterministic object keys shared by the services (the key catalogue)."""

from __future__ import annotations

from pathlib import Path

from emili_core.errors import InvalidInput


def check_session_id(session_id: str) -> None:
    if not session_id or "/" in session_id or len(session_id) > 128:
        raise InvalidInput(f"invalid session id {session_id!r}: 1-128 characters, no '/'")


def frames_prefix(session_id: str) -> str:
    """Bucket ``frames``: a session's face frames, one object per capture time."""
    return f"{session_id}/frames/"


def frame_key(session_id: str, capture_time_ms: int, suffix: str = ".jpg") -> str:
    # Zero-padded so that key order is time order.
    return f"{frames_prefix(session_id)}{capture_time_ms:013d}{suffix}"


def capture_time_of(key: str) -> int:
    stem = Path(key).stem
    if not stem.isdigit():
        raise InvalidInput(f"frame key {key} does not end in <capture_time_ms>.<ext>")
    return int(stem)


SESSION_RECORD_FILES = ("events.jsonl", "fer.jsonl", "session.json")


def session_record_keys(session_id: str) -> dict[str, str]:
    """Bucket ``sessions``: the persisted session record (events, FER series, manifest), by file name."""
    return {name: f"{session_id}/{name}" for name in SESSION_RECORD_FILES}


def fer_readings_key(session_id: str, fingerprint: str) -> str:
    """Bucket ``sessions``: readings computed offline by the FER worker from stored frames."""
    return f"{session_id}/fer/readings-{fingerprint}.jsonl"


MODEL_REGISTRY_PREFIX = "registry/"


def model_registry_key(version: str) -> str:
    """Bucket ``models``: a registered model version's manifest (adapter location, recipe, metrics)."""
    return f"{MODEL_REGISTRY_PREFIX}{version}.json"


MODEL_WITHDRAWAL_PREFIX = "withdrawals/"


def model_withdrawal_key(version: str) -> str:
    """Bucket ``models``: which sessions a registered version learned from were withdrawn by their owners, when,
    and whether the version was retired for it (kept apart from the registry entry, which the trainer writes)."""
    return f"{MODEL_WITHDRAWAL_PREFIX}{version}.json"


def adapter_prefix(version: str) -> str:
    """Bucket ``models``: the files of a registered version's LoRA adapter (and its tokenizer)."""
    return f"adapters/{version}/"


def dataset_index_key(dataset_id: str) -> str:
    """Bucket ``datasets``: points at a dataset version's manifest (``{"manifest": key}``)."""
    return f"index/{dataset_id}.json"


def run_prefix(run_id: str) -> str:
    """Bucket ``models``: a training or evaluation run's record, checkpoints and report."""
    return f"runs/{run_id}"


def pipeline_state_key(pipeline_id: str) -> str:
    """Bucket ``models``: a pipeline's state after its last step (config, sessions, each step's outputs)."""
    return f"pipelines/{pipeline_id}/state.json"


def pipeline_prefix(pipeline_id: str) -> str:
    """Bucket ``models``: everything a pipeline keeps besides its runs (state, simulated sessions per arm)."""
    return f"pipelines/{pipeline_id}/"


PIPELINE_ARM_SESSIONS = "arm_sessions.json"
PIPELINE_ARM_USERS = "arm_users.json"


def pipeline_arm_sessions_key(pipeline_id: str) -> str:
    """Bucket ``models``: the session ids of a pipeline's simulated users per arm, once they have all finished."""
    return f"{pipeline_prefix(pipeline_id)}{PIPELINE_ARM_SESSIONS}"


def pipeline_arm_users_key(pipeline_id: str) -> str:
    """Bucket ``models``: the user ids (token subjects) a pipeline's simulated users will have, written before the
    first of them starts, so their sessions are known as the pipeline's own while the step still runs or after it
    died midway."""
    return f"{pipeline_prefix(pipeline_id)}{PIPELINE_ARM_USERS}"


SESSION_TOMBSTONE_PREFIX = "tombstones/"


def session_tombstone_key(session_id: str) -> str:
    """Bucket ``sessions``: marks a session whose data were deleted (its id and when, nothing else).

    Jobs that write a session's data (chat's record, FER's readings, the labeler's labels) check it before and
    after writing, so a job queued before the deletion cannot bring the data back."""
    return f"{SESSION_TOMBSTONE_PREFIX}{session_id}.json"


DELETION_AUDIT_PREFIX = "audit/deletions/"


def deletion_audit_key(day: str, audit_id: str) -> str:
    """Bucket ``sessions``: one deletion's audit record (who asked, which sessions, what was removed, when);
    ``day`` is the UTC date (YYYY-MM-DD). Written once, never changed: the audit log is append-only."""
    return f"{DELETION_AUDIT_PREFIX}{day}/{audit_id}.json"


def dataset_withdrawal_key(manifest_key: str) -> str:
    """Bucket ``datasets``: beside a dataset's manifest, which of its sessions were withdrawn, when, and the
    dataset rebuilt without them. A dataset with this file is never trained on again."""
    return f"{manifest_key.rsplit('/', 1)[0]}/withdrawn.json" if "/" in manifest_key else "withdrawn.json"
