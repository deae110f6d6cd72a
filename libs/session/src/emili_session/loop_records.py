"""The automatic loop's records in object storage, for those who read them back (the gateway's researcher page).

``emili_pipeline.loop`` writes them in bucket ``models``; a reader never imports the pipeline, so these keys and
the fields below are the contract between them:

    loop/state.json                 the loop's state: phase, pipeline_id, candidate, sessions (of the candidate in
                                    progress), used_sessions, history (one entry per decision: at_ms, event,
                                    phase and its numbers, e.g. candidate, pipeline_id, failed_checks)
    gates/<version>.json            the gate's verdict on a candidate: policy, passed, decided_ms, checks (name,
                                    metric, kind, passed, n, estimate, ci, reason, margin, min_n, paired),
                                    version, pipeline_id, sessions
    pipelines/<id>/state.json       the pipeline that trained it (:func:`emili_core.keys.pipeline_state_key`):
                                    sessions, train_sessions, heldout_sessions, steps

A missing record reads as None (the loop has not got that far); one that is not a JSON object is a
FailedPrecondition naming it.
"""

from __future__ import annotations

import re
from typing import Any

from emili_core.errors import FailedPrecondition, InvalidInput, NotFound
from emili_core.keys import pipeline_state_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_session.registry import check_version

__all__ = [
    "GATE_PREFIX",
    "LOOP_STATE_KEY",
    "STUDIES_PREFIX",
    "check_gate_not_failed",
    "check_pipeline_id",
    "gate_key",
    "gate_verdict",
    "loop_state",
    "pipeline_record",
]

LOOP_STATE_KEY = "loop/state.json"
GATE_PREFIX = "gates/"
# Bucket ``sessions``: the gateway keeps its studies under this prefix (its ``studies.prefix`` setting, whose default
# this is), one record per study session at ``<prefix>/<study>/sessions/<session>.json``; the loop reads them to take
# one study's sessions only.
STUDIES_PREFIX = "studies"
_PIPELINE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def gate_key(version: str) -> str:
    """Bucket ``models``: the gate's verdict on a candidate version, with its evidence's numbers."""
    return f"{GATE_PREFIX}{version}.json"


def check_pipeline_id(pipeline_id: str) -> None:
    if not _PIPELINE_ID.match(pipeline_id) or pipeline_id.strip(".") == "":
        raise InvalidInput(f"invalid pipeline id {pipeline_id!r}: letters, digits, '.', '_' or '-', at most 64")


def _read(store: ObjectStore, key: str, what: str) -> dict[str, Any] | None:
    try:
        value = store.get_json(Bucket.MODELS, key)
    except NotFound:
        return None
    except ValueError as exc:  # Not JSON (or too large to read).
        raise FailedPrecondition(f"{what} (models/{key}) cannot be read: {exc}") from None
    if not isinstance(value, dict):
        raise FailedPrecondition(f"{what} (models/{key}) is not a JSON object")
    return value


def loop_state(store: ObjectStore) -> dict[str, Any] | None:
    """The loop's state as it last saved it; None when the loop has never run."""
    return _read(store, LOOP_STATE_KEY, "the loop's state")


def gate_verdict(store: ObjectStore, version: str) -> dict[str, Any] | None:
    """The gate's verdict on ``version``; None when the gate has not judged it."""
    check_version(version)
    return _read(store, gate_key(version), f"the gate's verdict on {version}")


def check_gate_not_failed(store: ObjectStore, version: str) -> None:
    """FailedPrecondition when the evaluation gate rejected ``version``: a rejected candidate stays registered, with
    its verdict as evidence, but is never put in front of participants. A version the gate never judged (trained by
    hand, not by the loop) is the researcher's call."""
    verdict = gate_verdict(store, version)
    if verdict is not None and not verdict.get("passed"):
        checks = verdict.get("checks")
        failed = (
            [str(c.get("name")) for c in checks if isinstance(c, dict) and not c.get("passed")]
            if isinstance(checks, list)
            else []
        )
        raise FailedPrecondition(
            f"model version {version!r} failed the evaluation gate {verdict.get('policy', '')!r} "
            f"({', '.join(failed) or 'see its verdict'}): a rejected candidate is never served; "
            f"see GET /api/v1/loop/candidates/{version}"
        )


def pipeline_record(store: ObjectStore, pipeline_id: str) -> dict[str, Any] | None:
    """A pipeline's state (its sessions, training and held-out ones, and steps); None when there is none."""
    check_pipeline_id(pipeline_id)
    return _read(store, pipeline_state_key(pipeline_id), f"pipeline {pipeline_id}")
