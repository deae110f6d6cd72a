"""What the loop (:mod:`emili_pipeline.loop`) does to the rest of the system: the real :class:`~emili_pipeline.loop.
Actions`.

- **Eligible sessions** are read from object storage alone: a session record (``session.json``, written by chat's
  persist) of a session that has *ended*, whose user consented to training (``use_for_training``), that has no
  deletion tombstone (a withdrawal deletes the participant's sessions, which writes one first) and that is not
  synthetic unless the policy allows it, and not made by a pipeline's own evaluation: the simulated users of the
  ``arm_sessions`` step (synthetic sessions the loop would otherwise take for new data and train the next candidate
  on) are never eligible; they are known by the list each pipeline keeps of them
  (``pipelines/<id>/arm_sessions.json``, bucket models, once they have finished) and, before that, by their users'
  ids (``pipelines/<id>/arm_users.json``, written before the first of them starts). A policy with
  ``sessions_from: study`` further keeps only the sessions the gateway recorded under its study
  (``<studies prefix>/<study_id>/sessions/<session_id>.json``, bucket sessions); the chat session record itself
  does not know its study. Labelling is the pipeline's own first step after collection, so what is asked of a
  session is what its label is computed from: a pre- and a post-chat survey (the gold Δv) and at least one reply
  (the turns flags and pairs are cut from), read from the record's event counts. A session abandoned before its
  post-chat survey cannot be labelled and never counts toward the policy's threshold (the label step skips one
  without consent again, in case consent changed in between).
- **A pipeline** is the policy's pipeline config (``policy.pipeline``) with the production arm as its ``baseline``,
  over exactly the given recorded sessions (nothing is simulated before training; the collect step only makes
  sure their records are stored). Its id is a digest of config and sessions, so asking again for the same one
  finds it instead of starting a second.
- **The outcome** comes from the pipeline's stored state (it outlives the Celery results): done when every step
  is, cancelled when ``emili pipeline cancel`` stopped it, failed when a step failed, else running; a
  :class:`~emili_pipeline.orchestrate.Watcher` kept per pipeline resubmits a step whose worker died or whose message
  was lost. The candidate is the evaluation's ``candidate`` (else the last version
  trained: DPO, else SFT), the evidence its ``gate_evidence``.
- **Canaries** go through the gateway's HTTP API with an admin token (never its code): ``POST`` and ``GET
  /api/v1/studies/{id}/canary``; the gateway decides promotion or rollback itself. A canary that never started
  is told from an unknown study by the error body's code (``canary_not_found`` against ``not_found``), never by
  its message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from emili_core.deletion import session_deleted
from emili_core.errors import InvalidInput, NotFound
from emili_core.keys import PIPELINE_ARM_SESSIONS, PIPELINE_ARM_USERS, session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.records import recorded_sessions
from emili_pipeline.config import PipelineConfig, RecipeFetcher, load_config, resolve
from emili_pipeline.gate import Evidence, evidence_from_json
from emili_pipeline.loop import CanaryRefused, NoStudyForCanary
from emili_pipeline.pipeline import FAILED, State, Superseded, is_finished, load_state, new_state, outputs, stored_state
from emili_session.loop_records import STUDIES_PREFIX

log = logging.getLogger(__name__)

API = "/api/v1"
ENDED = "ended"  # chat's state of a session that has ended (its record then holds every event).
RUNNING, DONE, CANCELLED = "running", "done", "cancelled"
# The events a label is computed from (chat's per-kind counts in the session record): both surveys and a reply.
LABEL_MATERIAL = ("pre_survey", "post_survey", "assistant_message")
CANARY_STATES = {"running": "running", "promoted": "promoted", "rolled_back": "rolled_back"}
# The gateway's error codes (``{"error": code, ...}``): a candidate that has had no canary; no study can take one now.
CANARY_NOT_FOUND = "canary_not_found"
NO_STUDY_FOR_CANARY = "no_study_for_canary"


CANARY_REFUSALS = frozenset({400, 404, 409, 422})


class GatewayError(Exception):
    """The gateway refused or could not be reached; the message says which call and why."""


def pipeline_simulated(store: ObjectStore) -> tuple[set[str], set[str]]:
    """The sessions and the users any pipeline's evaluation simulated: every pipeline's session list per arm
    (written once the step's users have all finished) and its users' ids (written before the first starts, so the
    sessions of a step still running, or of one that died midway, are known by their user)."""
    sessions: set[str] = set()
    users: set[str] = set()
    for key in store.list_keys(Bucket.MODELS, "pipelines/"):
        name = key.rsplit("/", 1)[-1]
        if name not in {PIPELINE_ARM_SESSIONS, PIPELINE_ARM_USERS}:
            continue
        try:
            kept = store.get_json(Bucket.MODELS, key)
        except NotFound:
            continue
        if not isinstance(kept, dict):
            continue
        if name == PIPELINE_ARM_USERS:
            users.update(str(u) for u in kept.get("users") or ())
        else:
            for ids in (kept.get("arms") or {}).values():
                sessions.update(str(s) for s in ids or ())
    return sessions, users


def study_session_ids(store: ObjectStore, study_id: str, studies_prefix: str = STUDIES_PREFIX) -> set[str]:
    """Ids of the sessions the gateway recorded under ``study_id`` (none for an empty id); ``studies_prefix`` is the
    gateway's ``studies.prefix`` setting."""
    if not study_id or "/" in study_id:
        return set()
    prefix = f"{studies_prefix}/{study_id}/sessions/"
    return {key.removeprefix(prefix).removesuffix(".json") for key in store.list_keys(Bucket.SESSIONS, prefix)}


def labellable(manifest: dict[str, Any]) -> bool:
    """Whether a session record holds what its label needs (:data:`LABEL_MATERIAL`)."""
    counts = manifest.get("counts")
    return isinstance(counts, dict) and all(isinstance(counts.get(k), int) and counts[k] > 0 for k in LABEL_MATERIAL)


def eligible_session_ids(
    store: ObjectStore, include_synthetic: bool, study_id: str | None = None, studies_prefix: str = STUDIES_PREFIX
) -> list[str]:
    """Ids of recorded, ended, labellable sessions consented to training, not deleted, not synthetic unless
    allowed, not simulated by a pipeline's evaluation and, when ``study_id`` is given, recorded under that gateway
    study; sorted."""
    simulated, simulated_users = pipeline_simulated(store)
    members = study_session_ids(store, study_id, studies_prefix) if study_id is not None else None
    eligible = []
    for session_id in recorded_sessions(store):
        if session_id in simulated or (members is not None and session_id not in members):
            continue
        try:
            manifest = store.get_json(Bucket.SESSIONS, session_record_keys(session_id)["session.json"])
        except (NotFound, InvalidInput):
            continue  # Deleted since the listing, or a key that names no session.
        if not isinstance(manifest, dict) or manifest.get("state") != ENDED:
            continue
        if manifest.get("user_id") in simulated_users:
            continue
        if not manifest.get("use_for_training") or (manifest.get("synthetic") and not include_synthetic):
            continue
        if not labellable(manifest):
            continue
        if session_deleted(store, session_id):
            continue
        eligible.append(session_id)
    return eligible


def candidate_of(state: State) -> str | None:
    """The version the pipeline offers the gate: the evaluation's ``candidate``, else DPO's, else SFT's version."""
    named = outputs(state, "evaluate").get("candidate")
    if named:
        return str(named)
    for step in ("dpo", "sft"):
        version = outputs(state, step).get("model_version")
        if version:
            return str(version)
    return None


def evidence_of(state: State) -> dict[str, Evidence]:
    """The evaluation's gate evidence, with an empty item saying why for each metric it could not measure (so the
    gate's reason can name the cause); malformed evidence is logged and counts as none (the gate then fails)."""
    evaluate = outputs(state, "evaluate")
    try:
        # The label step's evidence is on the pipeline's own sessions (does their feedback predict their surveys?).
        evidence = evidence_from_json(outputs(state, "label").get("gate_evidence") or {})
        evidence |= evidence_from_json(evaluate.get("gate_evidence") or {})
    except ValueError as exc:
        log.error("pipeline %s: %s; the gate sees no evidence", state.get("pipeline_id"), exc)
        return {}
    missing = evaluate.get("gate_evidence_missing") or {}
    gaps = {str(m): Evidence((), missing=str(why)) for m, why in missing.items() if m not in evidence}
    return evidence | gaps


def with_baseline(config: PipelineConfig, baseline: str) -> PipelineConfig:
    """The config comparing its candidate with ``baseline`` (validated, so a bad version name fails here)."""
    return PipelineConfig.model_validate({**config.model_dump(), "baseline": baseline})


@dataclass
class SystemActions:
    """The loop's actions against object storage, the Celery broker and the gateway.

    ``celery`` is the producer app (tasks are sent by name); ``gateway`` makes an HTTP client for the gateway's
    root URL with a fresh admin token (None: no gateway, and a canary cannot start); ``fetch_recipe`` fetches a
    shipped recipe named in the pipeline config (None: the config must name recipe files); ``study_id`` restricts
    eligible sessions to that study's (:meth:`~emili_pipeline.loop.LoopPolicy.sessions_study`)."""

    store: ObjectStore
    celery: Any
    pipeline_config: Path
    gateway: Callable[[], httpx.Client] | None = None
    fetch_recipe: RecipeFetcher | None = None
    # Set (``sessions_from: study``): only the sessions of this gateway study are eligible ("" matches none).
    study_id: str | None = None
    studies_prefix: str = STUDIES_PREFIX  # The gateway's ``studies.prefix`` setting.
    _watchers: dict[str, Any] = field(default_factory=dict)

    # --- sessions and pipelines -----------------------------------------------------------------------------------

    def eligible_sessions(self, include_synthetic: bool) -> list[str]:
        return eligible_session_ids(self.store, include_synthetic, self.study_id, self.studies_prefix)

    def pipeline_state(self, session_ids: Sequence[str], baseline: str) -> State:
        """The pipeline's initial state (not stored): the resolved config with ``baseline`` over the sessions."""
        path = self.pipeline_config
        config = resolve(load_config(path), path.resolve().parent, fetch_recipe=self.fetch_recipe)
        collected = {"source": "recorded sessions", "ok": len(session_ids), "failed": 0}
        return new_state(with_baseline(config, baseline), session_ids, collected)

    def start_pipeline(self, session_ids: Sequence[str], baseline: str) -> str:
        from emili_pipeline.orchestrate import submit

        state = self.pipeline_state(session_ids, baseline)
        pipeline_id = str(state["pipeline_id"])
        try:
            # Saves the state first, then sends the chain; only if nobody submitted this pipeline before.
            submit(self.celery, self.store, stored_state(self.store, pipeline_id) or state, expect_attempt=0)
        except Superseded:
            log.info("pipeline %s exists already: not started again", pipeline_id)
            return pipeline_id
        log.info("pipeline %s submitted: %d sessions, baseline %s", pipeline_id, len(session_ids), baseline)
        return pipeline_id

    def pipeline_outcome(self, pipeline_id: str) -> tuple[str, str | None, dict[str, Evidence]]:
        try:
            state = load_state(self.store, pipeline_id)
        except NotFound:
            log.error("pipeline %s has no stored state", pipeline_id)
            return FAILED, None, {}
        if is_finished(state):
            self._watchers.pop(pipeline_id, None)
            return DONE, candidate_of(state), evidence_of(state)
        if state.get("cancelled"):  # A failure the loop's history names as such (`emili pipeline cancel`).
            self._watchers.pop(pipeline_id, None)
            return CANCELLED, None, {}
        if any(step.get("state") == FAILED for step in state["steps"].values()):
            self._watchers.pop(pipeline_id, None)
            return FAILED, None, {}
        if self._follow(pipeline_id, state) == "failed":
            return FAILED, None, {}
        return RUNNING, None, {}

    def _follow(self, pipeline_id: str, state: State) -> str:
        """The Celery side of a running pipeline; its watcher resubmits a step whose worker died."""
        from emili_pipeline.orchestrate import Watcher

        watcher = self._watchers.get(pipeline_id)
        # A new watcher for a resubmission made elsewhere (`emili pipeline resume`): its tasks have new ids.
        if watcher is None or int(watcher.state.get("attempt", 0)) < int(state.get("attempt", 0)):
            watcher = self._watchers[pipeline_id] = Watcher(self.celery, self.store, state)
        try:
            _, status = watcher.poll()
        except Exception as exc:  # The broker or result backend is down: no news, not a failure.
            log.warning("pipeline %s: cannot follow its tasks (%s)", pipeline_id, exc)
            return RUNNING
        return str(status)

    # --- canaries -------------------------------------------------------------------------------------------------

    def _gateway_call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self.gateway is None:
            raise GatewayError("no gateway is configured: a canary cannot start or be followed")
        try:
            with self.gateway() as http:
                return http.request(method, f"{API}{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise GatewayError(f"{method} {path}: the gateway cannot be reached ({exc})") from None

    def start_canary(
        self, candidate: str, production: str, share: float, studies: Sequence[str] | None, synthetic: bool
    ) -> list[str]:
        body: dict[str, Any] = {"candidate": candidate, "production": production, "share": share}
        if studies is not None:
            body["studies"] = list(studies)
        body["synthetic"] = synthetic
        response = self._gateway_call("POST", "/canaries", json=body)
        where = f"in study {', '.join(studies)}" if studies else "in the running studies"
        if response.status_code != 201:
            message = f"the canary of {candidate} {where}: HTTP {response.status_code} {_detail(response)}"
            code = _error_code(response)
            if code == NO_STUDY_FOR_CANARY:
                raise NoStudyForCanary(message)
            # The gateway refused the request itself (a retired or rejected candidate, another canary running in a
            # named study, no such study): final. Anything else (the gateway down, our token, a proxy's page) may
            # pass later.
            refused = response.status_code in CANARY_REFUSALS and code
            raise (CanaryRefused if refused else GatewayError)(message)
        started = [str(c.get("study_id")) for c in response.json().get("canaries", [])]
        log.info("canary of %s started in %s (share %.2f)", candidate, ", ".join(started), share)
        return started

    def canary_outcome(self, candidate: str) -> str:
        # The candidate's own canary: another may have become a study's newest since ours was decided.
        response = self._gateway_call("GET", f"/canaries/{candidate}")
        if response.status_code == 404 and _error_code(response) == CANARY_NOT_FOUND:
            return "missing"
        if response.status_code != 200:
            raise GatewayError(f"the canary of {candidate}: HTTP {response.status_code} {_detail(response)}")
        group = response.json()
        if group.get("candidate") != candidate:
            raise GatewayError(f"the gateway answered for {group.get('candidate')!r} when asked for {candidate!r}")
        state = CANARY_STATES.get(str(group.get("state")))
        if state is None:
            raise GatewayError(f"the canary of {candidate} is in an unknown state {group.get('state')!r}")
        return state


def _body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error_code(response: httpx.Response) -> str:
    """The gateway's machine-readable error code, "" when the body has none (a proxy's error page)."""
    return str(_body(response).get("error", ""))


def _detail(response: httpx.Response) -> str:
    body = _body(response)
    return str(body.get("detail", ""))[:300] if body else response.text[:300]
