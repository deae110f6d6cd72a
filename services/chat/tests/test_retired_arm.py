"""A model version retired after a withdrawal (``retention.withdrawn_models: retire``) starts no new session,
whether or not its adapter is already loaded; a marked but not retired version still serves. A version the evaluation
gate rejected serves no person."""

from __future__ import annotations

from pathlib import Path

import pytest

from emili_chat.adapters import AdapterRegistry
from emili_core.errors import FailedPrecondition
from emili_core.keys import adapter_prefix, model_registry_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_session.loop_records import gate_key
from emili_session.registry import mark_models_withdrawn
from emili_testing.chat import ScriptedBackend

pytestmark = pytest.mark.integration


def register(store: ObjectStore, version: str, sessions: list[str]) -> None:
    prefix = adapter_prefix(version)
    store.put_bytes(Bucket.MODELS, f"{prefix}adapter_config.json", b"{}")
    entry = {"version": version, "adapter_prefix": prefix, "lineage": {"datasets": [], "sessions": sessions}}
    store.put_json(Bucket.MODELS, model_registry_key(version), entry)


async def test_a_retired_arm_starts_no_session(object_store: ObjectStore, tmp_path: Path) -> None:
    register(object_store, "ra-kept", ["ra-fay"])
    register(object_store, "ra-gone", ["ra-gil"])
    registry = AdapterRegistry(ScriptedBackend(), object_store, tmp_path / "cache")
    assert await registry.resolve("ra-gone") == "ra-gone"  # Loaded while still in service.

    mark_models_withdrawn(object_store, ["ra-fay"], retire=False)
    mark_models_withdrawn(object_store, ["ra-gil"], retire=True)
    assert await registry.resolve("ra-kept") == "ra-kept"
    with pytest.raises(FailedPrecondition, match="'ra-gone' was retired"):
        await registry.resolve("ra-gone")


async def test_a_rejected_candidate_serves_no_person_but_a_simulated_user(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    register(object_store, "ra-passed", ["ra-hal"])
    register(object_store, "ra-rejected", ["ra-ivy"])
    checks = [{"name": "reaction_gain", "passed": False}, {"name": "length", "passed": True}]
    object_store.put_json(Bucket.MODELS, gate_key("ra-rejected"), {"policy": "p", "passed": False, "checks": checks})
    object_store.put_json(Bucket.MODELS, gate_key("ra-passed"), {"policy": "p", "passed": True, "checks": []})
    registry = AdapterRegistry(ScriptedBackend(), object_store, tmp_path / "cache")

    assert await registry.resolve("ra-passed") == "ra-passed"
    # Studies measure rejected candidates with simulated users; a person's session is refused.
    assert await registry.resolve("ra-rejected", synthetic=True) == "ra-rejected"
    with pytest.raises(FailedPrecondition, match=r"'ra-rejected' failed the evaluation gate 'p' \(reaction_gain\)"):
        await registry.resolve("ra-rejected")
