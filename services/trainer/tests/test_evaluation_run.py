"""The evaluation run end to end on a tiny model with real Redis and S3: base vs a trained adapter on the
contexts of held-out recorded sessions (one real, one made by the simulator: kept apart), two sampling seeds
with the paired comparison, Table 1 from the ratings, the report and its plots in S3."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from emili_core.keys import session_record_keys
from emili_core.objectstore import Bucket
from emili_trainer import jobs
from emili_trainer.evaluation import job as evaluation
from emili_trainer.recipes import Recipe
from emili_trainer.runs import RunState
from emili_trainer.settings import TrainerSettings
from emili_trainer.training import train_sft

pytestmark = pytest.mark.integration


def record_session(runtime: jobs.Runtime, session_id: str, arm: str, synthetic: bool = False) -> None:
    events: list[dict[str, Any]] = []

    def add(kind: str, **payload: Any) -> None:
        events.append({"event_id": f"{len(events)}-0", "kind": kind, "time_ms": 1000 * len(events), "payload": payload})

    add("session_created", model_arm=arm, system_prompt="You are EMILI.")
    add("user_message", text="I failed my exam today.")
    add("assistant_message", text="I'm sorry. How are you feeling?", turn_id="t1", unprompted=False)
    add("user_message", text="Sad, but I'll retake it.")
    add("assistant_message", text="That's a brave plan.", turn_id="t2", unprompted=False)
    add("rating", empathy=4, relevance=5, fluency=3, comment="")
    keys = session_record_keys(session_id)
    lines = "".join(json.dumps(e) + "\n" for e in events).encode()
    runtime.store.put_bytes(Bucket.SESSIONS, keys["events.jsonl"], lines)
    manifest = {"session_id": session_id, "model_arm": arm, **({"synthetic": True} if synthetic else {})}
    runtime.store.put_json(Bucket.SESSIONS, keys["session.json"], manifest)


def test_base_vs_adapter_report(
    stack_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tokenizer: PreTrainedTokenizerBase,
    conversation: list[dict[str, Any]],
    make_model: Callable[..., Any],
    make_recipe: Callable[..., Recipe],
) -> None:
    monkeypatch.setenv("EMILI_TRAINER__WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("EMILI_TRAINER__EVAL_MAX_NEW_TOKENS", "6")
    runtime = jobs.build_runtime(TrainerSettings())
    recipe = make_recipe("smollm2-cpu-sft", max_steps=3)
    trained = train_sft(recipe, tokenizer, make_model(), [{"id": "a", "messages": conversation}], tmp_path / "sft")
    version = "sft-evaltest"
    jobs.publish_model(
        runtime.store,
        version,
        trained.adapter_dir,
        {"kind": "sft", "base_model": recipe.model.path, "recipe": recipe.to_dict()},
    )
    record_session(runtime, "eval-held-out", arm=version)
    record_session(runtime, "eval-simulated", arm=version, synthetic=True)
    held_out = ["eval-held-out", "eval-simulated"]

    with pytest.raises(Exception, match="not registered"):
        evaluation.start_evaluation(runtime, ["never-trained"])
    with pytest.raises(Exception, match="seeds must differ"):
        evaluation.start_evaluation(runtime, [version], session_ids=held_out, seeds=[1, 1])
    # The pipeline asks for the gate's evidence: the candidate against the production arm (here the base model),
    # with the online items of the arms' labelled sessions.
    online = {
        version: {"synthetic": {"sessions": 1, "delta_v": [0.25], "negative_reaction": [0.0, 1.0]}},
        "base": {"synthetic": {"sessions": 1, "delta_v": [0.0], "negative_reaction": [1.0]}},
    }
    gate = {"candidate": version, "baseline": "base", "online": online}
    with pytest.raises(Exception, match="evaluate both"):
        evaluation.start_evaluation(runtime, [version], session_ids=held_out, gate={**gate, "baseline": "prod"})
    record, enqueue = evaluation.start_evaluation(
        runtime, [version], session_ids=held_out, rating_session_ids=held_out, seeds=[0, 1], gate=gate
    )
    assert enqueue and record.arms == ("base", version)
    assert evaluation.eval_options_of(record) == {"seeds": [0, 1], "empathetic_full": False, "pool_synthetic": False}
    done = evaluation.execute_evaluation(runtime, record.run_id)
    assert done.state == RunState.SUCCEEDED, done

    report = evaluation.load_report(runtime, record.run_id)
    data = report.report
    # Contexts of real and simulated sessions are never pooled: one source each.
    assert data["contexts"] == {"real sessions": 2, "synthetic sessions": 2}
    assert data["sessions"]["contexts"] == {"real": 1, "synthetic": 1}
    assert set(data["reply_metrics"]) == {
        f"{arm} · {source}" for arm in ("base", version) for source in ("real sessions", "synthetic sessions")
    }
    for metrics in data["reply_metrics"].values():
        assert metrics["n"] == 2  # Both prompted turns of the held-out session, for each arm.
        assert metrics["bleu"] is not None and "distinct_1" in metrics  # A random model's words may be empty.
    assert all(p > 1 for p in data["perplexity"].values())
    real_row, simulated_row = (
        data["ratings_table"][f"{version} · real"],
        data["ratings_table"][f"{version} · synthetic"],
    )
    assert real_row["n"] == 1 and real_row["empathy"]["mean"] == 4 and simulated_row["synthetic"] == 1
    assert (data["synthetic_sessions"], data["real_sessions"]) == (1, 1)
    paired = data["paired"]["real sessions"]
    assert paired["seeds"] == [0, 1] and paired["n_contexts"] == 2
    bleu = paired["metrics"]["bleu"]
    assert len(bleu["arms"]["base"]["per_seed"]) == 2 and set(bleu["vs_base"]) == {version}
    assert 0.0 < bleu["vs_base"][version]["p_value"] <= 1.0
    assert "skipped" in data["mmlu"]  # No local MMLU copy here: said so, not faked.
    evidence = data["gate"]["evidence"]
    assert data["gate"]["candidate"] == version and data["gate"]["baseline"] == "base"
    # Four contexts (two sources of two turns), the same for both arms; the first seed's replies.
    assert len(evidence["reply_words"]["candidate"]) == len(evidence["reply_words"]["baseline"]) == 4
    assert evidence["reply_words"]["paired"] and evidence["delta_v"] == {
        "candidate": [0.25],
        "baseline": [0.0],
        "paired": False,
    }
    assert data["gate"]["origins"]["negative_reaction"] == "synthetic"
    assert "skipped" in data["gate"]["missing"]["mmlu_correct"]
    # DIFF-EPITOME needs the project's classifiers: per context when they are there, else said why.
    assert ("diff_epitome_mean" in evidence) != ("diff_epitome_mean" in data["gate"]["missing"])
    assert all("per_row" not in m["diff_epitome"] for m in data["reply_metrics"].values())
    assert (
        "## Evaluation gate evidence" in report.markdown and "synthetic sessions (simulated users)" in report.markdown
    )
    assert "Table 1: ratings from human and simulated users, in separate rows" in report.markdown
    assert "Paired differences from the base model" in report.markdown and version in report.markdown
    assert report.plot_keys and all(k.endswith(".png") for k in report.plot_keys)
    again, enqueue_again = evaluation.start_evaluation(
        runtime, [version], session_ids=held_out, rating_session_ids=held_out, seeds=[0, 1], gate=gate
    )
    assert not enqueue_again and again.run_id == record.run_id
    greedy, _ = evaluation.start_evaluation(runtime, [version], session_ids=held_out, rating_session_ids=held_out)
    assert greedy.run_id != record.run_id  # Options that differ from the defaults are part of the run's id.

    # Cancelled after its first set of replies (``CancelRun``, as `emili pipeline cancel` asks): no report; asked
    # again, it runs from the start.
    def cancel_at_first_batch(p: Any) -> None:
        jobs.cancel_run(runtime, greedy.run_id)

    cancelled = evaluation.execute_evaluation(runtime, greedy.run_id, progress=cancel_at_first_batch)
    assert cancelled.state == RunState.CANCELLED and cancelled.step < cancelled.total
    assert not runtime.store.list_keys(Bucket.MODELS, evaluation.report_prefix(greedy.run_id))
    retried, enqueue_retry = evaluation.start_evaluation(
        runtime, [version], session_ids=held_out, rating_session_ids=held_out
    )
    assert enqueue_retry and retried.run_id == greedy.run_id

    # Cancelled, then asked for again before the cancel took effect (a pipeline resumed soon after it was
    # cancelled): it goes on.
    def cancel_then_ask_again(p: Any) -> None:
        if p.step == 2:  # After the first set of replies.
            jobs.cancel_run(runtime, greedy.run_id)
            evaluation.start_evaluation(runtime, [version], session_ids=held_out, rating_session_ids=held_out)

    assert evaluation.execute_evaluation(runtime, greedy.run_id, progress=cancel_then_ask_again).state == (
        RunState.SUCCEEDED
    )


SHARED_ED = Path(__file__).resolve().parents[4] / "shared" / "data" / "empatheticdialogues"


@pytest.mark.skipif(not (SHARED_ED / "test.csv").is_file(), reason="EmpatheticDialogues is not in ../shared/data")
def test_empathetic_test_contexts() -> None:
    rows = evaluation.empathetic_rows(SHARED_ED, 5)
    assert len(rows) == 5
    for row in rows:
        assert isinstance(row.context, list) and row.context[-1]["role"] == "user"  # The reply answers the speaker.
        assert row.reply.strip() and "_comma_" not in row.reply  # The gold last listener reply, cleaned.
    assert evaluation.empathetic_rows(None, 5) == []
    everything = evaluation.empathetic_rows(SHARED_ED, None)  # The full-size option.
    assert len(everything) > 2000 and everything[:5] == rows
