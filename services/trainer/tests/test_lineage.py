"""Model lineage against a real S3 server: a version records the sessions and datasets it learned from (its
parents' included); a withdrawal marks every version that learned from the withdrawn sessions, and the
``retire`` policy takes them out of service for chat, for studies and as a starting point for training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from emili_core.errors import FailedPrecondition
from emili_core.keys import dataset_index_key, dataset_withdrawal_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_labeler.datasets import DatasetManifest, jsonl_bytes
from emili_session.registry import check_servable, mark_models_withdrawn, model_withdrawal, models_trained_on
from emili_trainer import jobs
from emili_trainer.engine import ModelVersion

pytestmark = pytest.mark.integration


def publish_dataset(store: ObjectStore, kind: str, sessions: list[str]) -> str:
    fields = {
        "sft": lambda s: {"session_id": s, "messages": []},
        "dpo_feedback": lambda s: {"sessions": [s], "prompt": [], "chosen": "a", "rejected": "b"},
        "dpo_empathetic": lambda s: {"conv_id": s, "rejected_conv_id": s, "prompt": [], "chosen": "a", "rejected": "b"},
    }[kind]
    records = [{"id": f"{kind}-{s}", **fields(s)} for s in sessions]
    manifest = DatasetManifest.build(kind, records, {"source": "test"}).to_dict()
    prefix = f"{kind}/{manifest['id']}"
    store.put_bytes(Bucket.DATASETS, f"{prefix}/data.jsonl", jsonl_bytes(records))
    store.put_json(Bucket.DATASETS, f"{prefix}/manifest.json", {**manifest, "key": f"{prefix}/data.jsonl"})
    store.put_json(Bucket.DATASETS, dataset_index_key(manifest["id"]), {"manifest": f"{prefix}/manifest.json"})
    return str(manifest["id"])


def register(store: ObjectStore, tmp_path: Path, version: str, dataset: str, init: str | None) -> dict[str, Any]:
    adapter = tmp_path / version
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    lineage = jobs.lineage(store, dataset, init)
    manifest = {"kind": "sft", "dataset_id": dataset, "init_version": init, "lineage": lineage}
    return jobs.publish_model(store, version, adapter, manifest)


def test_lineage_and_withdrawal_marks(object_store: ObjectStore, tmp_path: Path) -> None:
    store = object_store
    sft = publish_dataset(store, "sft", ["ln-ann", "ln-ben"])
    pairs = publish_dataset(store, "dpo_feedback", ["ln-cat"])
    register(store, tmp_path, "ln-sft", sft, None)
    child = register(store, tmp_path, "ln-dpo", pairs, "ln-sft")
    register(store, tmp_path, "ln-other", publish_dataset(store, "sft", ["ln-dan"]), None)

    # The DPO version learned from its own pairs and, through its parent, from the SFT sessions.
    assert child["lineage"]["sessions"] == ["ln-ann", "ln-ben", "ln-cat"]
    assert [d["id"] for d in child["lineage"]["datasets"]] == [pairs, sft]
    assert child["lineage"]["parents"] == ["ln-sft"]
    assert models_trained_on(store, ["ln-ben"]) == ["ln-dpo", "ln-sft"]
    assert models_trained_on(store, ["ln-cat"]) == ["ln-dpo"]

    # Ben withdraws under the "mark" policy: both versions carry the mark and still serve; ln-other is untouched.
    marks = mark_models_withdrawn(store, ["ln-ben"], retire=False)
    assert sorted(m["version"] for m in marks) == ["ln-dpo", "ln-sft"]
    assert model_withdrawal(store, "ln-other") is None
    check_servable(store, "ln-dpo")
    first = model_withdrawal(store, "ln-sft")
    assert first is not None and first["withdrawn_sessions"] == ["ln-ben"] and not first["retired"]

    # Cat withdraws under "retire": only the version that learned from Cat is retired, and the marks accumulate.
    mark_models_withdrawn(store, ["ln-cat"], retire=True)
    retired = model_withdrawal(store, "ln-dpo")
    assert retired is not None and retired["retired"] and retired["withdrawn_sessions"] == ["ln-ben", "ln-cat"]
    assert retired["withdrawn_ms"] == (model_withdrawal(store, "ln-dpo") or {})["withdrawn_ms"]
    with pytest.raises(FailedPrecondition, match="'ln-dpo' was retired: 2 of the sessions"):
        check_servable(store, "ln-dpo")
    check_servable(store, "ln-sft")
    # Marking again changes nothing and never un-retires.
    mark_models_withdrawn(store, ["ln-cat"], retire=False)
    assert (model_withdrawal(store, "ln-dpo") or {})["retired"]

    # What ListModels/GetModel return (``emili models lineage``).
    version = ModelVersion.from_manifest(child, model_withdrawal(store, "ln-dpo"))
    assert version.session_ids == ("ln-ann", "ln-ben", "ln-cat") and version.parent_versions == ("ln-sft",)
    assert version.withdrawn_session_ids == ("ln-ben", "ln-cat") and version.retired


def test_corpus_datasets_name_no_sessions(object_store: ObjectStore) -> None:
    corpus = publish_dataset(object_store, "dpo_empathetic", ["hit:0_conv:1", "hit:2_conv:4"])
    found = jobs.lineage(object_store, corpus, None)
    assert found["sessions"] == [] and found["datasets"][0]["kind"] == "dpo_empathetic"


def test_a_version_published_after_its_people_withdrew_is_marked(object_store: ObjectStore, tmp_path: Path) -> None:
    """A participant withdraws while runs train: the labeler marked the versions registered then, not those still
    training; the trainer's check after publishing marks each new version (and retires it under that policy),
    through any dataset of its lineage, its parent's included, and marks no other version."""
    store = object_store
    sft = publish_dataset(store, "sft", ["mid-ann", "mid-ben"])
    register(store, tmp_path, "mid-parent", sft, None)
    pairs = publish_dataset(store, "dpo_feedback", ["mid-cat"])
    # The labeler's withdrawal of mid-ann: the dataset built from it, then the versions registered at that moment.
    manifest_key = store.get_json(Bucket.DATASETS, dataset_index_key(sft))["manifest"]
    store.put_json(
        Bucket.DATASETS,
        dataset_withdrawal_key(manifest_key),
        {"withdrawn_sessions": ["mid-ann"], "withdrawn_ms": 1_790_000_000_000, "replacement": None},
    )
    mark_models_withdrawn(store, ["mid-ann"], retire=False)
    parent_mark = model_withdrawal(store, "mid-parent")
    assert parent_mark is not None

    # Published after the withdrawal: a DPO run from the parent (its own pairs are clean) and another SFT run.
    child = register(store, tmp_path, "mid-child", pairs, "mid-parent")
    again = register(store, tmp_path, "mid-sft", sft, None)
    assert model_withdrawal(store, "mid-child") is None and model_withdrawal(store, "mid-sft") is None
    marked = jobs.mark_withdrawn_while_training(store, "mid-child", child["lineage"], retire=True)
    assert [m["version"] for m in marked] == ["mid-child"] and model_withdrawal(store, "mid-sft") is None
    jobs.mark_withdrawn_while_training(store, "mid-sft", again["lineage"], retire=True)
    for version in ("mid-child", "mid-sft"):
        mark = model_withdrawal(store, version)
        assert mark is not None and mark["withdrawn_sessions"] == ["mid-ann"] and mark["retired"]
        with pytest.raises(FailedPrecondition):
            check_servable(store, version)
    assert model_withdrawal(store, "mid-parent") == parent_mark  # Not rewritten: nothing new for it.
    # Nothing withdrawn behind a version: nothing marked.
    clean = register(store, tmp_path, "mid-clean", publish_dataset(store, "sft", ["mid-dan"]), None)
    assert jobs.mark_withdrawn_while_training(store, "mid-clean", clean["lineage"], retire=True) == []
    assert model_withdrawal(store, "mid-clean") is None
    # Marking again with nothing new keeps the mark as it was (the loop replaces a version once per withdrawal).
    before = model_withdrawal(store, "mid-child")
    mark_models_withdrawn(store, ["mid-ann"], retire=True)
    assert model_withdrawal(store, "mid-child") == before
