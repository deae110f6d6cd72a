"""The labeler's jobs, as plain functions over the session records in object storage.

    emili-sessions/<session>/labels/<settings-hash>.json   a session's label (gold VAD + turn flags)
    emili-datasets/<kind>/<dataset-id>/data.jsonl          an immutable dataset
    emili-datasets/<kind>/<dataset-id>/manifest.json       its manifest (written last)
    emili-datasets/index/<dataset-id>.json                 where a dataset id lives
    emili-datasets/<kind>/<dataset-id>/withdrawn.json      sessions withdrawn from it (see forget_sessions)

Every output is keyed by content (session id plus a hash of the label settings; dataset ids are hashes
of kind, content and settings), so retried or redelivered jobs find or rewrite the same objects. Nothing is
written for a deleted session (its tombstone, :mod:`emili_core.deletion`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from emili_affect.empathetic import Dialogue, load_dialogues
from emili_affect.vad import VADScorer
from emili_core.deletion import audit_deletion, check_not_deleted, guard_written, now_ms, session_deleted
from emili_core.errors import FailedPrecondition, InvalidInput, NotFound
from emili_core.keys import check_session_id, dataset_index_key, dataset_withdrawal_key, session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.records import load_session, recorded_sessions, session_consent
from emili_labeler.datasets import (
    DEFAULT_CUT_REPLIES,
    DEFAULT_PAIR_SELECTION,
    DEFAULT_PAIRS_PER_CONTEXT,
    CutReplies,
    DatasetManifest,
    PairSelection,
    SessionInput,
    check_cut_replies,
    check_pair_options,
    check_share,
    feedback_pairs,
    jsonl_bytes,
    sft_delta_cutoff,
    sft_examples,
)
from emili_labeler.empathetic import empathetic_sft_examples, empo_pairs
from emili_labeler.gold import GoldLabel, arm_table, gold_label
from emili_labeler.reactions import (
    EMOTION_TUNE_ORIGINAL,
    VARIANT_2025,
    VARIANT_2025_ZSCORED,
    TurnReaction,
    WeightVector,
    flag_turns,
    negative_reaction,
)
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
from emili_session.conversation import system_prompt_of
from emili_session.events import EventKind
from emili_session.gate_items import METRICS, PER_SESSION_METRICS, SIGNAL_METRIC, users_key
from emili_session.registry import mark_models_withdrawn

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
WEIGHTS: dict[str, tuple[WeightVector, str]] = {
    "emotion_tune": (EMOTION_TUNE_ORIGINAL, "window"),  # Reads the face in [t, t + 1 s].
    "variant_2025": (VARIANT_2025, "delayed"),  # Reads the face 5 s after the reply.
    "variant_2025_zscored": (VARIANT_2025_ZSCORED, "delayed"),  # EMILI's extension: population z-scores.
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
            "lemmatize": o.lemmatize,
            "beta": o.beta,
            "top_k": o.top_k,
            "ridge_alpha": o.ridge_alpha,
            "weights": o.weights,
            "gold_text_source": o.gold_text_source,
            # What the named vector is, not only its name: "variant_2025" once meant z-scored scores, and a label
            # computed then must not be reused now.
            "weight_vector": _vector_definition(WEIGHTS[o.weights][0]) if o.weights in WEIGHTS else None,
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


def _vector_definition(vector: WeightVector) -> dict[str, Any]:
    return {
        "weights": list(vector.weights),
        "scale": vector.scale,
        "threshold": vector.threshold,
        "zscore_mean": None if vector.zscore_mean is None else list(vector.zscore_mean),
        "zscore_std": None if vector.zscore_std is None else list(vector.zscore_std),
    }


def label_key(session_id: str, settings_hash: str) -> str:
    return f"{session_id}/labels/{settings_hash}.json"


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


def training_consent(store: ObjectStore, session_id: str) -> bool:
    """Whether the session's user consented to training on it (its persisted record's ``use_for_training``);
    NotFound when the session has no record."""
    consent = session_consent(store, session_id)
    if consent is None:
        raise NotFound(f"session {session_id} has no record in object storage (is it ended and persisted?)")
    return consent.use_for_training


def check_training_consent(store: ObjectStore, session_id: str) -> None:
    if not training_consent(store, session_id):
        raise FailedPrecondition(
            f"session {session_id}: its user did not consent to training (use_for_training is false): no training "
            "labels are computed for it"
        )


def label_session(runtime: Runtime, session_id: str) -> dict[str, Any]:
    """The session's training label; refused (FailedPrecondition) for a session without training consent."""
    key = label_key(session_id, runtime.settings_hash)
    check_not_deleted(runtime.store, session_id)
    check_training_consent(runtime.store, session_id)
    if runtime.store.exists(Bucket.SESSIONS, key):
        return {**runtime.store.get_json(Bucket.SESSIONS, key), "reused": True}
    manifest, events = load_session(runtime.store, session_id)
    gold = gold_label(events, runtime.scorer, runtime.settings.labeler.gold_text_source)
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
    guard_written(runtime.store, session_id, [(Bucket.SESSIONS, key)])  # Deleted meanwhile: the label goes too.
    return {**label, "reused": False}


def label_all_unlabeled(runtime: Runtime, progress: Progress = lambda done, total: None) -> dict[str, Any]:
    sessions = recorded_sessions(runtime.store)
    todo = [s for s in sessions if not runtime.store.exists(Bucket.SESSIONS, label_key(s, runtime.settings_hash))]
    failed: dict[str, str] = {}
    skipped: list[str] = []
    missing_gold: dict[str, list[str]] = {}
    for i, session_id in enumerate(todo, 1):
        try:
            label = label_session(runtime, session_id)
        except FailedPrecondition:
            skipped.append(session_id)  # No consent to training: no label.
        except (InvalidInput, NotFound, ValueError) as exc:  # One bad record must not stop the rest.
            failed[session_id] = str(exc)
        else:
            if missing := GoldLabel.from_json(label["gold"]).missing:
                missing_gold[session_id] = missing
        progress(i, len(todo))
    if skipped:
        log.info("%d sessions without training consent skipped", len(skipped))
    if missing_gold:
        log.info("%d sessions have no pre- or post-chat VAD (nothing scorable in a survey)", len(missing_gold))
    return {
        "sessions": len(sessions),
        "labelled": len(todo) - len(failed) - len(skipped),
        "failed": failed,
        "skipped_no_training_consent": len(skipped),
        # Sessions whose pre- or post-chat survey had nothing to score (no survey, no feelings and no text, or no
        # scorable word): no Delta v. Listed with the missing sides, never silently dropped.
        "missing_gold": len(missing_gold),
        "missing_gold_sessions": missing_gold,
        "settings_hash": runtime.settings_hash,
    }


def _training_inputs(runtime: Runtime, session_ids: Sequence[str] | None) -> tuple[list[SessionInput], int]:
    """The consenting sessions' inputs, and how many sessions were skipped for want of training consent."""
    inputs = []
    skipped = 0
    for session_id in session_ids if session_ids is not None else recorded_sessions(runtime.store):
        if session_deleted(runtime.store, session_id):
            continue  # Deleted at its owner's request.
        if not training_consent(runtime.store, session_id):
            skipped += 1  # The user did not consent to training on this session: not even labelled.
            continue
        label = label_session(runtime, session_id)
        _, events = load_session(runtime.store, session_id)
        flags = {t["turn_id"]: _Flag(t["flagged"], t["delta"]) for t in label["turns"] if t["turn_id"]}
        inputs.append(SessionInput(session_id, system_prompt_of(events), events, flags))
    if skipped:
        log.info("%d sessions without training consent skipped", skipped)
    return inputs, skipped


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
    # A session deleted while this dataset was built: withdrawn at once (forget_sessions may have looked already).
    deleted = [s for s in manifest.source_sessions if session_deleted(runtime.store, s)]
    if deleted:
        _withdraw_dataset(runtime, out, f"{prefix}/manifest.json", deleted, rebuild=False)
    return out


def empathetic_split(runtime: Runtime, split: str | None = None) -> tuple[list[Dialogue], dict[str, Any]]:
    """The dialogues of the configured EmpatheticDialogues split, and what a manifest records of it. Without a
    ``split``: the train split when the folder holds one, else valid (the shared development copy has only valid
    and test); the manifest says which was used and whether a train split was there."""
    folder = runtime.settings.labeler.empathetic_dialogues
    if folder is None:
        raise InvalidInput("EmpatheticDialogues is not configured (EMILI_LABELER__EMPATHETIC_DIALOGUES)")
    has_train = (Path(folder) / "train.csv").is_file()
    used = split or ("train" if has_train else "valid")
    path = Path(folder) / f"{used}.csv"
    if not path.is_file():
        raise NotFound(f"EmpatheticDialogues has no {used} split: {path} does not exist")
    dialogues, _ = load_dialogues(path, split=used)
    if used != "train":
        log.info("EmpatheticDialogues: training on the %s split (%s has no train.csv)", used, folder)
    return dialogues, {"split": used, "split_requested": split or "auto", "train_split_available": has_train}


def build_sft_dataset(
    runtime: Runtime,
    session_ids: Sequence[str] | None = None,
    source: str = "sessions",
    split: str | None = None,
    delta_share: float = 1.0,
    cut_replies: str = DEFAULT_CUT_REPLIES,
) -> dict[str, Any]:
    """SFT data: the flagged turns of the consenting recorded sessions (``source="sessions"``; with ``delta_share``
    below 1, only that share of them, the largest reactions), or EmPO's first stage, EmpatheticDialogues with every
    listener turn trained (``"empathetic"``; see :func:`empathetic_split`). ``cut_replies``: what a reply cut off at
    the token limit may be (:data:`CutReplies`)."""
    try:
        check_share("delta_share", delta_share)
        check_cut_replies(cut_replies)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    if source == "empathetic" and delta_share < 1.0:
        raise InvalidInput("delta_share selects flagged session replies: it does not apply to EmpatheticDialogues")
    if source == "empathetic":
        dialogues, split_info = empathetic_split(runtime, split)
        ed_records = empathetic_sft_examples(dialogues, split=split_info["split"])
        if not ed_records:
            raise NotFound(f"no EmpatheticDialogues dialogue in the {split_info['split']} split")
        manifest = DatasetManifest.build("sft", ed_records, {"source": "empathetic", **split_info})
        return {**_publish(runtime, manifest, ed_records), "source": "empathetic", "skipped_no_training_consent": 0}
    if source != "sessions":
        raise InvalidInput(f"unknown SFT source {source!r}: sessions or empathetic")
    inputs, skipped = _training_inputs(runtime, session_ids)
    cut = cast(CutReplies, cut_replies)  # Checked above.
    cutoff = sft_delta_cutoff(inputs, delta_share, cut_replies=cut)
    records = [
        r
        for s in inputs
        for r in sft_examples(s.session_id, s.system_prompt, s.events, s.labels, min_delta=cutoff, cut_replies=cut)
    ]
    if not records:
        raise NotFound(
            "no consenting session has a flagged assistant turn: nothing to train on yet"
            + (f" ({skipped} sessions without training consent skipped)" if skipped else "")
        )
    # What a rebuild without a session reuses; older manifests (and a share of 1) keep every flagged reply, and
    # have the default cut-reply rule (so theirs is written only when it is another).
    created_from = {
        **({"delta_share": delta_share} if delta_share < 1.0 else {}),
        **({"cut_replies": cut_replies} if cut_replies != DEFAULT_CUT_REPLIES else {}),
    } or None
    manifest = DatasetManifest.build("sft", records, runtime.label_settings, created_from)
    return {**_publish(runtime, manifest, records), "skipped_no_training_consent": skipped}


def build_dpo_dataset(
    runtime: Runtime,
    source: str = "feedback",
    session_ids: Sequence[str] | None = None,
    epoch: int = 0,
    seed: int = 0,
    split: str | None = None,
    epochs: int = 1,
    max_pairs_per_context: int = DEFAULT_PAIRS_PER_CONTEXT,
    selection: str = DEFAULT_PAIR_SELECTION,
    margin_share: float = 1.0,
    cut_replies: str = DEFAULT_CUT_REPLIES,
) -> dict[str, Any]:
    """Preference pairs; for EmpatheticDialogues (the split as :func:`empathetic_split` picks it), one fresh
    rejected draw for each of ``epochs`` epochs (epoch, epoch+1, ...) in one dataset version, so the trainer can
    give each epoch its own draw. Feedback pairs: at most ``max_pairs_per_context`` per context, the widest
    reaction margins first (``selection="margin"``) or a seeded draw (``"random"``), from the widest
    ``margin_share`` of all combinations, a reply cut off at the token limit treated by ``cut_replies``."""
    if epochs < 1:
        raise InvalidInput(f"epochs must be at least 1, not {epochs}")
    try:
        check_pair_options(max_pairs_per_context, selection, margin_share)
        check_cut_replies(cut_replies)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    skipped = 0
    if source == "feedback":
        inputs, skipped = _training_inputs(runtime, session_ids)
        records = feedback_pairs(
            inputs,
            max_pairs_per_context=max_pairs_per_context,
            seed=seed,
            selection=cast(PairSelection, selection),  # Checked by check_pair_options above.
            margin_share=margin_share,
            cut_replies=cast(CutReplies, cut_replies),  # Checked above.
        )
        kind = "dpo_feedback"
        settings = runtime.label_settings
    elif source == "empathetic":
        dialogues, split_info = empathetic_split(runtime, split)
        used = split_info["split"]
        records = [r for e in range(epoch, epoch + epochs) for r in empo_pairs(dialogues, e, seed, split=used)]
        kind = "dpo_empathetic"
        # "balanced": the rejected draw deals the opposite emotion's dialogues out evenly, as EmPO does.
        settings = {**split_info, "epoch": epoch, "epochs": epochs, "seed": seed, "rejected_draw": "balanced"}
    else:
        raise InvalidInput(f"unknown DPO source {source!r}: feedback or empathetic")
    if not records:
        raise NotFound(
            f"no {source} preference pairs could be built"
            + (f" ({skipped} sessions without training consent skipped)" if skipped else "")
        )
    # What a rebuild without a session reuses.
    created_from = (
        {
            "seed": seed,
            "max_pairs_per_context": max_pairs_per_context,
            "selection": selection,
            "margin_share": margin_share,
            **({"cut_replies": cut_replies} if cut_replies != DEFAULT_CUT_REPLIES else {}),
        }
        if source == "feedback"
        else None
    )
    manifest = DatasetManifest.build(kind, records, settings, created_from)  # type: ignore[arg-type]
    return {**_publish(runtime, manifest, records), "skipped_no_training_consent": skipped}


def user_weights_key(settings_hash: str) -> str:
    return f"user_weights/{settings_hash}.json"


def fit_user_weights(runtime: Runtime, session_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-user emotion weights (paper 2.2): the face before each user message regressed on the valence of
    that message's text, each user z-scored against their own baseline and shrunk toward the population."""
    samples: list[Sample] = []
    baselines: dict[str, Baseline] = {}
    readings: dict[str, list[Any]] = {}
    skipped = 0
    for session_id in session_ids if session_ids is not None else recorded_sessions(runtime.store):
        if not training_consent(runtime.store, session_id):
            skipped += 1  # No consent to training: its face and words do not shape the weights.
            continue
        manifest, events = load_session(runtime.store, session_id)
        user = str(manifest.get("user_id", ""))
        messages = [e for e in events if e["kind"] == EventKind.USER_MESSAGE]
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
    return {
        "key": user_weights_key(runtime.settings_hash),
        "users": len(users),
        "samples": len(samples),
        "skipped_no_training_consent": skipped,
    }


ORIGIN_SEPARATOR = " · "  # Table rows "<arm> · real" and "<arm> · synthetic", as the evaluation report's.


def _synthetic(store: ObjectStore, session_id: str) -> bool:
    try:
        return bool(store.get_json(Bucket.SESSIONS, session_record_keys(session_id)["session.json"]).get("synthetic"))
    except NotFound:
        return False


def delta_table(
    runtime: Runtime, session_ids: Sequence[str] | None = None, pool_synthetic: bool = False
) -> dict[str, Any]:
    """The paper's Table 2 over the recorded sessions: mean Delta V/A/D per model arm with bootstrap 95% CIs.

    Sessions of simulated users (``synthetic`` in their record) and of people are rows of their own
    (``<arm> · synthetic``, ``<arm> · real``) unless ``pool_synthetic``; the counts of each are returned."""
    labels = []
    skipped = 0
    origins = {"real": 0, "synthetic": 0}
    missing_gold: dict[str, list[str]] = {}
    for session_id in session_ids if session_ids is not None else recorded_sessions(runtime.store):
        if not training_consent(runtime.store, session_id):
            skipped += 1  # Labels are computed only for sessions whose users consented.
            continue
        label = label_session(runtime, session_id)
        gold = GoldLabel.from_json(label["gold"])
        origin = "synthetic" if _synthetic(runtime.store, session_id) else "real"
        origins[origin] += 1
        row = label["model_arm"] if pool_synthetic else f"{label['model_arm']}{ORIGIN_SEPARATOR}{origin}"
        labels.append((row, gold))
        if gold.missing:
            missing_gold[session_id] = gold.missing  # Not in the table (no Delta v): counted and listed here.
    return {
        "lexicon": runtime.scorer.lexicon.name,
        "sessions": len(labels),
        "real_sessions": origins["real"],
        "synthetic_sessions": origins["synthetic"],
        "pooled_synthetic": pool_synthetic,
        "skipped_no_training_consent": skipped,
        "missing_gold": len(missing_gold),
        "missing_gold_sessions": missing_gold,
        "arms": arm_table(labels, runtime.settings.labeler.bootstrap_samples),
    }


def label_threshold(label: Mapping[str, Any]) -> float:
    """The flag threshold a label's turns were judged with: its named weight vector's; learned weights flag
    at 0 (:func:`learned_weights` builds them with the default threshold)."""
    vector = (label.get("settings") or {}).get("weight_vector")
    return float(vector.get("threshold", 0.0)) if isinstance(vector, Mapping) else 0.0


def session_gate_items(label: Mapping[str, Any]) -> dict[str, list[float]]:
    """One labelled session's items for the evaluation gate:

    - ``delta_v``: its Delta valence from the surveys (none when a survey is missing);
    - ``reaction``: the mean, over the assistant replies whose reaction was read, of the face's change after the
      reply (the flag's delta, in the weight vector's units): the signal the flags are cut from, kept continuous
      (none when no reaction was read);
    - ``negative_reaction``: 1.0 or 0.0 per reply whose reaction was read (see
      :func:`~emili_labeler.reactions.negative_reaction`);
    - ``negative_reaction_rate``: those items' mean, one per session (none when no reaction was read): the unit the
      gate compares, since one person's replies are not independent."""
    delta = GoldLabel.from_json(label["gold"]).delta
    threshold = label_threshold(label)
    read = [float(t["delta"]) for t in label.get("turns") or () if t.get("delta") is not None]
    negatives = [float(n) for n in (negative_reaction(d, threshold) for d in read) if n is not None]
    return {
        "delta_v": [] if delta is None else [float(delta.valence)],
        "reaction": [sum(read) / len(read)] if read else [],
        "negative_reaction": negatives,
        "negative_reaction_rate": [sum(negatives) / len(negatives)] if negatives else [],
    }


def arm_gate_items(labels: Sequence[tuple[Mapping[str, Any], bool]]) -> dict[str, Any]:
    """Per model arm and origin ("real", "synthetic"), the gate's per-session and per-reply items of
    (label, synthetic) pairs: ``{arm: {origin: {"sessions": n, "delta_v": [...], "delta_v_users": [...],
    "reaction": [...], "reaction_users": [...], "negative_reaction": [...], "negative_reaction_rate": [...],
    "negative_reaction_rate_users": [...]}}}`` (:mod:`emili_session.gate_items`);
    ``<metric>_users`` is the user of each item of a per-session metric. Origins are never pooled: the gate compares
    sessions of one kind."""
    items: dict[str, Any] = {}
    for label, synthetic in labels:
        arm = str(label.get("model_arm") or "base")
        origin = "synthetic" if synthetic else "real"
        entry = items.setdefault(arm, {}).setdefault(
            origin,
            {"sessions": 0} | {m: [] for m in METRICS} | {users_key(m): [] for m in PER_SESSION_METRICS},
        )
        entry["sessions"] += 1
        session = session_gate_items(label)
        for metric, values in session.items():
            entry[metric] += values
        for metric in PER_SESSION_METRICS:
            entry[users_key(metric)] += [str(label.get("user_id", ""))] * len(session[metric])
    return items


def signal_evidence(labels: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The gate's :data:`~emili_session.gate_items.SIGNAL_METRIC` evidence of labelled sessions: per user with a read
    reaction and a gold Δv, their sessions' mean ``reaction`` (the ``candidate`` side, the signal) paired with their
    mean ``delta_v`` (the ``baseline`` side, the outcome), and their mean pre-chat valence (``covariate``: how
    someone felt before the chat moves both their face's changes and their Δv, so the gate compares users of similar
    pre-chat valence). One item per user, since a user's sessions share their face and their way of writing surveys,
    so they are not independent items; sessions without a user are left out. Real sessions only when there are
    any, as the rest of the gate never pools them with synthetic ones."""
    per_origin: dict[bool, dict[str, tuple[list[float], list[float], list[float]]]] = {True: {}, False: {}}
    for label in labels:
        user, gold, items = (
            str(label.get("user_id") or ""),
            GoldLabel.from_json(label["gold"]),
            session_gate_items(label),
        )
        if not user or gold.pre is None or not (items["reaction"] and items["delta_v"]):
            continue
        reactions, deltas, before = per_origin[bool(label.get("synthetic"))].setdefault(user, ([], [], []))
        reactions += items["reaction"]
        deltas += items["delta_v"]
        before.append(float(gold.pre.valence))
    per_user = per_origin[False] or per_origin[True]
    users = sorted(per_user)

    def means(side: int) -> list[float]:
        return [sum(per_user[u][side]) / len(per_user[u][side]) for u in users]

    return {SIGNAL_METRIC: {"candidate": means(0), "baseline": means(1), "paired": True, "covariate": means(2)}}


def gate_items(runtime: Runtime, session_ids: Sequence[str]) -> dict[str, Any]:
    """:func:`arm_gate_items` of the consenting sessions among ``session_ids`` (as :func:`delta_table` counts
    them; their labels are computed once and reused)."""
    labels = [
        (label_session(runtime, s), _synthetic(runtime.store, s))
        for s in session_ids
        if training_consent(runtime.store, s)
    ]
    return arm_gate_items(labels)


# --- forgetting sessions (a person withdrew) ----------------------------------------------------------------


def _dataset_manifests(store: ObjectStore) -> list[tuple[str, dict[str, Any]]]:
    """(manifest key, manifest) of every published dataset version, through the index."""
    found = []
    for index_key in store.list_keys(Bucket.DATASETS, dataset_index_key("").removesuffix(".json")):
        try:
            manifest_key = store.get_json(Bucket.DATASETS, index_key)["manifest"]
            found.append((manifest_key, dict(store.get_json(Bucket.DATASETS, manifest_key))))
        except (NotFound, KeyError, TypeError):
            continue  # A half-written or foreign entry: not a dataset this can withdraw.
    return found


def _rebuild(runtime: Runtime, manifest: dict[str, Any], remaining: list[str]) -> tuple[str | None, str]:
    """The dataset rebuilt from its remaining sessions with the same builder: (new id, note)."""
    kind = manifest["kind"]
    if kind not in ("sft", "dpo_feedback"):
        return None, f"{kind} datasets are not built from sessions: not rebuilt"
    if manifest.get("label_settings") != runtime.label_settings:
        return None, "not rebuilt: the labeler's label settings changed since it was built; build a new one"
    if not remaining:
        return None, "not rebuilt: every one of its sessions was withdrawn"
    try:
        created_from = manifest.get("created_from") or {}
        cut_replies = str(created_from.get("cut_replies", DEFAULT_CUT_REPLIES))  # Older: the only rule then.
        if kind == "sft":
            delta_share = float(created_from.get("delta_share", 1.0))
            rebuilt = build_sft_dataset(runtime, remaining, delta_share=delta_share, cut_replies=cut_replies)
        else:
            seed = int(created_from.get("seed", 0))
            cap = int(created_from.get("max_pairs_per_context", DEFAULT_PAIRS_PER_CONTEXT))  # Older: the default.
            # Older manifests have no selection: they were drawn at random, the only rule then.
            selection = str(created_from.get("selection", "random"))
            rebuilt = build_dpo_dataset(
                runtime,
                "feedback",
                remaining,
                seed=seed,
                max_pairs_per_context=cap,
                selection=selection,
                margin_share=float(created_from.get("margin_share", 1.0)),
                cut_replies=cut_replies,
            )
    except (NotFound, InvalidInput, ValueError) as exc:  # The withdrawal must not fail for want of a rebuild.
        return None, f"not rebuilt: {exc}"
    return str(rebuilt["id"]), "rebuilt without the withdrawn sessions"


def _withdraw_dataset(
    runtime: Runtime, manifest: dict[str, Any], manifest_key: str, sessions: Sequence[str], *, rebuild: bool = True
) -> dict[str, Any]:
    """Mark a dataset withdrawn (``withdrawn.json`` beside its manifest and a flag in its index entry), remove its
    data file (it holds the withdrawn people's words), and rebuild it without them where its builder can."""
    store = runtime.store
    key = dataset_withdrawal_key(manifest_key)
    try:
        previous: dict[str, Any] = dict(store.get_json(Bucket.DATASETS, key))
    except NotFound:
        previous = {}
    withdrawn = sorted(set(previous.get("withdrawn_sessions", [])) | set(sessions))
    source = list(manifest.get("source_sessions", []))
    remaining = [s for s in source if s not in withdrawn and not session_deleted(store, s)]
    if previous and withdrawn == sorted(previous.get("withdrawn_sessions", [])):
        replacement, note = previous.get("replacement"), str(previous.get("note", ""))  # A retry: rebuilt before.
    elif rebuild:
        replacement, note = _rebuild(runtime, manifest, remaining)
    else:
        replacement, note = None, "not rebuilt: withdrawn as it was published"
    record = {
        "dataset_id": manifest["id"],
        "kind": manifest["kind"],
        "withdrawn_sessions": withdrawn,
        "withdrawn_ms": previous.get("withdrawn_ms") or now_ms(),
        "updated_ms": now_ms(),
        "replacement": replacement,
        "note": note,
        "data_removed": True,
    }
    store.put_json(Bucket.DATASETS, key, record)
    store.put_json(Bucket.DATASETS, dataset_index_key(manifest["id"]), {"manifest": manifest_key, "withdrawn": key})
    data_key = manifest.get("key") or f"{manifest_key.rsplit('/', 1)[0]}/data.jsonl"
    store.delete(Bucket.DATASETS, data_key)
    return {
        "id": manifest["id"],
        "kind": manifest["kind"],
        "withdrawn_sessions": sorted(set(sessions) & set(source)),
        "replacement": replacement,
        "note": note,
        "key": key,
    }


def _forget_users_in_weights(store: ObjectStore, user_ids: set[str]) -> dict[str, int]:
    """Drop the users' entries from every stored fit of per-user weights (the population fit is kept: it is an
    aggregate). Refitting is ``labeler.fit_user_weights``."""
    files = entries = 0
    for key in store.list_keys(Bucket.DATASETS, "user_weights/"):
        if not key.endswith(".json"):
            continue
        fitted = store.get_json(Bucket.DATASETS, key)
        users = fitted.get("users", {}) if isinstance(fitted, dict) else {}
        gone = sorted(set(users) & user_ids)
        if not gone:
            continue
        fitted["users"] = {u: w for u, w in users.items() if u not in user_ids}
        fitted["withdrawn_users"] = int(fitted.get("withdrawn_users", 0)) + len(gone)
        store.put_json(Bucket.DATASETS, key, fitted)
        files, entries = files + 1, entries + len(gone)
    return {"files": files, "entries_removed": entries}


def forget_sessions(
    runtime: Runtime,
    session_ids: Sequence[str],
    user_ids: Sequence[str] = (),
    requested_by: str = "",
    reason: str = "",
) -> dict[str, Any]:
    """Remove what the labeler holds of these sessions (people withdrew; chat deletes the sessions themselves):
    their labels, every dataset built from them (marked withdrawn, its data removed, rebuilt without them where
    the builder can), and the per-user weights of their users (``user_ids``, and the users named in their labels).
    Idempotent: a second run finds nothing more to remove and the same rebuilt datasets."""
    store = runtime.store
    sessions = sorted(set(session_ids))
    for session_id in sessions:
        check_session_id(session_id)
    users = set(user_ids)
    labels = 0
    for session_id in sessions:
        for key in store.list_keys(Bucket.SESSIONS, f"{session_id}/labels/"):
            try:
                owner = store.get_json(Bucket.SESSIONS, key).get("user_id")
            except (NotFound, ValueError, AttributeError):
                owner = None
            if owner:
                users.add(str(owner))
            store.delete(Bucket.SESSIONS, key)
            labels += 1
    forget = set(sessions)
    datasets = [
        _withdraw_dataset(runtime, manifest, manifest_key, sorted(forget & set(manifest.get("source_sessions", []))))
        for manifest_key, manifest in _dataset_manifests(store)
        if forget & set(manifest.get("source_sessions", []))
    ]
    weights = _forget_users_in_weights(store, users)
    # The versions trained on these sessions keep their weights (they cannot unlearn) but carry the mark, and
    # are retired when the policy says so.
    models = mark_models_withdrawn(store, sessions, retire=runtime.settings.retention.withdrawn_models == "retire")
    removed = {
        "labels": labels,
        "datasets_withdrawn": len(datasets),
        "datasets_rebuilt": sum(d["replacement"] is not None for d in datasets),
        "user_weight_entries": weights["entries_removed"],
        "models_marked": len(models),
        "models_retired": sum(bool(m["retired"]) for m in models),
    }
    audit_key = audit_deletion(
        store,
        service="labeler",
        action="forget_sessions",
        requested_by=requested_by or "labeler",
        session_ids=sessions,
        removed=removed,
        reason=reason,
    )
    log.info("forgot %d sessions: %s", len(sessions), removed)
    return {
        "session_ids": sessions,
        **removed,
        "datasets": datasets,
        "models": [m["version"] for m in models],
        "user_weights": weights,
        "audit_key": audit_key,
    }
