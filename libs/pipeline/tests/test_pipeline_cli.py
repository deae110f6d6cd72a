"""``emili pipeline run`` resolves shipped recipes through the trainer's GetRecipe, and ``emili pipeline cancel``
asks it to cancel a training run: here a stand-in trainer (the generated servicer base, no trainer code) answers,
so the CLI's client and its error messages are tested."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from emili.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from emili_core.errors import DependencyUnavailable, InvalidInput
from emili_core.objectstore import ObjectStore
from emili_pipeline import cli
from emili_pipeline.config import PipelineConfig, resolve

DPO = "name: smollm2-cpu-dpo\nkind: dpo\nmodel: {path: m.gguf}\ntrain: {epochs: 2}\ndpo: {beta: 0.1}\n"
SFT = "name: smollm2-cpu-sft\nkind: sft\nmodel: {path: m.gguf}\n"


class StandInTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def GetRecipe(self, request: trainer_pb2.GetRecipeRequest, context: grpc.ServicerContext) -> Any:
        self.asked.append((request.name, dict(context.invocation_metadata()).get("authorization", "")))
        shipped = {"smollm2-cpu-sft": SFT, "smollm2-cpu-dpo": DPO}
        if request.name not in shipped:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no shipped recipe {request.name!r}; shipped: {sorted(shipped)}")
        return trainer_pb2.GetRecipeResponse(name=request.name, yaml=shipped[request.name])

    def GetUnmeasurable(self, request: trainer_pb2.GetUnmeasurableRequest, context: grpc.ServicerContext) -> Any:
        return trainer_pb2.GetUnmeasurableResponse(reasons={"diff_epitome_mean": "no EPITOME classifiers found in X"})

    def CancelRun(self, request: trainer_pb2.CancelRunRequest, context: grpc.ServicerContext) -> Any:
        self.asked.append(("cancel", request.run_id))
        if request.run_id != "dpo-running":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"run {request.run_id} is already SUCCEEDED")
        return trainer_pb2.CancelRunResponse(run=trainer_pb2.Run(run_id=request.run_id))


@pytest.fixture
def trainer(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInTrainer]:
    servicer = StandInTrainer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setattr(cli, "_service_target", lambda service, hint: f"127.0.0.1:{port}")
    yield servicer
    server.stop(None)


def test_shipped_recipes_are_fetched_from_the_trainer(trainer: StandInTrainer, tmp_path: Path) -> None:
    resolved = resolve(PipelineConfig(), tmp_path, shared=tmp_path, fetch_recipe=cli._fetch_recipe)
    assert (resolved.recipes.sft, resolved.recipes.dpo, resolved.recipes.dpo_epochs) == (SFT, DPO, 2)
    assert [name for name, _ in trainer.asked] == ["smollm2-cpu-sft", "smollm2-cpu-dpo"]
    assert all(auth.startswith("Bearer ") for _, auth in trainer.asked)  # With a token for the trainer scope.


def test_an_unknown_recipe_is_a_clear_error(trainer: StandInTrainer, tmp_path: Path) -> None:
    config = PipelineConfig(recipes={"sft": "no-such-recipe"})  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"recipe 'no-such-recipe': no shipped recipe .*smollm2-cpu-dpo"):
        resolve(config, tmp_path, shared=tmp_path, fetch_recipe=cli._fetch_recipe)


def test_an_unreachable_trainer_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cli, "_service_target", lambda service, hint: "127.0.0.1:9")  # Nothing listens there.
    with pytest.raises(InvalidInput, match=r"cannot fetch the shipped recipe 'smollm2-cpu-sft'.*make up"):
        resolve(PipelineConfig(), tmp_path, shared=tmp_path, fetch_recipe=cli._fetch_recipe)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_a_study_whose_gate_checks_an_unmeasurable_metric_refuses_to_start(
    trainer: StandInTrainer, tmp_path: Path
) -> None:
    """Without EPITOME classifiers the gate's empathy check fails every candidate: the study says so at once (a run
    on a new machine once found out after an hour's candidate)."""
    from typer.testing import CliRunner

    from emili_pipeline.study_cli import commands

    out = tmp_path / "study"
    gate = CONFIGS / "gate-simulation-reactions.yaml"
    result = CliRunner().invoke(commands, ["study", "simulate", "--gate", str(gate), "--out", str(out)])
    assert result.exit_code == 1
    said = " ".join(result.output.split())  # Rich wraps long lines.
    assert "check empathy_not_worse: diff_epitome_mean cannot be measured: no EPITOME classifiers" in said
    assert not out.exists()  # Nothing started.


def test_the_loop_warns_of_unmeasurable_checks_and_tolerates_an_unreachable_trainer(
    trainer: StandInTrainer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from emili_pipeline.loop_cli import load_policy, warn_unmeasurable

    policy = tmp_path / "policy.yaml"
    policy.write_text(f"loop:\n  gate: {CONFIGS / 'gate-simulation-reactions.yaml'}\n")
    with caplog.at_level("WARNING"):
        assert [p.split(":")[0] for p in warn_unmeasurable(load_policy(policy))] == [
            "gate simulation-reactions, check empathy_not_worse"
        ]
    assert "every candidate will fail it" in caplog.text
    monkeypatch.setattr(cli, "_service_target", lambda service, hint: "127.0.0.1:9")  # Nothing listens there.
    with pytest.raises(DependencyUnavailable, match="cannot ask the trainer"):
        cli._fetch_unmeasurable()
    assert warn_unmeasurable(load_policy(policy)) == []  # Logged, not fatal: the loop waits for the trainer.


def test_a_trainer_without_get_unmeasurable_is_not_checked_but_said(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(trainer_pb2_grpc.TrainerServiceServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setattr(cli, "_service_target", lambda service, hint: f"127.0.0.1:{port}")
    try:
        assert cli._fetch_unmeasurable() == {}
    finally:
        server.stop(None)
    assert "predates GetUnmeasurable" in " ".join(capsys.readouterr().err.split())


@pytest.mark.integration
def test_cancel_stops_a_pipeline_and_its_training_run(
    trainer: StandInTrainer, stack_env: dict[str, str], object_store: ObjectStore
) -> None:
    from typer.testing import CliRunner

    from emili_core.settings import CommonSettings
    from emili_core.tasks import create_celery_app
    from emili_pipeline.cli import app
    from emili_pipeline.pipeline import DONE, load_state, new_state, save_state

    state = new_state(PipelineConfig(name=f"cancel-{secrets.token_hex(4)}"), ["a", "b"])
    for step in ("collect", "label", "datasets", "sft"):
        state["steps"][step] = {"state": DONE, "outputs": {}}
    # DPO is training (its task reports the run's progress); nothing after it has started.
    state["tasks"] = {"dpo": secrets.token_hex(16), "arm_sessions": secrets.token_hex(16)}
    state["attempt"] = 1
    save_state(object_store, state)
    producer = create_celery_app("tests", CommonSettings())
    producer.backend.store_result(state["tasks"]["dpo"], {"run_id": "dpo-running", "step": 3}, "PROGRESS")

    runner = CliRunner()
    result = runner.invoke(app, ["cancel", state["pipeline_id"], "--why", "trained on the wrong study"])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert "dpo, arm_sessions, delta_table, evaluate stopped" in said
    assert "its trainer run dpo-running: cancel requested" in said and ("cancel", "dpo-running") in trainer.asked
    stored = load_state(object_store, state["pipeline_id"])
    assert stored["steps"]["sft"]["state"] == DONE and stored["steps"]["dpo"]["error"].startswith("cancelled: trained")

    # Asked again: the first reason stays, and its running runs are asked to stop again.
    producer.backend.store_result(stored["tasks"]["dpo"], {"run_id": "dpo-finished"}, "PROGRESS")
    again = " ".join(runner.invoke(app, ["cancel", state["pipeline_id"]]).output.split())
    assert "was already cancelled (trained on the wrong study)" in again
    assert "dpo-finished: nothing to cancel (run dpo-finished is already SUCCEEDED)" in again
    assert load_state(object_store, state["pipeline_id"])["attempt"] == stored["attempt"]
    missing = runner.invoke(app, ["cancel", "pl-0000000000000000"])
    assert missing.exit_code == 2 and "no pipeline" in missing.output

    # A state an older pipeline left (other steps) is listed as unreadable, not a crash.
    old = {"pipeline_id": f"pl-old-{secrets.token_hex(4)}", "steps": {"train": {"state": "done"}}, "attempt": 1}
    save_state(object_store, old)
    listed = runner.invoke(app, ["list", "--unfinished", "--limit", "1000", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {r["pipeline_id"]: r for r in map(json.loads, listed.stdout.splitlines())}
    row = rows[state["pipeline_id"]]
    assert row["state"] == "cancelled: trained on the wrong study" and row["attempt"] == 2 and row["sessions"] == 2
    assert rows[old["pipeline_id"]]["state"].startswith("unreadable state (KeyError")
    table = runner.invoke(app, ["list"])
    assert table.exit_code == 0 and "pipeline(s)" in table.output
