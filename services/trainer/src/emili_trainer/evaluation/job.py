"""The evaluation run: base model vs fine-tuned adapters on the same held-out prompts, and the report.

Contexts come from EmpatheticDialogues' test split (when configured; the last listener reply is the
reference, as in EmPO; the first ``max_examples`` dialogues, or all 2,547 with ``empathetic_full``) and from
held-out recorded sessions (each assistant turn's context, with the reply that was given as the reference).
Every arm answers the same contexts: greedily by default, so differences come from the adapters, not from
sampling; with ``seeds``, once per seed with sampling, and the report gives each metric's mean ± sd over seeds
and the paired bootstrap difference of each arm from the base over the same contexts (:mod:`.paired`).
Table 1 is computed from the ratings given through the chat API; sessions made by the user simulator are
marked synthetic and are never pooled with real ones unless ``pool_synthetic`` asks for it (contexts from
recorded sessions are split the same way). Table 2 is the labeler's Delta-VAD table, passed in by the
pipeline. With ``gate`` (the pipeline's candidate, its production baseline and the labeled sessions' online
items) the report also holds the evaluation gate's evidence for the candidate (:mod:`.gate_evidence`). The
report (report.json, report.md and PNG plots) goes to ``emili-models/runs/<run_id>/report/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emili_core.errors import FailedPrecondition, InvalidInput, NotFound
from emili_core.keys import run_prefix
from emili_core.objectstore import Bucket
from emili_core.records import load_session, recorded_sessions
from emili_session.conversation import conversation_messages, system_prompt_of
from emili_session.events import Rating, payloads_of
from emili_session.registry import download_adapter, registered_model
from emili_trainer import jobs
from emili_trainer.evaluation.gate_evidence import ArmItems, gate_evidence
from emili_trainer.evaluation.metrics import ReplyRow, reference_perplexity, reply_metrics, word_counts
from emili_trainer.evaluation.mmlu import run_mmlu
from emili_trainer.evaluation.paired import paired_report
from emili_trainer.evaluation.report import build_report, render_markdown, render_plots
from emili_trainer.evaluation.scorers import ReplyScorers, build_scorers
from emili_trainer.recipes import load_recipe
from emili_trainer.runs import RunLocked, RunRecord, RunState
from emili_trainer.training import Progress, load_base_model

log = logging.getLogger(__name__)

BASE = "base"
DEFAULT_MAX_EXAMPLES = 32
DEFAULT_BASE_RECIPE = "smollm2-cpu-sft"  # Names the base model when only "base" is evaluated.
GENERATION_BATCH = 8
EVAL_DEFAULTS: dict[str, Any] = {"seeds": [], "empathetic_full": False, "pool_synthetic": False}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def start_evaluation(
    runtime: jobs.Runtime,
    versions: Sequence[str],
    *,
    max_examples: int | None = None,
    session_ids: Sequence[str] = (),
    rating_session_ids: Sequence[str] | None = None,
    delta_table: dict[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
    empathetic_full: bool | None = None,
    pool_synthetic: bool | None = None,
    gate: Mapping[str, Any] | None = None,
) -> tuple[RunRecord, bool]:
    """Queue (or find) the evaluation of ``versions`` against the base model.

    ``seeds`` (sampled generation, one pass per seed), ``empathetic_full`` (every EmpatheticDialogues test
    dialogue) and ``pool_synthetic`` (pool synthetic and real sessions) default to the trainer's settings.
    ``gate`` (``{"candidate": version | None, "baseline": arm, "online": the labeler's gate_items | None}``) asks
    for the evaluation gate's evidence; the baseline must be among the evaluated arms.
    """
    arms = [BASE, *sorted({v for v in versions if v and v != BASE})]
    for arm in arms[1:]:
        registered_model(runtime.store, arm)  # NotFound names the version.
    if gate is not None:
        gate = {"candidate": gate.get("candidate"), "baseline": str(gate["baseline"]), "online": gate.get("online")}
        if gate["baseline"] not in arms or (gate["candidate"] is not None and gate["candidate"] not in arms):
            raise InvalidInput(f"the gate compares {gate['candidate']} with {gate['baseline']}: evaluate both ({arms})")
    limit = max_examples or DEFAULT_MAX_EXAMPLES
    if limit < 1:
        raise InvalidInput(f"max_examples must be positive, not {limit}")
    options = runtime.settings.trainer
    chosen_seeds = [int(s) for s in (seeds if seeds is not None else options.eval_seeds)]
    if len(set(chosen_seeds)) != len(chosen_seeds):
        raise InvalidInput(f"seeds must differ, got {chosen_seeds}")
    eval_options: dict[str, Any] = {
        "seeds": chosen_seeds,
        "empathetic_full": bool(options.eval_empathetic_full if empathetic_full is None else empathetic_full),
        "pool_synthetic": bool(options.eval_pool_synthetic if pool_synthetic is None else pool_synthetic),
    }
    # Only options that differ from the defaults enter the id: runs requested before they existed keep theirs.
    changed = {k: v for k, v in eval_options.items() if v != EVAL_DEFAULTS[k]}
    request = {
        "arms": arms,
        "max_examples": limit,
        "session_ids": sorted(session_ids),
        "rating_session_ids": sorted(rating_session_ids) if rating_session_ids is not None else None,
        "delta_table": delta_table,
        **({"eval_options": changed} if changed else {}),
        **({"gate": gate} if gate is not None else {}),  # Absent: the ids of runs without a gate stay the same.
    }
    record = RunRecord(
        run_id=f"eval-{_digest(request)[:16]}",  # The request dict's digest: ids of earlier runs stay the same.
        kind="eval",
        arms=tuple(arms),
        max_examples=limit,
        session_ids=tuple(sorted(session_ids)),
        rating_session_ids=tuple(sorted(rating_session_ids)) if rating_session_ids is not None else None,
        delta_table=delta_table,
        # RunRecord keeps keys it does not know, so they are stored.
        extra={"eval_options": eval_options, **({"gate": gate} if gate is not None else {})},
    )
    return jobs.create_or_requeue(runtime, record)


def eval_options_of(record: RunRecord) -> dict[str, Any]:
    """The run's evaluation options; a run stored before they existed gets the defaults."""
    stored = record.extra.get("eval_options")
    return {**EVAL_DEFAULTS, **(stored if isinstance(stored, dict) else {})}


# --- contexts ------------------------------------------------------------------------------------------------


def empathetic_rows(folder: Path | None, limit: int | None) -> list[ReplyRow]:
    """The first ``limit`` test dialogues (by conv_id; None: all of them): context before the last listener
    reply, and that reply."""
    if folder is None:
        return []
    from emili_affect.empathetic import load_dialogues

    path = Path(folder) / "test.csv"
    if not path.is_file():
        raise FailedPrecondition(f"EmpatheticDialogues test split not found at {path}")
    dialogues, _ = load_dialogues(path, split="test")
    chosen = sorted(dialogues, key=lambda d: d.conv_id)[:limit]
    return [ReplyRow(d.context_messages(), d.target, "") for d in chosen]


def session_rows(runtime: jobs.Runtime, session_ids: Sequence[str], limit: int) -> list[ReplyRow]:
    """Each prompted assistant turn of the held-out sessions: what the model saw, and the reply it gave."""
    rows: list[ReplyRow] = []
    for session_id in session_ids:
        _, events = load_session(runtime.store, session_id)
        messages = conversation_messages(system_prompt_of(events), events)
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and i > 0 and messages[i - 1]["role"] == "user":
                context = [{"role": m["role"], "content": m["content"]} for m in messages[:i]]
                rows.append(ReplyRow(context, message["content"], ""))
            if len(rows) >= limit:
                return rows
    return rows


def session_synthetic(runtime: jobs.Runtime, session_id: str) -> bool:
    """Whether the session was made by the user simulator (its manifest's ``synthetic`` flag)."""
    manifest, _ = load_session(runtime.store, session_id)
    return bool(manifest.get("synthetic", False))


def sessions_by_origin(
    runtime: jobs.Runtime, session_ids: Sequence[str], pool: bool
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The held-out sessions grouped as contexts sources ("sessions", or "real sessions" and "synthetic
    sessions" apart), and how many were real and synthetic."""
    groups: dict[str, list[str]] = {}
    counts = {"real": 0, "synthetic": 0}
    for session_id in session_ids:
        origin = "synthetic" if session_synthetic(runtime, session_id) else "real"
        counts[origin] += 1
        groups.setdefault("sessions" if pool else f"{origin} sessions", []).append(session_id)
    return groups, counts


def session_ratings(runtime: jobs.Runtime, session_ids: Sequence[str] | None) -> list[dict[str, Any]]:
    """The rating of each session (the last one submitted: a resubmission replaces it), with its arm and whether
    the session was synthetic (Table 1's input)."""
    ratings = []
    for session_id in session_ids if session_ids is not None else recorded_sessions(runtime.store):
        try:
            manifest, events = load_session(runtime.store, session_id)
        except NotFound:
            continue
        arm = str(manifest.get("model_arm") or BASE)
        submitted = list(payloads_of(events, Rating))
        if submitted:
            rating = submitted[-1]
            ratings.append(
                {
                    "model_arm": arm,
                    "empathy": rating.empathy,
                    "relevance": rating.relevance,
                    "fluency": rating.fluency,
                    "synthetic": bool(manifest.get("synthetic", False)),
                }
            )
    return ratings


# --- generation ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _arm(model: PeftModel | PreTrainedModel, arm: str) -> Iterator[PreTrainedModel]:
    if arm == BASE:
        if isinstance(model, PeftModel):
            with model.disable_adapter():
                yield model  # type: ignore[misc]
        else:
            yield model
    else:
        assert isinstance(model, PeftModel)
        model.set_adapter(arm)
        yield model  # type: ignore[misc]


def generate_replies(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[Any],
    max_new_tokens: int,
    seed: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> list[str]:
    """Replies in batches with left padding (the prompt ends where generation starts): greedy without a seed,
    sampled (``temperature``, ``top_p``) from that seed with one."""
    replies: list[str] = []
    tokenizer.padding_side = "left"
    sampling: dict[str, Any] = {"do_sample": False}
    if seed is not None:
        torch.manual_seed(seed)  # The same seed and contexts give the same replies, whatever ran before.
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    for start in range(0, len(contexts), GENERATION_BATCH):
        batch = contexts[start : start + GENERATION_BATCH]
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
            )
        new = output[:, inputs["input_ids"].shape[1] :]
        replies += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return replies


# --- the run -------------------------------------------------------------------------------------------------


def execute_evaluation(
    runtime: jobs.Runtime,
    run_id: str,
    delta_table: dict[str, Any] | None = None,
    progress: jobs.ProgressSink = lambda p: None,
) -> RunRecord:
    record = runtime.runs.get(run_id)
    if record.final:
        return record
    try:
        with runtime.runs.lock(run_id):
            return _evaluate_locked(runtime, run_id, delta_table, progress)
    except RunLocked as exc:
        return runtime.runs.get(run_id).with_note(str(exc))


def _evaluate_locked(
    runtime: jobs.Runtime, run_id: str, delta_table: dict[str, Any] | None, progress: jobs.ProgressSink
) -> RunRecord:
    runs = runtime.runs
    record = runs.get(run_id)
    if record.final:
        return record
    if runs.cancel_requested(run_id):
        return jobs.record_cancelled(runs, run_id)
    runs.update(run_id, state=RunState.RUNNING, attempts=record.attempts + 1)
    runs.mirror(run_id)
    try:
        report = _evaluate(runtime, run_id, record, delta_table or record.delta_table, progress)
    except _Cancelled:
        return jobs.record_cancelled(runs, run_id)
    except (InvalidInput, FailedPrecondition, NotFound) as exc:
        runs.update(run_id, state=RunState.FAILED, error=str(exc))
        runs.mirror(run_id)
        raise
    summary = {arm: {k: m.get(k) for k in ("n", "bleu", "distinct_2")} for arm, m in report["reply_metrics"].items()}
    runs.update(run_id, state=RunState.SUCCEEDED, report_prefix=report_prefix(run_id), metrics=summary)
    runs.mirror(run_id)
    return runs.get(run_id)


def report_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}/report"


def _load_arms(runtime: jobs.Runtime, arms: Sequence[str], work: Path) -> tuple[PreTrainedTokenizerBase, Any]:
    manifests = [registered_model(runtime.store, arm) for arm in arms if arm != BASE]
    bases = {m["base_model"] for m in manifests}
    if len(bases) > 1:
        raise InvalidInput(f"the arms were trained on different base models ({sorted(bases)}); compare one base")
    recipe = load_recipe(DEFAULT_BASE_RECIPE)
    if manifests:
        from emili_trainer.recipes import Recipe

        recipe = Recipe(**manifests[0]["recipe"])
    tokenizer, model = load_base_model(recipe, runtime.artifacts_dir, runtime.settings.trainer.model_cache_dir)
    model.config.use_cache = True
    if recipe.device != "cpu" and torch.cuda.is_available():
        model.to(torch.device("cuda"))  # type: ignore[arg-type]  # functools.wraps hides to()'s signature.
    peft: Any = model
    for manifest in manifests:
        folder = download_adapter(runtime.store, manifest["version"], work / manifest["version"])
        if isinstance(peft, PeftModel):
            peft.load_adapter(str(folder), adapter_name=manifest["version"])
        else:
            peft = PeftModel.from_pretrained(model, str(folder), adapter_name=manifest["version"])
    peft.eval()
    return tokenizer, peft


class _Cancelled(Exception):
    """The run's cancel was requested (``CancelRun``) while it generated replies."""


def _evaluate(
    runtime: jobs.Runtime,
    run_id: str,
    record: RunRecord,
    delta_table: Mapping[str, Any] | None,
    progress: jobs.ProgressSink,
) -> dict[str, Any]:
    if record.arms is None or record.max_examples is None:
        raise FailedPrecondition(f"run {run_id} is a {record.kind} run, not an evaluation")
    options = runtime.settings.trainer
    limit = record.max_examples
    eval_options = eval_options_of(record)
    session_groups, context_sessions = sessions_by_origin(
        runtime, record.session_ids or (), eval_options["pool_synthetic"]
    )
    sources = {
        "empathetic": empathetic_rows(options.empathetic_dialogues, None if eval_options["empathetic_full"] else limit),
        **{group: session_rows(runtime, ids, limit) for group, ids in sorted(session_groups.items())},
    }
    sources = {name: rows for name, rows in sources.items() if rows}
    if not sources:
        raise FailedPrecondition(
            "no evaluation contexts: set EMILI_TRAINER__EMPATHETIC_DIALOGUES or pass held-out session ids"
        )
    arms = list(record.arms)
    seeds: list[int | None] = list(eval_options["seeds"]) or [None]  # None: one greedy pass.
    total = len(arms) * len(seeds) * sum(len(rows) for rows in sources.values())
    done, started = 0, time.perf_counter()
    scorers = _scorers(runtime)
    with tempfile.TemporaryDirectory(prefix="emili-eval-") as tmp:
        tokenizer, model = _load_arms(runtime, arms, Path(tmp))
        reply_results: dict[str, Any] = {}
        perplexity: dict[str, Any] = {}
        samples: dict[str, Any] = {}
        items = {arm: ArmItems() for arm in arms}  # The gate's offline items, per arm over every source.
        # source -> arm -> one list of replies per seed, for the paired comparison.
        by_seed: dict[str, dict[str, list[list[str]]]] = {source: {} for source in sources}
        for arm in arms:
            with _arm(model, arm) as active:
                for source, rows in sources.items():
                    name = f"{arm} · {source}" if len(sources) > 1 else arm
                    runs = []
                    for seed in seeds:
                        runs.append(
                            generate_replies(
                                active,
                                tokenizer,
                                [r.context for r in rows],
                                options.eval_max_new_tokens,
                                seed=seed,
                                temperature=options.eval_temperature,
                                top_p=options.eval_top_p,
                            )
                        )
                        done += len(rows)
                        progress(Progress(done, total, 0.0, tokens_per_second=None))
                        runtime.runs.update(run_id, step=done, total=total)
                        if runtime.runs.cancel_requested(run_id):  # Checked after each set of replies.
                            raise _Cancelled
                    by_seed[source][arm] = runs
                    replies = runs[0]  # The reply metrics below are the first seed's; paired covers all seeds.
                    scored = [ReplyRow(r.context, reply, r.reply) for r, reply in zip(rows, replies, strict=True)]
                    # Without EmPO's ED train+valid counts, NIDF is relative to this source's references.
                    counts = scorers.corpus_counts or word_counts([r.reference for r in scored])
                    reply_results[name] = reply_metrics(scored, **(scorers.kwargs() | {"corpus_counts": counts}))
                    # Per-row values are gate evidence, not a reply metric: they leave the metrics table.
                    epitome = dict(reply_results[name]["diff_epitome"])
                    reply_results[name]["diff_epitome"] = {k: v for k, v in epitome.items() if k != "per_row"}
                    items[arm].add(replies, epitome)
                    perplexity[name] = reference_perplexity(active, tokenizer, scored)
                    samples[name] = [{"reply": s.reply, "reference": s.reference} for s in scored[:5]]
        if options.mmlu_path is None:
            mmlu = run_mmlu(model, tokenizer, mmlu_path=None)  # Says why it was skipped.
        else:
            mmlu = _mmlu(model, tokenizer, arms, options.mmlu_path, options.mmlu_subjects)
    paired = {
        source: paired_report(
            by_seed[source],
            [r.reply for r in rows],
            seeds,
            base=BASE,
            embed=scorers.embed,
            samples=options.eval_bootstrap_samples,
        )
        for source, rows in sources.items()
        if len(arms) > 1
    }
    gate = record.extra.get("gate")
    report = build_report(
        {
            "title": f"EMILI evaluation {run_id}: {' vs '.join(arms)}",
            "ratings": session_ratings(runtime, record.rating_session_ids),
            "delta_table": delta_table,
            "reply_metrics": reply_results,
            "perplexity": perplexity,
            "mmlu": mmlu,
            "paired": paired,
            "context_sessions": context_sessions if record.session_ids else None,
            "pool_synthetic": eval_options["pool_synthetic"],
            "gate": None if not isinstance(gate, Mapping) else _gate(gate, items, mmlu, list(sources)),
        }
    )
    report["eval_options"] = eval_options
    report["samples"] = samples
    report["contexts"] = {name: len(rows) for name, rows in sources.items()}
    report["wall_seconds"] = time.perf_counter() - started
    _publish_report(runtime, run_id, report)
    return report


def _gate(gate: Mapping[str, Any], items: Mapping[str, ArmItems], mmlu: Any, sources: list[str]) -> dict[str, Any]:
    found = gate_evidence(gate.get("candidate"), str(gate["baseline"]), items, mmlu, gate.get("online"))
    return {**found.to_json(), "context_sources": sources}


def _mmlu(
    model: Any, tokenizer: Any, arms: Sequence[str], path: Path, subjects: Sequence[str] | None = None
) -> dict[str, Any]:
    results = {}
    for arm in arms:
        with _arm(model, arm) as active:
            results[arm] = run_mmlu(active, tokenizer, mmlu_path=path, subjects=subjects)
    return results


def _scorers(runtime: jobs.Runtime) -> ReplyScorers:
    return build_scorers(runtime.settings.trainer, runtime.settings.artifacts_dir)


def _publish_report(runtime: jobs.Runtime, run_id: str, report: dict[str, Any]) -> None:
    prefix = report_prefix(run_id)
    with tempfile.TemporaryDirectory(prefix="emili-report-") as tmp:
        folder = Path(tmp)
        (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (folder / "report.md").write_text(render_markdown(report))
        render_plots(report, folder / "plots")
        runtime.store.put_folder(Bucket.MODELS, prefix, folder)


@dataclass(frozen=True)
class Report:
    markdown: str  # report.md
    report: dict[str, Any]  # report.json
    plot_keys: tuple[str, ...]  # The PNG plots (bucket models).


def load_report(runtime: jobs.Runtime, run_id: str) -> Report:
    """report.md, report.json and the plot keys of a finished evaluation run."""
    record = runtime.runs.get(run_id)
    if record.kind != "eval":
        raise InvalidInput(f"run {run_id} is a {record.kind} run, not an evaluation")
    if record.state != RunState.SUCCEEDED:
        raise FailedPrecondition(f"evaluation {run_id} is {record.state}; its report exists once it succeeds")
    prefix = report_prefix(run_id)
    return Report(
        markdown=runtime.store.get_bytes(Bucket.MODELS, f"{prefix}/report.md").decode(),
        report=dict(runtime.store.get_json(Bucket.MODELS, f"{prefix}/report.json")),
        plot_keys=tuple(k for k in runtime.store.list_keys(Bucket.MODELS, f"{prefix}/plots/") if k.endswith(".png")),
    )
