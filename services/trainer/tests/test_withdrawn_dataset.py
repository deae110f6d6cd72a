"""The trainer refuses a dataset the labeler marked withdrawn (people in it withdrew), naming its replacement."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emili_core.errors import FailedPrecondition
from emili_core.keys import dataset_index_key, dataset_withdrawal_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_labeler.datasets import DatasetManifest, jsonl_bytes
from emili_trainer import jobs
from emili_trainer.recipes import Recipe
from emili_trainer.runs import RunState
from emili_trainer.settings import TrainerSettings

pytestmark = pytest.mark.integration


def publish(store: ObjectStore, records: list[dict[str, Any]]) -> tuple[str, str]:
    manifest = DatasetManifest.build("sft", records, {"source": "test"}).to_dict()
    prefix = f"sft/{manifest['id']}"
    store.put_bytes(Bucket.DATASETS, f"{prefix}/data.jsonl", jsonl_bytes(records))
    store.put_json(Bucket.DATASETS, f"{prefix}/manifest.json", {**manifest, "key": f"{prefix}/data.jsonl"})
    store.put_json(Bucket.DATASETS, dataset_index_key(manifest["id"]), {"manifest": f"{prefix}/manifest.json"})
    return str(manifest["id"]), f"{prefix}/manifest.json"


@pytest.fixture
def runtime(stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> jobs.Runtime:
    monkeypatch.setenv("EMILI_TRAINER__WORK_DIR", str(tmp_path / "work"))
    return jobs.build_runtime(TrainerSettings())


def test_a_withdrawn_dataset_is_not_trained_on(
    runtime: jobs.Runtime, conversation: list[dict[str, Any]], make_recipe: Callable[..., Recipe]
) -> None:
    records = [{"id": f"w{i}", "session_id": f"wd-{i}", "messages": conversation} for i in range(4)]
    dataset, manifest_key = publish(runtime.store, records)
    queued, enqueue = jobs.start_training(runtime, make_recipe("smollm2-cpu-sft", seed=21), dataset)
    assert enqueue and queued.state == RunState.QUEUED

    # The labeler withdraws it (wd-0's owner withdrew) after that run was queued.
    withdrawal = {"withdrawn_sessions": ["wd-0"], "withdrawn_ms": 1_790_000_000_000, "replacement": "f" * 64}
    runtime.store.put_json(Bucket.DATASETS, dataset_withdrawal_key(manifest_key), withdrawal)
    with pytest.raises(FailedPrecondition, match=f"dataset {dataset} was withdrawn.*train on f{{64}}"):
        jobs.start_training(runtime, make_recipe("smollm2-cpu-sft", seed=22), dataset)
    # The run queued before the withdrawal fails when its job starts, with the same reason.
    with pytest.raises(FailedPrecondition, match="withdrawn"):
        jobs.execute_run(runtime, queued.run_id)
    failed = runtime.runs.get(queued.run_id)
    assert failed.state == RunState.FAILED and "withdrawn" in (failed.error or "")
