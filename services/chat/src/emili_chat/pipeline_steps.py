"""The pipeline steps the chat worker runs (``chat.pipeline_collect``, ``chat.pipeline_arm_sessions``).

Each is a plain function of this service's runtime and the pipeline state returning the step's outputs (small
JSON); :mod:`emili_chat.tasks` runs them through :func:`emili_pipeline.pipeline.run_step_task`. Both are
idempotent: session records are keyed by their last event id, and the arms' session ids are kept under the
pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis

from emili_chat.persist import persist_session
from emili_chat.settings import ChatSettings
from emili_core.auth import create_token
from emili_core.errors import NotFound
from emili_core.keys import pipeline_arm_sessions_key, pipeline_arm_users_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_pipeline.pipeline import State, config_of, evaluated_arms

log = logging.getLogger(__name__)


def persist_sessions(client: redis.Redis, store: ObjectStore, session_ids: Sequence[str]) -> dict[str, Any]:
    """Make sure every session has its record in object storage (``persist_session`` is idempotent)."""
    written, reused, missing = 0, 0, []
    for session_id in session_ids:
        try:
            result = persist_session(client, store, session_id)
        except NotFound:
            missing.append(session_id)  # Never created, or expired from Redis: nothing to persist.
            continue
        if result.get("deleted"):
            missing.append(session_id)  # Its data were deleted at its owner's request.
            continue
        reused += bool(result.get("reused"))
        written += not result.get("reused")
    return {"sessions": len(session_ids), "written": written, "reused": reused, "missing": missing}


def collect(client: redis.Redis, store: ObjectStore, state: State) -> dict[str, Any]:
    return persist_sessions(client, store, state["sessions"])


def arm_sessions(settings: ChatSettings, client: redis.Redis, store: ObjectStore, state: State) -> dict[str, Any]:
    """Simulated users talk to each arm (base, SFT, SFT+DPO), for Tables 1 and 2. Their session ids are kept
    under the pipeline, so a step run again reuses them instead of simulating new users."""
    # Only this step simulates users.
    from emili_pipeline.simulator import load_personas, run_users, summarize, user_subject

    key = pipeline_arm_sessions_key(state["pipeline_id"])
    if store.exists(Bucket.MODELS, key):
        kept = dict(store.get_json(Bucket.MODELS, key))
        kept["persisted"] = persist_sessions(client, store, [s for ids in kept["arms"].values() for s in ids])
        return {**kept, "reused": True}
    config = config_of(state)
    per_arm = config.evaluation.users_per_arm
    arms = evaluated_arms(state)
    if per_arm == 0:
        return {"arms": {}, "skipped": "evaluation.users_per_arm is 0"}
    personas = load_personas(config.personas, config.persona_limit)
    secret = settings.auth.secret.get_secret_value()
    target = settings.grpc_target()
    seed = config.seed + 1000  # The same seed for every arm: the same personas and users meet each model.
    # And the same user id: simulated user i is one person to every arm, so the gate pairs their sessions.
    subject_prefix = f"eval-{state['pipeline_id'][3:11]}"

    # Named before any of them starts: the loop never takes these users' sessions for training, even while this step
    # runs or after it died midway (the session list below is written only once every user has finished).
    users = [user_subject(subject_prefix, seed, i) for i in range(per_arm)]
    store.put_json(Bucket.MODELS, pipeline_arm_users_key(state["pipeline_id"]), {"users": users})
    result: dict[str, Any] = {"arms": {}, "summaries": {}}
    for i, (label, arm) in enumerate(arms.items()):
        simulator = config.simulator_settings().model_copy(update={"model_arm": arm, "subject_prefix": subject_prefix})

        def token_for(subject: str) -> str:
            return create_token(secret, subject, ["chat"], 3600, settings.auth.issuer)

        started = time.perf_counter()
        outcomes = asyncio.run(
            run_users(
                per_arm,
                config.evaluation.concurrency,
                target,
                personas,
                simulator,
                seed,
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
