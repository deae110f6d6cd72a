"""Run records: every record the trainer has stored so far reads back, and is written back unchanged."""

from __future__ import annotations

from typing import Any

import pytest

from emili.trainer.v1 import trainer_pb2
from emili_trainer.codec import run_to_pb
from emili_trainer.runs import RunRecord, RunState

# As the trainer wrote them before RunRecord existed (json values of the Redis hash, and run.json).
TRAINING_DONE: dict[str, Any] = {
    "kind": "sft",
    "state": "succeeded",
    "recipe": {"name": "smollm2-cpu-sft", "kind": "sft", "model": {"path": "chat/model"}},
    "recipe_source": "smollm2-cpu-sft",
    "dataset_id": "d" * 64,
    "dataset_kind": "sft",
    "init_version": None,
    "attempts": 2,
    "run_id": "sft-0123456789abcdef",
    "created_ms": 1_790_000_000_000,
    "updated_ms": 1_790_000_100_000,
    "resumed_from_step": 4,
    "error": None,
    "step": 60,
    "epoch": 1.0,
    "loss": 1.25,
    "learning_rate": 1e-4,
    "tokens_per_second": 812.5,
    "tokens_seen": 48_000,
    "total": 60,
    "model_version": "sft-0123456789abcdef",
    "metrics": {"train_loss": 1.3, "steps": 60},
}
EVAL_QUEUED: dict[str, Any] = {
    "kind": "eval",
    "state": "queued",
    "arms": ["base", "sft-0123456789abcdef"],
    "max_examples": 32,
    "session_ids": [],
    "rating_session_ids": None,
    "delta_table": None,
    "attempts": 0,
    "run_id": "eval-0123456789abcdef",
    "created_ms": 1_790_000_000_000,
}

ZEROS = {"step": 0, "total": 0, "resumed_from_step": 0, "updated_ms": 0}


@pytest.mark.parametrize("stored", [TRAINING_DONE, EVAL_QUEUED], ids=["training", "evaluation"])
def test_stored_records_round_trip(stored: dict[str, Any]) -> None:
    record = RunRecord.from_json(stored)
    written = record.to_json()
    # Every stored value is written back as it was; nulls are left out (null and absent read the same), and
    # counters a queued run has not set yet are written as their zero.
    assert {k: v for k, v in stored.items() if v is not None}.items() <= written.items()
    assert {k: v for k, v in written.items() if k not in stored} in ({}, ZEROS)
    assert RunRecord.from_json(record.to_json()) == record


def test_typed_fields() -> None:
    done = RunRecord.from_json(TRAINING_DONE)
    assert done.state is RunState.SUCCEEDED and done.final
    assert (done.attempts, done.resumed_from_step, done.step, done.total) == (2, 4, 60, 60)
    assert done.init_version is None and done.error is None and done.arms is None
    queued = RunRecord.from_json(EVAL_QUEUED)
    assert not queued.final and queued.arms == ("base", "sft-0123456789abcdef") and queued.session_ids == ()
    assert queued.rating_session_ids is None and queued.recipe is None
    assert (queued.step, queued.updated_ms, queued.loss) == (0, 0, None)


def test_unknown_keys_survive_and_notes_are_not_stored() -> None:
    record = RunRecord.from_json({**EVAL_QUEUED, "written_by": "a later trainer", "note": "stale"})
    assert record.extra == {"written_by": "a later trainer"} and record.note is None
    assert record.to_json()["written_by"] == "a later trainer"
    assert record.with_note("locked elsewhere").to_json()["note"] == "locked elsewhere"


def test_a_record_of_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        RunRecord.from_json({**EVAL_QUEUED, "kind": "distill"})


def test_run_message() -> None:
    run = run_to_pb(RunRecord.from_json(TRAINING_DONE))
    assert run.state == trainer_pb2.RUN_STATE_SUCCEEDED and run.recipe == "smollm2-cpu-sft"
    assert (run.step, run.total_steps, run.attempts, run.resumed_from_step) == (60, 60, 2, 4)
    assert run.loss == 1.25 and run.init_version == "" and run.error == ""
    queued = run_to_pb(RunRecord.from_json(EVAL_QUEUED))
    assert not queued.HasField("loss") and queued.metrics_json == "{}" and queued.model_version == ""
