"""Training runs as plain functions: start (idempotent, keyed by content), execute (resumable), cancel.

A run's id is a digest of what decides its result (kind, recipe, dataset version, the adapter it starts
from), so asking twice for the same training gives the same run, and a finished run is never trained again.
The registered model version of a successful run has the run's id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import torch

from emili_core.errors import FailedPrecondition, InvalidInput, NotFound
from emili_core.keys import adapter_prefix, model_registry_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.records import dataset_manifest, dataset_withdrawal
from emili_session.registry import (
    check_servable,
    download_adapter,
    lineage_sessions,
    mark_models_withdrawn,
    registered_model,
)
from emili_trainer import distributed
from emili_trainer.recipes import Recipe
from emili_trainer.runs import RunLocked, RunRecord, RunState, RunStore
from emili_trainer.settings import TrainerSettings
from emili_trainer.training import (
    OnSave,
    Progress,
    ProgressReporter,
    TrainResult,
    load_base_model,
    train_dpo,
    train_sft,
)

log = logging.getLogger(__name__)

# Which dataset kinds (labeler manifests) each recipe kind trains on.
DATASET_KINDS = {"sft": ("sft",), "dpo": ("dpo_feedback", "dpo_empathetic")}
ProgressSink = Callable[[Progress], None]


@dataclass
class Runtime:
    settings: TrainerSettings
    store: ObjectStore
    runs: RunStore

    @property
    def artifacts_dir(self) -> Path:
        return self.settings.artifacts_dir


def build_runtime(settings: TrainerSettings) -> Runtime:
    store = ObjectStore(settings.s3)
    store.ensure_buckets()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
    return Runtime(settings, store, RunStore(client, store, settings.trainer.lock_ttl_seconds))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- datasets and models in object storage ------------------------------------------------------------------


def dataset_records(store: ObjectStore, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = store.get_file(Bucket.DATASETS, manifest["key"], Path(tmp) / "data.jsonl")
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def publish_model(store: ObjectStore, version: str, adapter_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Register a model version: its adapter files first, then the manifest that makes it visible."""
    key = model_registry_key(version)
    if store.exists(Bucket.MODELS, key):  # A redelivered run that already published.
        return dict(store.get_json(Bucket.MODELS, key))
    prefix = adapter_prefix(version)
    files = store.put_folder(Bucket.MODELS, prefix, adapter_dir)
    full = {**manifest, "version": version, "adapter_prefix": prefix, "files": [f[len(prefix) :] for f in files]}
    store.put_json(Bucket.MODELS, key, full)
    return full


# --- starting and cancelling --------------------------------------------------------------------------------


def start_training(
    runtime: Runtime, recipe: Recipe, dataset_id: str, init_version: str | None = None, recipe_source: str = ""
) -> tuple[RunRecord, bool]:
    """Create (or find) the run; returns its record and whether a job must be enqueued for it."""
    manifest = dataset_manifest(runtime.store, dataset_id)
    check_not_withdrawn(runtime.store, dataset_id)
    if manifest["kind"] not in DATASET_KINDS[recipe.kind]:
        raise InvalidInput(
            f"recipe {recipe.name} is {recipe.kind} and trains on {', '.join(DATASET_KINDS[recipe.kind])} "
            f"datasets; {dataset_id} is a {manifest['kind']} dataset"
        )
    if init_version is not None:
        if recipe.kind != "dpo":
            raise InvalidInput("only a dpo recipe can start from a trained adapter (init_version)")
        registered_model(runtime.store, init_version)
        check_servable(runtime.store, init_version)  # A retired version is not built on.
    key = {"kind": recipe.kind, "recipe": recipe.digest, "dataset": dataset_id, "init_version": init_version}
    record = RunRecord(
        run_id=f"{recipe.kind}-{_digest(key)[:16]}",
        kind=recipe.kind,
        recipe=recipe.to_dict(),
        recipe_source=recipe_source or recipe.name,
        dataset_id=dataset_id,
        dataset_kind=manifest["kind"],
        init_version=init_version,
    )
    return create_or_requeue(runtime, record)


def lineage(store: ObjectStore, dataset_id: str | None, init_version: str | None) -> dict[str, Any]:
    """What a new version learns from: its dataset and the recorded sessions behind it, plus everything the
    version it starts from learned from. Corpus datasets (EmpatheticDialogues) name their corpus, not sessions."""
    datasets: list[dict[str, Any]] = []
    sessions: set[str] = set()
    if dataset_id:
        manifest = dataset_manifest(store, dataset_id)
        kind = str(manifest.get("kind", ""))
        datasets.append({"id": dataset_id, "kind": kind, "created_by": "labeler"})
        if "empathetic" not in kind:
            sessions.update(str(s) for s in manifest.get("source_sessions", []))
    parents: list[str] = []
    if init_version:
        parent = registered_model(store, init_version)
        inherited = parent.get("lineage") or {}
        datasets.extend(inherited.get("datasets", []))
        sessions |= lineage_sessions(parent)
        parents = [init_version, *inherited.get("parents", [])]
    return {"datasets": datasets, "sessions": sorted(sessions), "parents": parents}


def check_not_withdrawn(store: ObjectStore, dataset_id: str) -> None:
    """Refuse a dataset some of whose sessions were withdrawn by the people in them (``labeler.forget_sessions``
    marks it); the error names the dataset rebuilt without them, when there is one."""
    withdrawal = dataset_withdrawal(store, dataset_id)
    if withdrawal is None:
        return
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(int(withdrawal.get("withdrawn_ms", 0)) / 1000))
    sessions = len(withdrawal.get("withdrawn_sessions", []))
    replacement = withdrawal.get("replacement")
    instead = (
        f"train on {replacement}, the same data without them"
        if replacement
        else "rebuild the dataset with the labeler (it could not be rebuilt without them automatically)"
    )
    raise FailedPrecondition(
        f"dataset {dataset_id} was withdrawn on {when}: {sessions} of its sessions were deleted at their owners' "
        f"request, so it is no longer trained on; {instead}"
    )


def mark_withdrawn_while_training(
    store: ObjectStore, version: str, lineage: dict[str, Any], *, retire: bool
) -> list[dict[str, Any]]:
    """Marks ``version``, just published, if people it learned from withdrew while it trained. The labeler marks the
    versions registered when it withdraws, so a run still training escapes it. It marks every dataset built from
    the withdrawn sessions before it lists the versions, so reading the marks of every dataset in the lineage (the
    parents' too) after publishing, one of the two always sees the other. Idempotent; marks no other version."""
    withdrawn: set[str] = set()
    for dataset in lineage.get("datasets", []):
        with contextlib.suppress(NotFound):  # Removed since: the lineage, not its record, is what counts.
            if marked := dataset_withdrawal(store, str(dataset["id"])):
                withdrawn |= {str(s) for s in marked.get("withdrawn_sessions", [])}
    if not withdrawn:
        return []
    return mark_models_withdrawn(store, withdrawn, retire=retire, versions=[version])


def create_or_requeue(runtime: Runtime, record: RunRecord) -> tuple[RunRecord, bool]:
    """The run's record, and whether a job must be enqueued: yes for a new run or one that failed or was
    cancelled (asking again retries it); no for one queued, running or done (asking again changes nothing)."""
    run_id = record.run_id
    if runtime.runs.create(record):
        return runtime.runs.get(run_id), True
    existing = runtime.runs.get(run_id)
    if existing.state in (RunState.FAILED, RunState.CANCELLED):
        runtime.runs.clear_cancel(run_id)
        runtime.runs.update(run_id, state=RunState.QUEUED, error=None)
        runtime.runs.mirror(run_id)
        return runtime.runs.get(run_id), True
    if not existing.final and runtime.runs.cancel_requested(run_id):
        # Asked for again before a cancel took effect (a pipeline resumed soon after it was cancelled): it goes on.
        runtime.runs.clear_cancel(run_id)
    return existing, False


def cancel_run(runtime: Runtime, run_id: str) -> RunRecord:
    record = runtime.runs.get(run_id)
    if record.final:
        raise FailedPrecondition(f"run {run_id} is already {record.state}")
    runtime.runs.request_cancel(run_id)
    if runtime.runs.lock_holder(run_id) is None and record.state == RunState.QUEUED:
        runtime.runs.update(run_id, state=RunState.CANCELLED)  # Its queued job will see this and stop.
        runtime.runs.mirror(run_id)
    return runtime.runs.get(run_id)


# --- executing ----------------------------------------------------------------------------------------------


def execute_run(runtime: Runtime, run_id: str, progress: ProgressSink = lambda p: None) -> RunRecord:
    """Run (or resume) a training run to its end; safe to call again for the same run at any time."""
    record = runtime.runs.get(run_id)
    if record.final:
        return record
    try:
        with runtime.runs.lock(run_id):
            return _execute_locked(runtime, run_id, progress)
    except RunLocked as exc:
        log.info("%s; this copy of the job does nothing", exc)
        return runtime.runs.get(run_id).with_note(str(exc))


def record_cancelled(runs: RunStore, run_id: str, **changes: Any) -> RunRecord:
    """Record a run (training or evaluation) as cancelled, as its cancel asked, and return its record."""
    runs.update(run_id, state=RunState.CANCELLED, **changes)
    runs.mirror(run_id)
    return runs.get(run_id)


def _execute_locked(runtime: Runtime, run_id: str, progress: ProgressSink) -> RunRecord:
    runs = runtime.runs
    record = runs.get(run_id)  # Again, under the lock: another copy may have finished meanwhile.
    if record.final:
        return record
    if runs.cancel_requested(run_id):
        return record_cancelled(runs, run_id)
    work_dir = runtime.settings.trainer.work_dir / run_id
    shutil.rmtree(work_dir, ignore_errors=True)  # Local leftovers of a dead worker are not trusted.
    work_dir.mkdir(parents=True)
    restored = runs.restore_checkpoint(run_id, work_dir)
    runs.update(
        run_id,
        state=RunState.RUNNING,
        attempts=record.attempts + 1,
        resumed_from_step=restored[1] if restored else 0,
        error=None,
    )
    runs.mirror(run_id)
    try:
        result = _train(runtime, run_id, record, work_dir, restored[0] if restored else None, progress)
    except (InvalidInput, FailedPrecondition, NotFound) as exc:
        # Retrying cannot help: the run fails with a message a person can act on.
        runs.update(run_id, state=RunState.FAILED, error=str(exc))
        runs.mirror(run_id)
        raise
    if result.cancelled:
        return record_cancelled(runs, run_id, step=result.steps)
    metrics = {
        "train_loss": result.train_loss,
        "steps": result.steps,
        "examples": result.examples,
        "tokens_seen": result.tokens_seen,
        "tokens_per_second": result.tokens_per_second,
        "wall_seconds": result.wall_seconds,
        **result.details,
    }
    recipe = dict(record.recipe or {})
    model = publish_model(
        runtime.store,
        run_id,
        result.adapter_dir,
        {
            "kind": record.kind,
            "run_id": run_id,
            "base_model": recipe["model"]["path"],
            "recipe": recipe,
            "dataset_id": record.dataset_id,
            "dataset_kind": record.dataset_kind,
            "init_version": record.init_version,
            "metrics": metrics,
            "lineage": lineage(runtime.store, record.dataset_id, record.init_version),
        },
    )
    marks = mark_withdrawn_while_training(
        runtime.store,
        str(model["version"]),
        dict(model.get("lineage") or {}),
        retire=runtime.settings.retention.withdrawn_models == "retire",
    )
    if marks:
        log.warning(
            "run %s: people withdrew while it trained; %s marked as learned from withdrawn data",
            run_id,
            model["version"],
        )
    runs.update(run_id, state=RunState.SUCCEEDED, model_version=model["version"], metrics=metrics)
    runs.mirror(run_id)
    shutil.rmtree(work_dir, ignore_errors=True)
    return runs.get(run_id)


def _train(
    runtime: Runtime,
    run_id: str,
    record: RunRecord,
    work_dir: Path,
    resume_from: Path | None,
    progress: ProgressSink,
) -> TrainResult:
    if record.recipe is None or record.dataset_id is None:
        raise FailedPrecondition(f"run {run_id} is a {record.kind} run, not a training run")
    recipe = Recipe(**record.recipe)
    check_not_withdrawn(runtime.store, record.dataset_id)  # A run queued before its dataset was withdrawn.
    records = dataset_records(runtime.store, dataset_manifest(runtime.store, record.dataset_id))

    def report(p: Progress) -> None:
        if p.loss is not None:
            log.info(
                "run %s: step %d/%d loss %.4f lr %.2e %.0f tokens/s",
                run_id,
                p.step,
                p.total_steps,
                p.loss,
                p.learning_rate or 0.0,
                p.tokens_per_second or 0.0,
            )
        runtime.runs.update(run_id, **{k: v for k, v in p.to_dict().items() if k != "total_steps"}, total=p.total_steps)
        progress(p)

    def checkpoint(folder: Path, step: int) -> None:
        runtime.runs.save_checkpoint(run_id, folder, step)

    callbacks = [ProgressReporter(report), OnSave(checkpoint)]

    def cancelled() -> bool:
        return runtime.runs.cancel_requested(run_id)

    init = record.init_version
    init_dir = download_adapter(runtime.store, init, work_dir / "init-adapter") if init else None
    options = runtime.settings.trainer
    processes = options.launch_processes or (torch.cuda.device_count() if torch.cuda.device_count() > 1 else 0)
    if processes:
        return distributed.launch(
            recipe,
            records,
            work_dir,
            num_processes=processes,
            artifacts_dir=runtime.artifacts_dir,
            cache_root=options.model_cache_dir,
            resume_from=resume_from,
            init_adapter=init_dir,
            progress=report,
            on_checkpoint=checkpoint,
            should_stop=cancelled,
            cpu=not torch.cuda.is_available(),
        )
    tokenizer, model = load_base_model(recipe, runtime.artifacts_dir, options.model_cache_dir)
    if recipe.kind == "sft":
        return train_sft(
            recipe,
            tokenizer,
            model,
            records,
            work_dir,
            resume_from=resume_from,
            callbacks=callbacks,
            should_stop=cancelled,
        )
    return train_dpo(
        recipe,
        tokenizer,
        model,
        records,
        work_dir,
        init_adapter=init_dir,
        resume_from=resume_from,
        callbacks=callbacks,
        should_stop=cancelled,
    )
