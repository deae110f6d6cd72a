"""The trainer's request side, free of any transport: typed requests in, run records and models out.

The gRPC servicer decodes with :mod:`emili_trainer.codec` and calls this class. Runs themselves execute in the
Celery worker (:mod:`emili_trainer.jobs`, :mod:`emili_trainer.evaluation.job`); this class starts them (creating
the content-keyed record and enqueueing a job when one is needed), reads, watches and cancels them, and reads
the model registry, reports and shipped recipes. Storage calls block, so they run on threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from emili_core.errors import FailedPrecondition, InvalidInput
from emili_core.objectstore import ObjectStore
from emili_session.loop_records import gate_verdict
from emili_session.registry import list_models, model_withdrawal, registered_model
from emili_trainer import jobs
from emili_trainer.evaluation import job as evaluation
from emili_trainer.evaluation.job import Report
from emili_trainer.recipes import Recipe, load_recipe, parse_recipe, shipped_recipe_text
from emili_trainer.runs import RunRecord

Enqueue = Callable[[str, str], None]  # (task name, run id)


@dataclass(frozen=True)
class TrainingRequest:
    recipe: str = ""  # A shipped recipe's name; or empty, and recipe_yaml holds the whole recipe.
    recipe_yaml: str = ""
    dataset_id: str = ""  # A labeler dataset version: sft for SFT recipes, dpo_* for DPO recipes.
    init_version: str | None = None  # DPO only: continue from this registered model version.


@dataclass(frozen=True)
class EvaluationRequest:
    model_versions: tuple[str, ...] = ()  # "base" is always compared too.
    max_examples: int | None = None  # Per source of contexts; None: the default.
    session_ids: tuple[str, ...] = ()  # Held-out sessions whose contexts are replied to.
    rating_session_ids: tuple[str, ...] | None = None  # Table 1's sessions; None: every recorded session.
    delta_table: dict[str, Any] | None = None  # The labeler's Table 2, when the caller has it.


@dataclass(frozen=True)
class Started:
    run: RunRecord
    enqueued: bool  # False when the same run already existed (queued, running or done): nothing new started.


@dataclass(frozen=True)
class ModelVersion:
    """A registered model version (``emili-models/registry/<version>.json``)."""

    version: str
    kind: str
    base_model: str
    dataset_id: str
    init_version: str | None
    metrics: Mapping[str, Any] | None
    adapter_prefix: str
    dataset_ids: tuple[str, ...] = ()  # Lineage: every dataset it learned from, its parents' included.
    session_ids: tuple[str, ...] = ()
    parent_versions: tuple[str, ...] = ()
    withdrawn_session_ids: tuple[str, ...] = ()  # From its withdrawal mark, when people it learned from withdrew.
    retired: bool = False
    gate_verdict: Mapping[str, Any] | None = None  # The loop's evaluation gate's verdict on it, when it judged it.

    @classmethod
    def from_manifest(
        cls,
        manifest: Mapping[str, Any],
        withdrawal: Mapping[str, Any] | None = None,
        gate_verdict: Mapping[str, Any] | None = None,
    ) -> ModelVersion:
        lineage = manifest.get("lineage") or {}
        withdrawal = withdrawal or {}
        return cls(
            version=manifest["version"],
            kind=manifest.get("kind", ""),
            base_model=manifest.get("base_model", ""),
            dataset_id=manifest.get("dataset_id", ""),
            init_version=manifest.get("init_version") or None,
            metrics=manifest.get("metrics", {}),
            adapter_prefix=manifest["adapter_prefix"],
            dataset_ids=tuple(str(d["id"]) for d in lineage.get("datasets", [])),
            session_ids=tuple(lineage.get("sessions", [])),
            parent_versions=tuple(lineage.get("parents", [])),
            withdrawn_session_ids=tuple(withdrawal.get("withdrawn_sessions", [])),
            retired=bool(withdrawal.get("retired")),
            gate_verdict=gate_verdict,
        )


def _model_version(store: ObjectStore, manifest: Mapping[str, Any]) -> ModelVersion:
    """A registry entry with what was decided about it since: its withdrawal mark and the gate's verdict."""
    version = str(manifest["version"])
    try:
        verdict = gate_verdict(store, version)
    except FailedPrecondition as exc:  # One unreadable record must not hide every version.
        verdict = {"passed": False, "checks": [], "unreadable": str(exc)}
    return ModelVersion.from_manifest(manifest, model_withdrawal(store, version), verdict)


@dataclass(frozen=True)
class ShippedRecipe:
    name: str
    text: str  # The YAML as shipped: what TrainingRequest.recipe_yaml accepts.
    recipe: Recipe


class TrainerEngine:
    """``runtime`` gives the connected runtime, or raises NotReady while it connects; ``enqueue`` sends a task
    for a run; WatchRun polls the record every ``poll_seconds``."""

    def __init__(self, runtime: Callable[[], jobs.Runtime], enqueue: Enqueue, poll_seconds: float = 1.0) -> None:
        self._runtime = runtime
        self._enqueue = enqueue
        self.poll_seconds = poll_seconds

    @property
    def runtime(self) -> jobs.Runtime:
        return self._runtime()

    async def start_training(self, request: TrainingRequest) -> Started:
        if bool(request.recipe) == bool(request.recipe_yaml):
            raise InvalidInput("give exactly one of recipe (a shipped recipe's name) and recipe_yaml")
        if not request.dataset_id:
            raise InvalidInput("dataset_id is required: a dataset version built by the labeler")
        recipe = load_recipe(request.recipe) if request.recipe else parse_recipe(request.recipe_yaml, "recipe_yaml")
        record, enqueue = await asyncio.to_thread(
            jobs.start_training,
            self.runtime,
            recipe,
            request.dataset_id,
            request.init_version,
            request.recipe or "recipe_yaml",
        )
        if enqueue:
            self._enqueue("trainer.train", record.run_id)
        return Started(record, enqueue)

    async def start_evaluation(self, request: EvaluationRequest) -> Started:
        record, enqueue = await asyncio.to_thread(
            evaluation.start_evaluation,
            self.runtime,
            list(request.model_versions),
            max_examples=request.max_examples,
            session_ids=list(request.session_ids),
            rating_session_ids=None if request.rating_session_ids is None else list(request.rating_session_ids),
            delta_table=request.delta_table,
        )
        if enqueue:
            self._enqueue("trainer.evaluate", record.run_id)
        return Started(record, enqueue)

    async def get_run(self, run_id: str) -> RunRecord:
        return await asyncio.to_thread(self.runtime.runs.get, run_id)

    async def watch_run(self, run_id: str) -> AsyncIterator[RunRecord]:
        """The record now and at each change, until the run is final."""
        last: RunRecord | None = None
        while True:
            record = await self.get_run(run_id)
            if record != last:
                yield record
                last = record
            if record.final:
                return
            await asyncio.sleep(self.poll_seconds)

    async def cancel_run(self, run_id: str) -> RunRecord:
        return await asyncio.to_thread(jobs.cancel_run, self.runtime, run_id)

    async def list_models(self) -> list[ModelVersion]:
        return await asyncio.to_thread(self._models)

    def _models(self) -> list[ModelVersion]:
        store = self.runtime.store
        return [_model_version(store, m) for m in list_models(store)]

    async def get_model(self, version: str) -> ModelVersion:
        if not version:
            raise InvalidInput("version is required: a registered model version (see `emili models list`)")
        store = self.runtime.store
        manifest = await asyncio.to_thread(registered_model, store, version)
        return await asyncio.to_thread(_model_version, store, manifest)

    async def get_report(self, run_id: str) -> Report:
        return await asyncio.to_thread(evaluation.load_report, self.runtime, run_id)

    async def unmeasurable_gate_metrics(self) -> dict[str, str]:
        from emili_trainer.evaluation.scorers import unmeasurable_gate_metrics

        settings = self.runtime.settings
        return await asyncio.to_thread(unmeasurable_gate_metrics, settings.trainer, settings.artifacts_dir)

    async def get_recipe(self, name: str) -> ShippedRecipe:
        if not name:
            raise InvalidInput("name is required: a shipped recipe's name (e.g. smollm2-cpu-dpo)")
        text = shipped_recipe_text(name)
        return ShippedRecipe(name, text, parse_recipe(text, name))
