"""What each pipeline step does, as plain functions of a service runtime and the pipeline state.

The step tasks (``chat.pipeline_*``, ``labeler.pipeline_*``, ``trainer.pipeline_*``) call these through
:func:`emili_pipeline.pipeline.run_step_task`; each returns the step's outputs (small JSON). Every one is
idempotent because what it calls is keyed by content: session records by their last event id, labels by
settings hash, datasets by content, training and evaluation runs by a digest of their inputs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from emili_core.errors import FailedPrecondition, InvalidInput, NotFound
from emili_core.keys import pipeline_prefix
from emili_core.objectstore import Bucket, ObjectStore
from emili_pipeline.pipeline import State, config_of, outputs

if TYPE_CHECKING:
    import redis

    from emili_chat.settings import ChatSettings
    from emili_labeler.jobs import Runtime as LabelerRuntime
    from emili_trainer.jobs import ProgressSink
    from emili_trainer.jobs import Runtime as TrainerRuntime

log = logging.getLogger(__name__)
WAIT_FOR_LOCK_S = 5.0  # Another copy of a run holds its lock (a dead worker's lock expires within its TTL).


# --- chat worker ----------------------------------------------------------------------------------------------


def persist_sessions(client: redis.Redis, store: ObjectStore, session_ids: Sequence[str]) -> dict[str, Any]:
    """Make sure every session has its record in object storage (``chat.persist_session`` is idempotent)."""
    from emili_chat.persist import persist_session

    written, reused, missing = 0, 0, []
    for session_id in session_ids:
        try:
            result = persist_session(client, store, session_id)
        except NotFound:
            missing.append(session_id)  # Never created, or expired from Redis: nothing to persist.
            continue
        reused += bool(result.get("reused"))
        written += not result.get("reused")
    return {"sessions": len(session_ids), "written": written, "reused": reused, "missing": missing}


def collect(client: redis.Redis, store: ObjectStore, state: State) -> dict[str, Any]:
    return persist_sessions(client, store, state["sessions"])


def _arm_sessions_key(state: State) -> str:
    return f"{pipeline_prefix(state['pipeline_id'])}arm_sessions.json"


def arm_sessions(settings: ChatSettings, client: redis.Redis, store: ObjectStore, state: State) -> dict[str, Any]:
    """Simulated users talk to each arm (base, SFT, SFT+DPO), for Tables 1 and 2. Their session ids are kept
    under the pipeline, so a step run again reuses them instead of simulating new users."""
    from emili_core.auth import create_token
    from emili_pipeline.simulator import load_personas, run_users, summarize

    key = _arm_sessions_key(state)
    if store.exists(Bucket.MODELS, key):
        kept = dict(store.get_json(Bucket.MODELS, key))
        kept["persisted"] = persist_sessions(client, store, [s for ids in kept["arms"].values() for s in ids])
        return {**kept, "reused": True}
    config = config_of(state)
    per_arm = config.evaluation.users_per_arm
    arms = model_arms(state)
    if per_arm == 0:
        return {"arms": {}, "skipped": "evaluation.users_per_arm is 0"}
    personas = load_personas(config.personas, config.persona_limit)
    secret = settings.auth.secret.get_secret_value()
    target = settings.grpc_target()
    result: dict[str, Any] = {"arms": {}, "summaries": {}}
    for i, (label, arm) in enumerate(arms.items()):
        simulator = config.simulator_settings().model_copy(
            update={"model_arm": arm, "subject_prefix": f"{label}-{state['pipeline_id'][3:11]}"}
        )

        def token_for(subject: str) -> str:
            return create_token(secret, subject, ["chat"], 3600, settings.auth.issuer)

        started = time.perf_counter()
        # The same seed for every arm: the same personas and users meet each model.
        outcomes = asyncio.run(
            run_users(
                per_arm,
                config.evaluation.concurrency,
                target,
                personas,
                simulator,
                config.seed + 1000,
                token_for=token_for,
            )
        )
        summary = summarize(outcomes, time.perf_counter() - started)
        ids = [o.session_id for o in outcomes if o.session_id]
        result["arms"][label] = ids
        result["summaries"][label] = {k: summary[k] for k in ("ok", "failed", "mean_valence_change", "mean_ratings")}
        log.info(
            "pipeline %s: %d simulated users talked to %s (%d of %d)",
            state["pipeline_id"],
            len(ids),
            arm,
            i + 1,
            len(arms),
        )
    result["versions"] = arms
    store.put_json(Bucket.MODELS, key, result)
    result["persisted"] = persist_sessions(client, store, [s for ids in result["arms"].values() for s in ids])
    return {**result, "reused": False}


def model_arms(state: State) -> dict[str, str]:
    """Label -> chat model arm of every model the pipeline has: base, and the SFT and DPO versions it trained."""
    arms = {"base": "base"}
    for step in ("sft", "dpo"):
        version = outputs(state, step).get("model_version")
        if version:
            arms[step] = str(version)
    return arms


# --- labeler worker -------------------------------------------------------------------------------------------


def label(runtime: LabelerRuntime, state: State) -> dict[str, Any]:
    from emili_labeler.jobs import label_session

    flagged = turns = labelled = 0
    failed: dict[str, str] = {}
    for session_id in state["sessions"]:
        try:
            result = label_session(runtime, session_id)
        except (InvalidInput, NotFound, ValueError) as exc:  # One bad record must not stop the rest.
            failed[session_id] = str(exc)
            continue
        labelled += 1
        turns += len(result["turns"])
        flagged += sum(1 for t in result["turns"] if t["flagged"])
    return {
        "labelled": labelled,
        "failed": failed,
        "assistant_turns": turns,
        "flagged_turns": flagged,
        "settings_hash": runtime.settings_hash,
    }


def _dataset_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "kind", "counts", "key")
    return {k: manifest[k] for k in keep if k in manifest}


def datasets(runtime: LabelerRuntime, state: State) -> dict[str, Any]:
    """The SFT dataset from the training share's flagged turns, and one DPO dataset (``dpo_source``): feedback
    pairs from the same sessions, or EmPO pairs from EmpatheticDialogues; what could not be built says why."""
    from emili_labeler.jobs import build_dpo_dataset, build_sft_dataset

    config = config_of(state)
    train = state["train_sessions"]
    result: dict[str, Any] = {"notes": []}
    try:
        result["sft"] = _dataset_summary(build_sft_dataset(runtime, train))
    except NotFound as exc:
        result["sft"] = None
        result["notes"].append(f"no SFT dataset: {exc}; DPO starts from the base model")
    ed_configured = runtime.settings.labeler.empathetic_dialogues is not None
    sources = {"feedback": ["feedback"], "empathetic": ["empathetic"], "auto": ["feedback", "empathetic"]}
    result["dpo"] = None
    for source in sources[config.dpo_source]:
        if source == "empathetic" and not ed_configured:
            result["notes"].append("no EmPO pairs: EMILI_LABELER__EMPATHETIC_DIALOGUES is not set")
            continue
        try:
            # EmPO pairs: one fresh rejected draw for each epoch the DPO recipe trains.
            epochs = _recipe(config.recipes.dpo)[0].train.epochs if source == "empathetic" else 1
            sessions = train if source == "feedback" else None
            manifest = build_dpo_dataset(runtime, source, sessions, seed=config.seed, epochs=epochs)
        except NotFound as exc:
            result["notes"].append(f"no {source} DPO pairs: {exc}")
            continue
        result["dpo"] = {**_dataset_summary(manifest), "source": source}
        break
    if result["dpo"] is None:
        result["notes"].append("DPO is skipped")
    return result


def delta_table(runtime: LabelerRuntime, state: State) -> dict[str, Any]:
    """Table 2 over the sessions of the arms (or, without them, the collected sessions)."""
    from emili_labeler.jobs import delta_table as table

    arms = outputs(state, "arm_sessions").get("arms") or {}
    sessions = [s for ids in arms.values() for s in ids] or state["sessions"]
    return {"table": table(runtime, sessions), "sessions": sessions}


# --- trainer worker -------------------------------------------------------------------------------------------


def _recipe(value: str) -> tuple[Any, str]:
    from emili_trainer.recipes import load_recipe, parse_recipe

    if "\n" in value:  # The text of a recipe file (config.resolve reads files so workers need no copy).
        recipe = parse_recipe(value, "pipeline config")
        return recipe, f"pipeline:{recipe.name}"
    return load_recipe(value), value


def _until_final(execute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    from emili_trainer.runs import FINAL_STATES

    while True:
        record = execute()
        if record["state"] in FINAL_STATES:
            return record
        log.info("%s", record.get("note") or f"run {record.get('run_id')} is {record['state']}; waiting")
        time.sleep(WAIT_FOR_LOCK_S)


def train(runtime: TrainerRuntime, state: State, kind: str, progress: Callable[[str], ProgressSink]) -> dict[str, Any]:
    """Start (or find) the content-keyed run and run or resume it here; ``progress(run_id)`` reports steps."""
    from emili_trainer.jobs import execute_run, start_training

    config = config_of(state)
    dataset = (outputs(state, "datasets").get(kind) or {}).get("id")
    if not dataset:
        return {"skipped": f"no {kind.upper()} dataset (see the datasets step's notes)"}
    recipe, source = _recipe(config.recipes.sft if kind == "sft" else config.recipes.dpo)
    if recipe.kind != kind:
        raise InvalidInput(f"the pipeline's {kind} recipe {recipe.name} is a {recipe.kind} recipe")
    init = outputs(state, "sft").get("model_version") if kind == "dpo" else None
    record, _ = start_training(runtime, recipe, dataset, init_version=init, recipe_source=source)
    run_id = record["run_id"]
    final = _until_final(lambda: execute_run(runtime, run_id, progress(run_id)))
    if final["state"] != "succeeded":
        raise FailedPrecondition(f"{kind} run {run_id} {final['state']}: {final.get('error') or ''}")
    metrics = final.get("metrics") or {}
    return {
        "run_id": run_id,
        "model_version": final["model_version"],
        "dataset_id": dataset,
        "init_version": init,
        "recipe": recipe.name,
        "attempts": final.get("attempts"),
        "resumed_from_step": final.get("resumed_from_step", 0),
        "metrics": {
            k: metrics.get(k) for k in ("train_loss", "steps", "examples", "tokens_per_second", "wall_seconds")
        },
    }


def evaluate(runtime: TrainerRuntime, state: State, progress: Callable[[str], ProgressSink]) -> dict[str, Any]:
    """Base vs SFT vs SFT+DPO on the held-out sessions' contexts, with Tables 1 and 2; the report is published
    under the evaluation run."""
    from emili_trainer.evaluation.job import execute_evaluation, report_prefix, start_evaluation

    config = config_of(state)
    versions = [v for label, v in model_arms(state).items() if label != "base"]
    arms = outputs(state, "arm_sessions").get("arms") or {}
    rated = [s for ids in arms.values() for s in ids] or state["sessions"]
    table = outputs(state, "delta_table").get("table")
    record, _ = start_evaluation(
        runtime,
        versions,
        max_examples=config.evaluation.max_examples,
        session_ids=state["heldout_sessions"] or state["sessions"],
        rating_session_ids=rated,
        delta_table=table,
    )
    run_id = record["run_id"]
    final = _until_final(lambda: execute_evaluation(runtime, run_id, table, progress(run_id)))
    if final["state"] != "succeeded":
        raise FailedPrecondition(f"evaluation {run_id} {final['state']}: {final.get('error') or ''}")
    return {
        "run_id": run_id,
        "report_prefix": report_prefix(run_id),
        "arms": model_arms(state),
        "metrics": final.get("metrics"),
    }


def describe(name: str, result: dict[str, Any]) -> str:
    """One line about a finished step's outputs, for the live status table."""
    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    if name == "collect":
        return f"{result['sessions']} sessions ({result['written']} written, {result['reused']} already stored)"
    if name == "label":
        return f"{result['labelled']} labelled, {result['flagged_turns']}/{result['assistant_turns']} turns flagged"
    if name == "datasets":
        parts = [
            f"{k} {v['id'][:12]} ({v.get('counts', {}).get('examples', '?')} examples)"
            for k, v in result.items()
            if isinstance(v, dict)
        ]
        return "; ".join(parts + result.get("notes", [])) or "none"
    if name in ("sft", "dpo"):
        m = result.get("metrics") or {}
        loss = m.get("train_loss")
        return (
            f"{result['model_version']}: {m.get('steps')} steps, loss {loss:.3f}" if loss else result["model_version"]
        )
    if name == "arm_sessions":
        return ", ".join(f"{arm}: {len(ids)}" for arm, ids in result.get("arms", {}).items()) or "none"
    if name == "delta_table":
        return f"{result['table']['sessions']} sessions, arms {', '.join(result['table']['arms'])}"
    if name == "evaluate":
        return f"report in {result['report_prefix']}"
    return json.dumps(result)[:100]
