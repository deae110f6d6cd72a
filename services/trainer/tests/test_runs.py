"""Runs against real Redis and S3 servers and a real trainer worker: the lock, checkpoints, resume after
SIGKILL, cancellation, the model registry, and the chat service loading the adapter it registered."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from emili_core.errors import FailedPrecondition, InvalidInput, NotFound
from emili_core.keys import dataset_index_key, model_registry_key, run_prefix
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.tasks import create_celery_app
from emili_labeler.datasets import DatasetManifest, jsonl_bytes
from emili_session.registry import registered_model
from emili_testing.plugin import EntryPointProcess, Stack, free_port
from emili_trainer import jobs
from emili_trainer.recipes import Recipe, parse_recipe
from emili_trainer.runs import RunLocked, RunState
from emili_trainer.settings import TrainerSettings

pytestmark = pytest.mark.integration
LOCK_TTL = 2.0


def publish_dataset(store: ObjectStore, kind: str, records: list[dict[str, Any]]) -> str:
    """A dataset version laid out as the labeler publishes one."""
    manifest = DatasetManifest.build(kind, records, {"source": "test"}).to_dict()  # type: ignore[arg-type]
    prefix = f"{kind}/{manifest['id']}"
    store.put_bytes(Bucket.DATASETS, f"{prefix}/data.jsonl", jsonl_bytes(records))
    store.put_json(Bucket.DATASETS, f"{prefix}/manifest.json", {**manifest, "key": f"{prefix}/data.jsonl"})
    store.put_json(Bucket.DATASETS, dataset_index_key(manifest["id"]), {"manifest": f"{prefix}/manifest.json"})
    return str(manifest["id"])


@pytest.fixture
def runtime(stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> jobs.Runtime:
    monkeypatch.setenv("EMILI_TRAINER__WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("EMILI_TRAINER__LOCK_TTL_SECONDS", str(LOCK_TTL))
    return jobs.build_runtime(TrainerSettings())


@pytest.fixture
def sft_dataset(runtime: jobs.Runtime, conversation: list[dict[str, Any]]) -> str:
    records = [{"id": f"s{i}", "session_id": f"s{i}", "messages": conversation} for i in range(8)]
    return publish_dataset(runtime.store, "sft", records)


def _recipe(make_recipe: Callable[..., Recipe], name: str, **train: int) -> Recipe:
    return make_recipe(name, **train)


# --- the lock, checkpoints, cancellation --------------------------------------------------------------------


def test_the_lock_admits_one_holder_and_expires_with_it(runtime: jobs.Runtime) -> None:
    runs = runtime.runs
    with runs.lock("lock-test"):
        with pytest.raises(RunLocked), runs.lock("lock-test"):
            pass
        time.sleep(LOCK_TTL * 1.5)  # The heartbeat keeps a live holder's lock.
        assert runs.lock_holder("lock-test") is not None
    with runs.lock("lock-test"):  # Released on exit.
        pass
    # A holder that dies stops renewing: its lock lapses after the TTL.
    runs.redis.set("emili:trainer:lock:dead-holder", "gone", px=int(LOCK_TTL * 1000))
    with pytest.raises(RunLocked), runs.lock("dead-holder"):
        pass
    time.sleep(LOCK_TTL + 0.5)
    with runs.lock("dead-holder"):
        pass


def test_checkpoints_round_trip_and_only_the_last_is_kept(runtime: jobs.Runtime, tmp_path: Path) -> None:
    runs = runtime.runs
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        (folder / "sub").mkdir(parents=True)
        (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        (folder / "sub" / "weights.bin").write_bytes(bytes([step]) * 10)
        runs.save_checkpoint("ckpt-test", folder, step)
    restored = runs.restore_checkpoint("ckpt-test", tmp_path / "restored")
    assert restored is not None
    folder, step = restored
    assert step == 4 and (folder / "sub" / "weights.bin").read_bytes() == bytes([4]) * 10
    keys = runtime.store.list_keys(Bucket.MODELS, f"{run_prefix('ckpt-test')}/checkpoints/")
    assert keys and all("/00000004/" in k for k in keys)
    assert runs.restore_checkpoint("no-such-run", tmp_path / "none") is None


def test_start_training_checks_its_inputs(
    runtime: jobs.Runtime, sft_dataset: str, make_recipe: Callable[..., Recipe]
) -> None:
    with pytest.raises(NotFound, match="build it with the labeler"):
        jobs.start_training(runtime, make_recipe("smollm2-cpu-sft"), "f" * 64)
    with pytest.raises(InvalidInput, match="dpo_feedback"):
        jobs.start_training(runtime, make_recipe("smollm2-cpu-dpo"), sft_dataset)
    with pytest.raises(InvalidInput, match="only a dpo recipe"):
        jobs.start_training(runtime, make_recipe("smollm2-cpu-sft"), sft_dataset, init_version="x")
    first, enqueue = jobs.start_training(runtime, make_recipe("smollm2-cpu-sft", seed=7), sft_dataset)
    again, enqueue_again = jobs.start_training(runtime, make_recipe("smollm2-cpu-sft", seed=7), sft_dataset)
    assert enqueue and not enqueue_again and first.run_id == again.run_id  # Same content, same run.


def test_cancel_a_queued_run(runtime: jobs.Runtime, sft_dataset: str, make_recipe: Callable[..., Recipe]) -> None:
    record, _ = jobs.start_training(runtime, make_recipe("smollm2-cpu-sft", seed=11), sft_dataset)
    assert jobs.cancel_run(runtime, record.run_id).state == RunState.CANCELLED
    assert jobs.execute_run(runtime, record.run_id).state == RunState.CANCELLED  # Its queued job does nothing.
    with pytest.raises(FailedPrecondition, match="already cancelled"):
        jobs.cancel_run(runtime, record.run_id)
    again, enqueue = jobs.start_training(runtime, make_recipe("smollm2-cpu-sft", seed=11), sft_dataset)
    assert enqueue and again.state == RunState.QUEUED  # Asking again retries a cancelled run.


# --- a real worker: resume after SIGKILL ---------------------------------------------------------------------


@pytest.fixture
def worker_env(stack: Stack, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        **stack.env(),
        "EMILI_TRAINER__WORK_DIR": str(tmp_path / "worker-work"),
        "EMILI_TRAINER__LOCK_TTL_SECONDS": str(LOCK_TTL),
        "EMILI_TRAINER__WORKER__METRICS_PORT": str(free_port()),
        "EMILI_TRAINER__TORCH_THREADS": "1",
    }


@pytest.fixture
def workers() -> Iterator[list[EntryPointProcess]]:
    started: list[EntryPointProcess] = []
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture
def runs_to_cancel(runtime: jobs.Runtime) -> Iterator[list[str]]:
    """Runs cancelled when the test ends unfinished (a timeout, a failed assertion): their jobs, redelivered from the
    shared broker to a later test's trainer worker, then do nothing instead of training and registering a model."""
    run_ids: list[str] = []
    yield run_ids
    for run_id in run_ids:
        with contextlib.suppress(FailedPrecondition, NotFound):
            if not runtime.runs.get(run_id).final:
                jobs.cancel_run(runtime, run_id)


def _wait(condition: Callable[[], bool], what: str, worker: EntryPointProcess, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return
        assert worker.alive(), f"the worker died: {worker.tail()}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {worker.tail()}")


@pytest.mark.slow
def test_a_killed_worker_resumes_from_its_checkpoint_and_the_chat_serves_the_result(
    runtime: jobs.Runtime,
    sft_dataset: str,
    make_recipe: Callable[..., Recipe],
    worker_env: dict[str, str],
    workers: list[EntryPointProcess],
    runs_to_cancel: list[str],
    tiny_dir: Path,
    tmp_path: Path,
) -> None:
    recipe = make_recipe("smollm2-cpu-sft", max_steps=60, save_steps=4, seed=3)
    record, _ = jobs.start_training(runtime, parse_recipe(yaml.safe_dump(recipe.to_dict())), sft_dataset)
    run_id = record.run_id
    runs_to_cancel.append(run_id)
    create_celery_app("tests", runtime.settings).send_task("trainer.train", args=[run_id])
    first = EntryPointProcess("emili-trainer-worker", worker_env, tmp_path / "worker-1.log")
    workers.append(first)
    marker = f"{run_prefix(run_id)}/checkpoint.json"
    _wait(lambda: runtime.store.exists(Bucket.MODELS, marker), "the first checkpoint in S3", first)
    first.kill()
    killed_at = runtime.runs.get(run_id)
    assert killed_at.state == RunState.RUNNING and killed_at.step < 60

    second = EntryPointProcess("emili-trainer-worker", worker_env, tmp_path / "worker-2.log")
    workers.append(second)
    _wait(lambda: runtime.runs.get(run_id).final, "the resumed run", second)
    done = runtime.runs.get(run_id)
    assert done.state == RunState.SUCCEEDED, done
    assert done.attempts == 2 and done.resumed_from_step >= 4  # Never from zero.
    assert done.metrics is not None and done.metrics["steps"] == 60
    registered = runtime.store.list_keys(Bucket.MODELS, "registry/")
    assert [k for k in registered if run_id in k] == [model_registry_key(run_id)]  # Registered once.
    manifest = registered_model(runtime.store, run_id)
    assert manifest["dataset_id"] == sft_dataset and manifest["recipe"]["train"]["max_steps"] == 60
    assert "adapter_model.safetensors" in manifest["files"] and "tokenizer_config.json" in manifest["files"]
    assert jobs.execute_run(runtime, run_id).state == RunState.SUCCEEDED  # A late duplicate changes nothing.

    # The chat service serves the registered version by id, as a model arm.
    from emili_chat.adapters import AdapterRegistry
    from emili_chat.llm import GenerationParams, LocalHFBackend, Message

    async def chat_with_arm() -> str:
        backend = LocalHFBackend(tiny_dir)
        await backend.load()
        registry = AdapterRegistry(backend, runtime.store, tmp_path / "adapters")
        arm = await registry.resolve(run_id)
        assert arm == run_id and run_id in backend.adapters()
        params = GenerationParams(temperature=0.0, max_new_tokens=5)
        chunks = [c async for c in backend.stream([Message("user", "hello")], params, adapter=arm)]
        await backend.aclose()
        return "".join(chunks)

    assert isinstance(asyncio.run(chat_with_arm()), str)
