"""The trainer's commands: ``emili train``, ``emili evaluate``, ``emili report``, ``emili eval-replies`` and
``emili trainer runs|models|cancel``. They talk to the running trainer service over gRPC."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from emili.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from emili_core.grpc_client import make_channel
from emili_core.settings import load_settings
from emili_trainer.evaluation.cli import eval_replies_command, show_report
from emili_trainer.settings import TrainerSettings

app = typer.Typer(help="Training runs, models and evaluation reports.", no_args_is_help=True)
models_app = typer.Typer(help="Registered model versions and what they learned from.", no_args_is_help=True)
commands = typer.Typer()  # Top-level commands (emili train, emili report, ...).
commands.command("eval-replies")(eval_replies_command)
console = Console()

STATE_NAMES = {v: k.removeprefix("RUN_STATE_").lower() for k, v in trainer_pb2.RunState.items()}
FINAL = {trainer_pb2.RUN_STATE_SUCCEEDED, trainer_pb2.RUN_STATE_FAILED, trainer_pb2.RUN_STATE_CANCELLED}


def _channel(target: str | None) -> grpc.aio.Channel:
    from emili_core.cli import CliSettings, client_token

    settings = load_settings(TrainerSettings)
    token = client_token(load_settings(CliSettings), "trainer")
    return make_channel(target or settings.grpc_target(), token, tls=settings.tls)


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(2)


async def _call(target: str | None, fn: Any) -> Any:
    async with _channel(target) as channel:
        try:
            return await fn(trainer_pb2_grpc.TrainerServiceStub(channel))
        except grpc.aio.AioRpcError as exc:
            raise _fail(f"{exc.code().name}: {exc.details()}") from None


async def _watch(stub: trainer_pb2_grpc.TrainerServiceStub, run_id: str) -> trainer_pb2.Run:
    """Follow a run with a progress bar (step, loss, lr, tokens/s) until it ends."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
    )
    last = trainer_pb2.Run()
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(run_id, total=None, stats="queued")
        stream: AsyncIterator[trainer_pb2.WatchRunResponse] = stub.WatchRun(trainer_pb2.WatchRunRequest(run_id=run_id))
        async for update in stream:
            run = last = update.run
            stats = [STATE_NAMES[run.state]]
            if run.HasField("loss"):
                stats.append(f"loss {run.loss:.4f}")
            if run.HasField("learning_rate"):
                stats.append(f"lr {run.learning_rate:.2e}")
            if run.HasField("tokens_per_second"):
                stats.append(f"{run.tokens_per_second:,.0f} tok/s")
            if run.resumed_from_step:
                stats.append(f"resumed at {run.resumed_from_step}")
            bar.update(task, total=run.total_steps or None, completed=run.step, stats=" · ".join(stats))
    return last


def _finish(run: trainer_pb2.Run) -> None:
    state = STATE_NAMES[run.state]
    if run.state == trainer_pb2.RUN_STATE_SUCCEEDED:
        what = f"model version [bold]{run.model_version}[/bold]" if run.model_version else f"report {run.report_prefix}"
        console.print(f"run {run.run_id} succeeded: {what}")
        return
    console.print(f"run {run.run_id} {state}" + (f": {run.error}" if run.error else ""))
    raise typer.Exit(1)


@commands.command("train")
def train(
    recipe: Annotated[str, typer.Argument(help="A shipped recipe (e.g. smollm2-cpu-sft) or a recipe YAML file.")],
    dataset: Annotated[str, typer.Option(help="Dataset version id built by the labeler.")],
    init: Annotated[str | None, typer.Option(help="DPO: start from this registered (SFT) model version.")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the run with a progress bar until it ends.")] = True,
    target: Annotated[str | None, typer.Option(help="Trainer gRPC address; default from settings.")] = None,
) -> None:
    """Start a LoRA SFT or DPO run on the trainer queue (the same request twice is the same run)."""
    path = Path(recipe)
    request = trainer_pb2.StartTrainingRequest(dataset_id=dataset, init_version=init or "")
    if path.suffix in (".yaml", ".yml") and path.is_file():
        request.recipe_yaml = path.read_text(encoding="utf-8")
    else:
        request.recipe = recipe

    async def go(stub: trainer_pb2_grpc.TrainerServiceStub) -> trainer_pb2.Run:
        started: trainer_pb2.StartTrainingResponse = await stub.StartTraining(request)
        note = "started" if started.enqueued else f"already exists ({STATE_NAMES[started.run.state]})"
        console.print(f"run {started.run.run_id} {note}")
        return await _watch(stub, started.run.run_id) if wait else started.run

    run = asyncio.run(_call(target, go))
    if wait:
        _finish(run)


@commands.command("evaluate")
def evaluate(
    version: Annotated[list[str], typer.Option("--version", help="Model versions to compare with base.")],
    session: Annotated[list[str] | None, typer.Option("--session", help="Held-out session ids.")] = None,
    max_examples: Annotated[int, typer.Option(help="Contexts per source.")] = 0,
    wait: Annotated[bool, typer.Option(help="Follow the run until it ends.")] = True,
    target: Annotated[str | None, typer.Option(help="Trainer gRPC address; default from settings.")] = None,
) -> None:
    """Evaluate base vs fine-tuned versions on the same held-out contexts; the report lands in object storage."""
    request = trainer_pb2.StartEvaluationRequest(
        model_versions=version, session_ids=session or [], max_examples=max_examples
    )

    async def go(stub: trainer_pb2_grpc.TrainerServiceStub) -> trainer_pb2.Run:
        started: trainer_pb2.StartEvaluationResponse = await stub.StartEvaluation(request)
        console.print(f"evaluation {started.run.run_id} {'started' if started.enqueued else 'already exists'}")
        return await _watch(stub, started.run.run_id) if wait else started.run

    run = asyncio.run(_call(target, go))
    if wait:
        _finish(run)


def fetch_report(run_id: str, out: Path, target: str | None = None) -> str:
    """An evaluation run's report.md, with report.json and the plots downloaded into ``out``."""
    from emili_core.objectstore import Bucket, ObjectStore

    async def go(stub: trainer_pb2_grpc.TrainerServiceStub) -> trainer_pb2.GetReportResponse:
        response: trainer_pb2.GetReportResponse = await stub.GetReport(trainer_pb2.GetReportRequest(run_id=run_id))
        return response

    report: trainer_pb2.GetReportResponse = asyncio.run(_call(target, go))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report.markdown, encoding="utf-8")
    (out / "report.json").write_text(report.report_json, encoding="utf-8")
    store = ObjectStore(load_settings(TrainerSettings).s3)
    for key in report.plot_keys:
        store.get_file(Bucket.MODELS, key, out / "plots" / Path(key).name)
    return report.markdown


@commands.command("report")
def report(
    run: Annotated[str, typer.Argument(help="An evaluation run id, or a local report/results JSON or folder.")],
    out: Annotated[Path | None, typer.Option(help="Where to save report.md, report.json and plots.")] = None,
    target: Annotated[str | None, typer.Option(help="Trainer gRPC address; default from settings.")] = None,
) -> None:
    """Show an evaluation report (Tables 1 and 2, reply metrics, MMLU) and save it with its plots."""
    local = Path(run)
    if local.exists():
        show_report(local, out, console)
        return
    folder = out or load_settings(TrainerSettings).artifacts_dir.parent / "reports" / run
    console.print(Markdown(fetch_report(run, folder, target)))
    console.print(f"\nreport and plots saved in {folder}")


@app.command("runs")
def runs(run_id: Annotated[str, typer.Argument(help="A run id.")]) -> None:
    """Print a run's record as JSON."""

    async def go(stub: trainer_pb2_grpc.TrainerServiceStub) -> trainer_pb2.Run:
        response: trainer_pb2.GetRunResponse = await stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id))
        return response.run

    from google.protobuf.json_format import MessageToDict

    print(json.dumps(MessageToDict(asyncio.run(_call(None, go))), indent=2))


@app.command("cancel")
def cancel(run_id: Annotated[str, typer.Argument(help="A run id.")]) -> None:
    """Cancel a queued or running run (training stops after its current optimiser step, an evaluation after its
    current set of replies: one arm's to one source's contexts, with one seed)."""

    async def go(stub: trainer_pb2_grpc.TrainerServiceStub) -> trainer_pb2.Run:
        response: trainer_pb2.CancelRunResponse = await stub.CancelRun(trainer_pb2.CancelRunRequest(run_id=run_id))
        return response.run

    run = asyncio.run(_call(None, go))
    console.print(f"run {run.run_id}: {STATE_NAMES[run.state]} (cancel requested)")


@app.command("models")
@models_app.command("list")
def models() -> None:
    """The registered model versions (what chat sessions can use as model_arm)."""

    async def go(stub: trainer_pb2_grpc.TrainerServiceStub) -> trainer_pb2.ListModelsResponse:
        response: trainer_pb2.ListModelsResponse = await stub.ListModels(trainer_pb2.ListModelsRequest())
        return response

    table = Table("version", "kind", "dataset", "from", "sessions", "train loss", "gate", "withdrawals")
    for m in asyncio.run(_call(None, go)).models:
        loss = json.loads(m.metrics_json or "{}").get("train_loss")
        table.add_row(
            m.version,
            m.kind,
            m.dataset_id[:12],
            m.init_version,
            str(len(m.session_ids)),
            f"{loss:.4f}" if loss else "",
            _gate_note(m),
            _withdrawal_note(m),
        )
    console.print(table)


def _gate_verdict(model: trainer_pb2.Model) -> dict[str, Any] | None:
    return dict(json.loads(model.gate_verdict_json)) if model.gate_verdict_json else None


def _gate_note(model: trainer_pb2.Model) -> str:
    """The gate's verdict in a few words: passed, failed (which checks), or blank when never judged."""
    verdict = _gate_verdict(model)
    if verdict is None:
        return ""
    if verdict.get("unreadable"):
        return f"unreadable ({verdict['unreadable']})"
    if verdict.get("passed"):
        return "passed"
    failed = [str(c.get("name")) for c in verdict.get("checks", []) if not c.get("passed")]
    return f"failed: {', '.join(failed)} (never served)"


def _withdrawal_note(model: trainer_pb2.Model) -> str:
    if not model.withdrawn_session_ids:
        return ""
    return f"{len(model.withdrawn_session_ids)} withdrawn" + (", retired" if model.retired else "")


@models_app.command("trained-on")
def trained_on(session_id: Annotated[str, typer.Argument(help="A recorded session's id.")]) -> None:
    """The model versions that learned from SESSION_ID (through their datasets or the versions they started from)."""

    async def go(stub: trainer_pb2_grpc.TrainerServiceStub) -> trainer_pb2.ListModelsResponse:
        response: trainer_pb2.ListModelsResponse = await stub.ListModels(trainer_pb2.ListModelsRequest())
        return response

    found = [m for m in asyncio.run(_call(None, go)).models if session_id in m.session_ids]
    if not found:
        console.print(f"no registered model version learned from {session_id}")
    for m in found:
        console.print(f"{m.version} ({m.kind}) {_withdrawal_note(m)}".rstrip())


@models_app.command("lineage")
def lineage(
    version: Annotated[str, typer.Argument(help="A registered model version.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a summary.")] = False,
) -> None:
    """What VERSION learned from: datasets, recorded sessions, the versions it started from, and withdrawals."""

    async def go(stub: trainer_pb2_grpc.TrainerServiceStub) -> trainer_pb2.GetModelResponse:
        response: trainer_pb2.GetModelResponse = await stub.GetModel(trainer_pb2.GetModelRequest(version=version))
        return response

    m = asyncio.run(_call(None, go)).model
    found = {
        "version": m.version,
        "kind": m.kind,
        "base_model": m.base_model,
        "datasets": list(m.dataset_ids),
        "parent_versions": list(m.parent_versions),
        "sessions": list(m.session_ids),
        "withdrawn_sessions": list(m.withdrawn_session_ids),
        "retired": m.retired,
        "gate_verdict": _gate_verdict(m),
    }
    if as_json:
        print(json.dumps(found, indent=2))
        return
    console.print(f"[bold]{m.version}[/bold] ({m.kind}, base {m.base_model})")
    console.print(f"datasets: {', '.join(m.dataset_ids) or '-'}")
    console.print(f"started from: {' <- '.join(m.parent_versions) or 'the base model'}")
    console.print(f"recorded sessions learned from: {len(m.session_ids)}")
    for session_id in m.session_ids:
        mark = " (withdrawn)" if session_id in m.withdrawn_session_ids else ""
        console.print(f"  {session_id}{mark}")
    if m.withdrawn_session_ids:
        state = "retired: not served" if m.retired else "still served (policy: mark)"
        console.print(f"[yellow]{len(m.withdrawn_session_ids)} of them were withdrawn; {state}[/yellow]")
    verdict = found["gate_verdict"]
    if verdict is None:
        console.print("evaluation gate: never judged (not a candidate of the automatic loop)")
        return
    console.print(
        f"evaluation gate ({verdict.get('policy')}, pipeline {verdict.get('pipeline_id', '-')}): {_gate_note(m)}"
    )
    for check in verdict.get("checks", []):
        estimate = check.get("estimate")
        shown = "" if estimate is None else f" estimate {estimate:+.3g}"
        interval = f" [{check['ci'][0]:+.3g}, {check['ci'][1]:+.3g}]" if check.get("ci") else ""
        mark = "pass" if check.get("passed") else "FAIL"
        console.print(f"  {mark} {check.get('name')}: n {check.get('n')}{shown}{interval}: {check.get('reason')}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
