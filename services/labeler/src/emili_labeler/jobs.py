"""The labeler's jobs, as plain functions over the session records in object storage.

    emili-sessions/<session>/labels/<settings-hash>.json   a session's label (gold VAD + turn flags)
    emili-datasets/<kind>/<dataset-id>/data.jsonl          an immutable dataset
    emili-datasets/<kind>/<dataset-id>/manifest.json       its manifest (written last)
    emili-datasets/index/<dataset-id>.json                 where a dataset id lives

Every output is keyed by content (session id plus a hash of the label settings; dataset ids are hashes
of kind, content and settings), so retried or redelivered jobs find or rewrite the same objects.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emili_core.errors import InvalidInput, NotFound
from emili_core.keys import dataset_index_key
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.records import load_session, recorded_sessions
from emili_labeler.datasets import DatasetManifest, SessionInput, feedback_pairs, jsonl_bytes, sft_examples
from emili_labeler.empathetic import empo_pairs, load_dialogues
from emili_labeler.gold import GoldLabel, arm_table, gold_label
from emili_labeler.reactions import EMOTION_TUNE_ORIGINAL, VARIANT_2025, TurnReaction, WeightVector, flag_turns
from emili_labeler.settings import LabelerSettings
from emili_labeler.user_weights import (
    Baseline,
    PopulationWeights,
    Sample,
    UserWeights,
    baseline_readings,
    fit_users,
    samples_from_session,
    to_weight_vector,
    user_baseline,
)
from emili_labeler.vad import VADScorer

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
WEIGHTS: dict[str, tuple[WeightVector, str]] = {
    "emotion_tune": (EMOTION_TUNE_ORIGINAL, "window"),  # Reads the face in [t, t + 1 s].
    "variant_2025": (VARIANT_2025, "delayed"),  # Reads the face 5 s after the reply.
}


LEARNED_WEIGHTS_KEY = "user_weights/latest.json"


@dataclass
class Runtime:
    settings: LabelerSettings
    store: ObjectStore
    scorer: VADScorer

    @property
    def label_settings(self) -> dict[str, Any]:
        """What a label depends on; its hash keys the label objects."""
        o = self.settings.labeler
        return {
            "lexicon": self.scorer.lexicon.name,
            "lexicon_sha256": self.scorer.lexicon.sha256,
            "oov_method": o.oov_method,
            "beta": o.beta,
            "top_k": o.top_k,
            "ridge_alpha": o.ridge_alpha,
            "weights": o.weights,
            # Learned weights change what a flag means: their digest is part of the label's key.
            "learned_weights_sha256": self._learned_digest() if o.weights == "learned" else None,
        }

    def _learned_digest(self) -> str:
        try:
            return self.store.metadata(Bucket.DATASETS, LEARNED_WEIGHTS_KEY).get("sha256", "")
        except NotFound:
            return ""

    @property
    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.label_settings, sort_keys=True).encode()).hexdigest()[:16]


def label_key(session_id: str, settings_hash: str) -> str:
    return f"{session_id}/labels/{settings_hash}.json"


def system_prompt_of(events: Sequence[dict[str, Any]]) -> str:
    for event in events:
        if event["kind"] == "session_created":
            return str(event.get("system_prompt", ""))
    return ""


def learned_weights(store: ObjectStore, user_id: str) -> WeightVector:
    """The user's fitted weight vector, or the population's when the user has none."""
    try:
        fitted = store.get_json(Bucket.DATASETS, LEARNED_WEIGHTS_KEY)
    except NotFound:
        raise NotFound("no learned weights yet: run labeler.fit_user_weights first") from None
    if user_id in fitted["users"]:
        return to_weight_vector(UserWeights.from_json(fitted["users"][user_id]))
    return to_weight_vector(PopulationWeights.from_json(fitted["population"]))


def turn_reactions(runtime: Runtime, events: Sequence[dict[str, Any]], user_id: str) -> list[TurnReaction]:
    choice = runtime.settings.labeler.weights
    if choice == "learned":
        return flag_turns(events, learned_weights(runtime.store, user_id), post="window")
    weights, post = WEIGHTS[choice]
    return flag_turns(events, weights, post=post)  # type: ignore[arg-type]


def label_session(runtime: Runtime, session_id: str) -> dict[str, Any]:
    key = label_key(session_id, runtime.settings_hash)
    if runtime.store.exists(Bucket.SESSIONS, key):
        return {**runtime.store.get_json(Bucket.SESSIONS, key), "reused": True}
    manifest, events = load_session(runtime.store, session_id)
    gold = gold_label(events, runtime.scorer)
    turns = turn_reactions(runtime, events, str(manifest.get("user_id", "")))
    label = {
        "session_id": session_id,
        "user_id": manifest.get("user_id", ""),
        "model_arm": manifest.get("model_arm", ""),
        "use_for_training": bool(manifest.get("use_for_training", False)),
        "synthetic": bool(manifest.get("synthetic", False)),
        "gold": gold.to_json(),
        "turns": [
            {
                "turn_id": t.turn_id,
                "flagged": t.flagged,
                "delta": t.delta,
                "reason": t.reason,
                "unprompted": t.unprompted,
            }
            for t in turns
        ],
        "settings": runtime.label_settings,
        "settings_hash": runtime.settings_hash,
        "key": key,
        "source_last_event_id": manifest.get("last_event_id", ""),
    }
    runtime.store.put_json(Bucket.SESSIONS, key, label)
    return {**label, "reused": False}


def label_all_unlabeled(runtime: Runtime, progress: Progress = lambda done, total: None) -> dict[str, Any]:
    sessions = recorded_sessions(runtime.store)
    todo = [s for s in sessions if not runtime.store.exists(Bucket.SESSIONS, label_key(s, runtime.settings_hash))]
    failed: dict[str, str] = {}
    for i, session_id in enumerate(todo, 1):
        try:
            label_session(runtime, session_id)
        except (InvalidInput, NotFound, ValueError) as exc:  # One bad record must not stop the rest.
            failed[session_id] = str(exc)
        progress(i, len(todo))
    return {
        "sessions": len(sessions),
        "labelled": len(todo) - len(failed),
        "failed": failed,
        "settings_hash": runtime.settings_hash,
    }


def _training_inputs(runtime: Runtime, session_ids: Sequence[str] | None) -> list[SessionInput]:
    inputs = []
    for session_id in session_ids if session_ids is not None else recorded_sessions(runtime.store):
        label = label_session(runtime, session_id)
        if not label["use_for_training"]:
            continue  # The user did not consent to training on this session.
        _, events = load_session(runtime.store, session_id)
        flags = {t["turn_id"]: _Flag(t["flagged"], t["delta"]) for t in label["turns"] if t["turn_id"]}
        inputs.append(SessionInput(session_id, system_prompt_of(events), events, flags))
    return inputs


@dataclass(frozen=True)
class _Flag:
    flagged: bool | None
    delta: float | None


def _publish(runtime: Runtime, manifest: DatasetManifest, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    prefix = f"{manifest.kind}/{manifest.id}"
    out = {**manifest.to_dict(), "key": f"{prefix}/data.jsonl"}
    if not runtime.store.exists(Bucket.DATASETS, f"{prefix}/manifest.json"):
        runtime.store.put_bytes(Bucket.DATASETS, f"{prefix}/data.jsonl", jsonl_bytes(records), "application/x-ndjson")
        runtime.store.put_json(Bucket.DATASETS, f"{prefix}/manifest.json", out)  # Last: the dataset is complete.
        runtime.store.put_json(Bucket.DATASETS, dataset_index_key(manifest.id), {"manifest": f"{prefix}/manifest.json"})
    return out


def build_sft_dataset(runtime: Runtime, session_ids: Sequence[str] | None = None) -> dict[str, Any]:
    inputs = _training_inputs(runtime, session_ids)
    records = [r for s in inputs for r in sft_examples(s.session_id, s.system_prompt, s.events, s.labels)]
    if not records:
        raise NotFound("no consenting session has a flagged assistant turn: nothing to train on yet")
    manifest = DatasetManifest.build("sft", records, runtime.label_settings)
    return _publish(runtime, manifest, records)


def build_dpo_dataset(
    runtime: Runtime,
    source: str = "feedback",
    session_ids: Sequence[str] | None = None,
    epoch: int = 0,
    seed: int = 0,
    split: str = "valid",
    epochs: int = 1,
) -> dict[str, Any]:
    """Preference pairs; for EmpatheticDialogues, one fresh rejected draw for each of ``epochs`` epochs
    (epoch, epoch+1, ...) in one dataset version, so the trainer can give each epoch its own draw."""
    if epochs < 1:
        raise InvalidInput(f"epochs must be at least 1, not {epochs}")
    if source == "feedback":
        records = feedback_pairs(_training_inputs(runtime, session_ids), seed=seed)
        kind = "dpo_feedback"
        settings = runtime.label_settings
    elif source == "empathetic":
        folder = runtime.settings.labeler.empathetic_dialogues
        if folder is None:
            raise InvalidInput("EmpatheticDialogues is not configured (EMILI_LABELER__EMPATHETIC_DIALOGUES)")
        dialogues, _ = load_dialogues(Path(folder) / f"{split}.csv", split=split)
        records = [r for e in range(epoch, epoch + epochs) for r in empo_pairs(dialogues, e, seed, split=split)]
        kind = "dpo_empathetic"
        settings = {"split": split, "epoch": epoch, "epochs": epochs, "seed": seed}
    else:
        raise InvalidInput(f"unknown DPO source {source!r}: feedback or empathetic")
    if not records:
        raise NotFound(f"no {source} preference pairs could be built")
    manifest = DatasetManifest.build(kind, records, settings)  # type: ignore[arg-type]
    return _publish(runtime, manifest, records)


def user_weights_key(settings_hash: str) -> str:
    return f"user_weights/{settings_hash}.json"


def fit_user_weights(runtime: Runtime, session_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-user emotion weights (paper 2.2): the face before each user message regressed on the valence of
    that message's text, each user z-scored against their own baseline and shrunk toward the population."""
    samples: list[Sample] = []
    baselines: dict[str, Baseline] = {}
    readings: dict[str, list[Any]] = {}
    for session_id in session_ids if session_ids is not None else recorded_sessions(runtime.store):
        manifest, events = load_session(runtime.store, session_id)
        user = str(manifest.get("user_id", ""))
        messages = [e for e in events if e["kind"] == "user_message"]
        scored = runtime.scorer.score_batch([str(e["text"]) for e in messages])
        targets = {e["event_id"]: r.vad.valence for e, r in zip(messages, scored, strict=True) if r.vad is not None}
        samples += samples_from_session(events, user, targets)
        readings.setdefault(user, []).extend(baseline_readings(events).tolist())
    if not samples:
        raise NotFound("no user message has both a face reading and a scorable text: nothing to fit")
    for user, rows in readings.items():
        baselines[user] = user_baseline(rows)
    population, users = fit_users(samples, baselines=baselines)
    result = {
        "settings_hash": runtime.settings_hash,
        "target": "valence of the user's message",
        "population": population.to_json(),
        "users": {user: fit.to_json() for user, fit in sorted(users.items())},
    }
    runtime.store.put_json(Bucket.DATASETS, user_weights_key(runtime.settings_hash), result)
    runtime.store.put_json(Bucket.DATASETS, LEARNED_WEIGHTS_KEY, result)  # What weights="learned" uses.
    return {"key": user_weights_key(runtime.settings_hash), "users": len(users), "samples": len(samples)}


def delta_table(runtime: Runtime, session_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """The paper's Table 2 over the recorded sessions: mean Delta V/A/D per model arm with bootstrap 95% CIs."""
    labels = []
    for session_id in session_ids if session_ids is not None else recorded_sessions(runtime.store):
        label = label_session(runtime, session_id)
        labels.append((label["model_arm"], GoldLabel.from_json(label["gold"])))
    return {
        "lexicon": runtime.scorer.lexicon.name,
        "sessions": len(labels),
        "arms": arm_table(labels, runtime.settings.labeler.bootstrap_samples),
    }
