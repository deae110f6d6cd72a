"""The pipeline steps the labeler worker runs (``labeler.pipeline_label``, ``_datasets``, ``_delta_table``).

Each is a plain function of this service's runtime and the pipeline state returning the step's outputs (small
JSON); :mod:`emili_labeler.tasks` runs them through :func:`emili_pipeline.pipeline.run_step_task`. All are
idempotent: labels are keyed by settings hash and datasets by their content.
"""

from __future__ import annotations

from typing import Any

from emili_core.errors import FailedPrecondition, InvalidInput, NotFound
from emili_labeler.datasets import DEFAULT_CUT_REPLIES, DEFAULT_PAIR_SELECTION, DEFAULT_PAIRS_PER_CONTEXT
from emili_labeler.gold import GoldLabel
from emili_labeler.jobs import (
    Runtime,
    build_dpo_dataset,
    build_sft_dataset,
    gate_items,
    label_session,
    signal_evidence,
)
from emili_labeler.jobs import delta_table as table_of
from emili_pipeline.pipeline import State, config_of, outputs


def label(runtime: Runtime, state: State) -> dict[str, Any]:
    flagged = turns = labelled = 0
    failed: dict[str, str] = {}
    missing_gold: dict[str, list[str]] = {}
    skipped = 0
    labels = []
    for session_id in state["sessions"]:
        try:
            result = label_session(runtime, session_id)
        except FailedPrecondition:
            skipped += 1  # No consent to training: no label.
            continue
        except (InvalidInput, NotFound, ValueError) as exc:  # One bad record must not stop the rest.
            failed[session_id] = str(exc)
            continue
        labelled += 1
        labels.append(result)
        if missing := GoldLabel.from_json(result["gold"]).missing:
            missing_gold[session_id] = missing
        turns += len(result["turns"])
        flagged += sum(1 for t in result["turns"] if t["flagged"])
    notes = [f"{skipped} sessions without training consent skipped"] if skipped else []
    if missing_gold:
        notes.append(f"{len(missing_gold)} sessions have no pre- or post-chat VAD (nothing scorable in a survey)")
    return {
        "labelled": labelled,
        "failed": failed,
        "assistant_turns": turns,
        "flagged_turns": flagged,
        "skipped_no_training_consent": skipped,
        "missing_gold": len(missing_gold),
        "missing_gold_sessions": missing_gold,
        "notes": notes,
        "settings_hash": runtime.settings_hash,
        # For the gate's "associated" check: does the feedback the loop learns from predict what people report?
        "gate_evidence": signal_evidence(labels),
    }


def _dataset_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "kind", "counts", "key")
    return {k: manifest[k] for k in keep if k in manifest}


def datasets(runtime: Runtime, state: State) -> dict[str, Any]:
    """The SFT dataset (``sft_source``): the training share's flagged turns, or EmPO's first stage on
    EmpatheticDialogues; and one DPO dataset (``dpo_source``): feedback pairs from the same sessions, or EmPO pairs
    from EmpatheticDialogues; what could not be built says why."""
    config = config_of(state)
    train = state["train_sessions"]
    result: dict[str, Any] = {"notes": []}
    ed_configured = runtime.settings.labeler.empathetic_dialogues is not None
    cut_replies = config.cut_replies or DEFAULT_CUT_REPLIES
    try:
        if config.sft_source == "empathetic" and not ed_configured:
            raise NotFound("sft_source is empathetic and EMILI_LABELER__EMPATHETIC_DIALOGUES is not set")
        sft = build_sft_dataset(
            runtime,
            train,
            source=config.sft_source,
            delta_share=config.sft_delta_share or 1.0,
            cut_replies=cut_replies,
        )
        result["sft"] = {**_dataset_summary(sft), "source": config.sft_source}
        if "split" in sft.get("label_settings", {}):
            result["sft"]["split"] = sft["label_settings"]["split"]  # Which EmpatheticDialogues split was used.
        if sft.get("skipped_no_training_consent"):
            result["notes"].append(f"{sft['skipped_no_training_consent']} sessions without training consent skipped")
    except NotFound as exc:
        result["sft"] = None
        result["notes"].append(f"no SFT dataset: {exc}; DPO starts from the base model")
    sources = {"feedback": ["feedback"], "empathetic": ["empathetic"], "auto": ["feedback", "empathetic"]}
    result["dpo"] = None
    for source in sources[config.dpo_source]:
        if source == "empathetic" and not ed_configured:
            result["notes"].append("no EmPO pairs: EMILI_LABELER__EMPATHETIC_DIALOGUES is not set")
            continue
        # EmPO pairs: one fresh rejected draw for each epoch the DPO recipe trains (the pipeline config's
        # resolve() read it from the recipe, so the labeler needs nothing of the trainer's).
        epochs = config.recipes.require_dpo_epochs() if source == "empathetic" else 1
        sessions = train if source == "feedback" else None
        cap = config.pairs_per_context or DEFAULT_PAIRS_PER_CONTEXT  # The config's, else the labeler's default.
        selection = config.pair_selection or DEFAULT_PAIR_SELECTION
        try:
            manifest = build_dpo_dataset(
                runtime,
                source,
                sessions,
                seed=config.seed,
                epochs=epochs,
                max_pairs_per_context=cap,
                selection=selection,
                margin_share=config.pair_margin_share or 1.0,
                cut_replies=cut_replies,
            )
        except NotFound as exc:
            result["notes"].append(f"no {source} DPO pairs: {exc}")
            continue
        result["dpo"] = {**_dataset_summary(manifest), "source": source}
        if "split" in manifest.get("label_settings", {}):
            result["dpo"]["split"] = manifest["label_settings"]["split"]
        break
    if result["dpo"] is None:
        result["notes"].append("DPO is skipped")
    return result


def delta_table(runtime: Runtime, state: State) -> dict[str, Any]:
    """Table 2 over the sessions of the arms (or, without them, the collected sessions), and the same sessions'
    per-session Delta v and per-reply negative reactions by arm, the evaluation gate's online evidence."""
    arms = outputs(state, "arm_sessions").get("arms") or {}
    sessions = [s for ids in arms.values() for s in ids] or state["sessions"]
    return {"table": table_of(runtime, sessions), "sessions": sessions, "gate_items": gate_items(runtime, sessions)}
