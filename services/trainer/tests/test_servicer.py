"""The trainer's gRPC API on a real server (with auth and the error mapping), Redis and S3: status codes a
client can act on, idempotent starts, watching and cancelling runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from emili.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from emili_core.grpc_client import make_channel
from emili_core.grpc_server import ServiceApp, start_server
from emili_core.keys import dataset_index_key
from emili_core.objectstore import Bucket
from emili_labeler.datasets import DatasetManifest, jsonl_bytes
from emili_testing.plugin import token
from emili_trainer import jobs
from emili_trainer.engine import TrainerEngine
from emili_trainer.main import SERVICE_NAME
from emili_trainer.recipes import parse_recipe, shipped_recipes
from emili_trainer.servicer import TrainerServicer
from emili_trainer.settings import TrainerSettings

pytestmark = pytest.mark.integration


@pytest.fixture
async def stub(
    stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[trainer_pb2_grpc.TrainerServiceStub, list[tuple[str, str]], jobs.Runtime, str]]:
    monkeypatch.setenv("EMILI_TRAINER__WORK_DIR", str(tmp_path))
    monkeypatch.setenv("EMILI_TRAINER__SERVER__GRPC_PORT", "0")
    settings = TrainerSettings()
    runtime = jobs.build_runtime(settings)
    enqueued: list[tuple[str, str]] = []
    engine = TrainerEngine(lambda: runtime, lambda task, run_id: enqueued.append((task, run_id)), 0.05)
    servicer = TrainerServicer(engine)

    def register(server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server)

    app = ServiceApp(name="trainer", service_names=[SERVICE_NAME], register=register)
    server = await start_server(app, settings, settings.trainer.server)
    await asyncio.wait_for(server.ready.wait(), 30)
    async with make_channel(f"127.0.0.1:{server.port}", token(["trainer"])) as channel:
        yield trainer_pb2_grpc.TrainerServiceStub(channel), enqueued, runtime, f"127.0.0.1:{server.port}"
    await server.stop()


def _dataset(runtime: jobs.Runtime, records: list[dict[str, Any]]) -> str:
    manifest = DatasetManifest.build("sft", records, {"source": "test"}).to_dict()
    prefix = f"sft/{manifest['id']}"
    runtime.store.put_bytes(Bucket.DATASETS, f"{prefix}/data.jsonl", jsonl_bytes(records))
    runtime.store.put_json(Bucket.DATASETS, f"{prefix}/manifest.json", {**manifest, "key": f"{prefix}/data.jsonl"})
    runtime.store.put_json(Bucket.DATASETS, dataset_index_key(manifest["id"]), {"manifest": f"{prefix}/manifest.json"})
    return str(manifest["id"])


async def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call()
    return exc.value.code()


async def test_bad_requests_get_clear_status_codes(stub: Any) -> None:
    client = stub[0]
    start = client.StartTraining
    assert (
        await _code(lambda: start(trainer_pb2.StartTrainingRequest(dataset_id="x"))) == grpc.StatusCode.INVALID_ARGUMENT
    )
    both = trainer_pb2.StartTrainingRequest(recipe="smollm2-cpu-sft", recipe_yaml="a: 1", dataset_id="x")
    assert await _code(lambda: start(both)) == grpc.StatusCode.INVALID_ARGUMENT
    bad_yaml = trainer_pb2.StartTrainingRequest(recipe_yaml="name: x\nkind: sft\n", dataset_id="x")
    assert await _code(lambda: start(bad_yaml)) == grpc.StatusCode.INVALID_ARGUMENT
    unknown = trainer_pb2.StartTrainingRequest(recipe="no-such-recipe", dataset_id="x")
    assert await _code(lambda: start(unknown)) == grpc.StatusCode.NOT_FOUND
    missing = trainer_pb2.StartTrainingRequest(recipe="smollm2-cpu-sft", dataset_id="0" * 64)
    assert await _code(lambda: start(missing)) == grpc.StatusCode.NOT_FOUND
    get = client.GetRun
    assert await _code(lambda: get(trainer_pb2.GetRunRequest(run_id="sft-nope"))) == grpc.StatusCode.NOT_FOUND
    evaluate = trainer_pb2.StartEvaluationRequest(model_versions=["never-trained"])
    assert await _code(lambda: client.StartEvaluation(evaluate)) == grpc.StatusCode.NOT_FOUND


async def test_no_token_is_unauthenticated(stub: Any) -> None:
    async with make_channel(stub[3]) as anonymous:
        call = trainer_pb2_grpc.TrainerServiceStub(anonymous).ListModels(trainer_pb2.ListModelsRequest())
        assert await _code(lambda: call) == grpc.StatusCode.UNAUTHENTICATED


async def test_start_watch_cancel(stub: Any, conversation: list[dict[str, Any]]) -> None:
    client, enqueued, runtime, _ = stub
    dataset_id = _dataset(runtime, [{"id": "a", "session_id": "a", "messages": conversation}])
    request = trainer_pb2.StartTrainingRequest(recipe="smollm2-cpu-sft", dataset_id=dataset_id)
    first = await client.StartTraining(request)
    second = await client.StartTraining(request)
    assert first.enqueued and not second.enqueued and first.run.run_id == second.run.run_id
    assert enqueued == [("trainer.train", first.run.run_id)]  # One job for one run.
    assert first.run.state == trainer_pb2.RUN_STATE_QUEUED and first.run.recipe == "smollm2-cpu-sft"

    watch = client.WatchRun(trainer_pb2.WatchRunRequest(run_id=first.run.run_id))
    updates = [(await watch.read()).run.state]
    cancelled = await client.CancelRun(trainer_pb2.CancelRunRequest(run_id=first.run.run_id))
    assert cancelled.run.state == trainer_pb2.RUN_STATE_CANCELLED
    async for update in watch:  # The stream ends once the run is final.
        updates.append(update.run.state)
    assert updates == [trainer_pb2.RUN_STATE_QUEUED, trainer_pb2.RUN_STATE_CANCELLED]
    cancel_again = trainer_pb2.CancelRunRequest(run_id=first.run.run_id)
    assert await _code(lambda: client.CancelRun(cancel_again)) == grpc.StatusCode.FAILED_PRECONDITION


async def test_get_recipe_returns_a_shipped_recipe_by_name(stub: Any) -> None:
    client = stub[0]
    response = await client.GetRecipe(trainer_pb2.GetRecipeRequest(name="empo-7b-dpo"))
    assert (response.name, response.kind, response.epochs) == ("empo-7b-dpo", "dpo", 3)
    assert response.yaml == shipped_recipes()["empo-7b-dpo"].read_text(encoding="utf-8")  # The text as shipped.
    assert parse_recipe(response.yaml).train.epochs == 3
    assert await _code(lambda: client.GetRecipe(trainer_pb2.GetRecipeRequest())) == grpc.StatusCode.INVALID_ARGUMENT
    for name in ("no-such-recipe", "../recipes/smollm2-cpu-sft.yaml"):  # Names only: never a path on the server.
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await client.GetRecipe(trainer_pb2.GetRecipeRequest(name=name))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        assert "smollm2-cpu-dpo" in (exc.value.details() or "")  # The message lists the shipped recipes.


async def test_get_model_returns_lineage_and_the_withdrawal_mark(
    stub: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from emili_core.keys import model_registry_key
    from emili_session.loop_records import gate_key
    from emili_session.registry import mark_models_withdrawn
    from emili_trainer.cli import models_app

    client, _, runtime, target = stub
    lineage = {"datasets": [{"id": "d" * 64, "kind": "sft"}], "sessions": ["gm-ann", "gm-bo"], "parents": []}
    entry = {"version": "gm-v1", "kind": "sft", "adapter_prefix": "adapters/gm-v1/", "lineage": lineage}
    runtime.store.put_json(Bucket.MODELS, model_registry_key("gm-v1"), entry)
    mark_models_withdrawn(runtime.store, ["gm-bo"], retire=True)

    model = (await client.GetModel(trainer_pb2.GetModelRequest(version="gm-v1"))).model
    assert list(model.session_ids) == ["gm-ann", "gm-bo"] and list(model.dataset_ids) == ["d" * 64]
    assert list(model.withdrawn_session_ids) == ["gm-bo"] and model.retired
    missing = trainer_pb2.GetModelRequest(version="gm-none")
    assert await _code(lambda: client.GetModel(missing)) == grpc.StatusCode.NOT_FOUND
    assert await _code(lambda: client.GetModel(trainer_pb2.GetModelRequest())) == grpc.StatusCode.INVALID_ARGUMENT

    # The CLI, through the same server.
    monkeypatch.setenv("EMILI_TRAINER__SERVER__GRPC_PORT", target.rsplit(":", 1)[1])
    runner = CliRunner()
    # The CLI runs its own event loop: on a thread, while this test's loop keeps serving.
    shown = await asyncio.to_thread(runner.invoke, models_app, ["lineage", "gm-v1"])
    assert shown.exit_code == 0, shown.output
    assert "gm-bo (withdrawn)" in shown.output and "retired" in shown.output
    used = await asyncio.to_thread(runner.invoke, models_app, ["trained-on", "gm-ann"])
    assert used.exit_code == 0 and "gm-v1 (sft) 1 withdrawn, retired" in used.output
    assert "evaluation gate: never judged" in shown.output and model.gate_verdict_json == ""

    # The loop's gate judged it: the verdict and its numbers are part of the registry entry the trainer serves.
    check = {"name": "delta_v_gain", "metric": "delta_v", "kind": "superior", "passed": False, "n": 48}
    check |= {"estimate": 0.007, "ci": [-0.003, 0.017], "reason": "no clear gain"}
    verdict = {"policy": "simulation", "passed": False, "decided_ms": 1, "checks": [check], "pipeline_id": "pl-gm"}
    runtime.store.put_json(Bucket.MODELS, gate_key("gm-v1"), {**verdict, "version": "gm-v1"})
    model = (await client.GetModel(trainer_pb2.GetModelRequest(version="gm-v1"))).model
    assert json.loads(model.gate_verdict_json)["checks"] == [check]
    listed = (await client.ListModels(trainer_pb2.ListModelsRequest())).models
    assert [json.loads(m.gate_verdict_json)["passed"] for m in listed if m.version == "gm-v1"] == [False]
    shown = await asyncio.to_thread(runner.invoke, models_app, ["lineage", "gm-v1"])
    printed = " ".join(shown.output.split())  # Rich wraps long lines.
    assert "evaluation gate (simulation, pipeline pl-gm): failed: delta_v_gain (never served)" in printed
    assert "FAIL delta_v_gain: n 48 estimate +0.007 [-0.003, +0.017]: no clear gain" in printed
    as_json = await asyncio.to_thread(runner.invoke, models_app, ["lineage", "gm-v1", "--json"])
    assert json.loads(as_json.output)["gate_verdict"]["pipeline_id"] == "pl-gm"

    # An unreadable verdict shows as such; it does not hide the other versions.
    runtime.store.put_json(Bucket.MODELS, model_registry_key("gm-v2"), entry | {"version": "gm-v2"})
    runtime.store.put_json(Bucket.MODELS, gate_key("gm-v2"), ["not", "a", "verdict"])
    listed = (await client.ListModels(trainer_pb2.ListModelsRequest())).models
    verdicts = {m.version: json.loads(m.gate_verdict_json) for m in listed if m.version.startswith("gm-")}
    assert verdicts["gm-v1"]["pipeline_id"] == "pl-gm" and "unreadable" in verdicts["gm-v2"]


async def test_get_unmeasurable_names_the_gate_metrics_this_trainer_cannot_give(
    stub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _, runtime, _ = stub
    empty = tmp_path / "no-classifiers"
    monkeypatch.setattr(runtime.settings.trainer, "epitome_dir", empty)
    monkeypatch.setattr(runtime.settings.trainer, "mmlu_path", None)
    response = await client.GetUnmeasurable(trainer_pb2.GetUnmeasurableRequest())
    assert set(response.reasons) == {"diff_epitome_mean", "mmlu_correct"}
    assert str(empty) in response.reasons["diff_epitome_mean"]
