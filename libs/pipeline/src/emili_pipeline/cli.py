"""``emili pipeline``: simulated users and the end-to-end pipeline."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from emili_core.auth import create_token
from emili_core.logs import configure_logging
from emili_core.settings import load_settings

app = typer.Typer(help="Simulated users, the collect-label-train-evaluate pipeline, load tests.", no_args_is_help=True)
console = Console(stderr=True)
_T = TypeVar("_T")


@app.callback()
def main() -> None:
    """Simulated users, the collect-label-train-evaluate pipeline, load tests."""


def _service_target(service: str, hint: str) -> str:
    """A service's gRPC address from its settings (found through its ``emili.services`` entry point)."""
    from emili_core.settings import service_settings_classes

    classes = service_settings_classes()
    if service not in classes:
        raise typer.BadParameter(f"the {service} service is not installed; {hint}")
    return load_settings(classes[service]).grpc_target()


def _chat_target() -> str:
    return _service_target("chat", "pass --target HOST:PORT")


def _trainer_target(trainer_target: str, hint: str) -> str:
    """``trainer_target``, else the address in the installed trainer's settings; ``hint`` says what to do when no
    trainer is installed."""
    return trainer_target or _service_target("trainer", hint)


def _call_trainer(call: Callable[[Any], Awaitable[_T]], target: str) -> _T:
    """``call(stub)`` on the trainer at ``target``, with the CLI's token and TLS."""
    from emili.trainer.v1 import trainer_pb2_grpc
    from emili_core.cli import CliSettings, client_token
    from emili_core.grpc_client import make_channel

    cli_settings = load_settings(CliSettings)
    token = client_token(cli_settings, "trainer", "emili-pipeline")

    async def run() -> _T:
        async with make_channel(target, token, tls=cli_settings.tls) as channel:
            return await call(trainer_pb2_grpc.TrainerServiceStub(channel))

    return asyncio.run(run())


def _fetch_recipe(name: str, trainer_target: str = "") -> str:
    """A shipped recipe's YAML text, from the trainer's ``GetRecipe`` (the trainer owns its recipes)."""
    import grpc

    from emili.trainer.v1 import trainer_pb2
    from emili_core.errors import InvalidInput

    async def call(stub: Any) -> str:
        response: trainer_pb2.GetRecipeResponse = await stub.GetRecipe(trainer_pb2.GetRecipeRequest(name=name))
        return response.yaml

    target = _trainer_target(trainer_target, "name recipe files in the pipeline config instead of shipped recipes")
    try:
        return _call_trainer(call, target)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            raise InvalidInput(f"recipe {name!r}: {exc.details()}") from None
        raise InvalidInput(
            f"cannot fetch the shipped recipe {name!r} from the trainer at {target} ({exc.code().name}: "
            f"{exc.details()}); is the stack up (make up)?"
        ) from None


def _fetch_unmeasurable(trainer_target: str = "") -> dict[str, str]:
    """The gate metrics the trainer's evaluations cannot measure, and why (the trainer's ``GetUnmeasurable``)."""
    import grpc

    from emili.trainer.v1 import trainer_pb2
    from emili_core.errors import DependencyUnavailable

    async def call(stub: Any) -> dict[str, str]:
        response: trainer_pb2.GetUnmeasurableResponse = await stub.GetUnmeasurable(trainer_pb2.GetUnmeasurableRequest())
        return dict(response.reasons)

    target = _trainer_target(trainer_target, "a gate's evidence comes from the trainer's evaluations")
    try:
        return _call_trainer(call, target)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # A trainer older than this client: it cannot say.
            console.print(
                "[yellow]warning:[/yellow] the trainer predates GetUnmeasurable (restart it to update): "
                "not checked whether the gate's metrics can be measured"
            )
            return {}
        raise DependencyUnavailable(
            f"cannot ask the trainer at {target} what its evaluations measure ({exc.code().name}: {exc.details()})"
        ) from None


@app.command()
def simulate(
    users: Annotated[int, typer.Option(min=1, help="Simulated users (sessions).")] = 1,
    concurrency: Annotated[int, typer.Option(min=1, help="Sessions at once.")] = 1,
    turns: Annotated[int | None, typer.Option(min=1, help="User messages per session.")] = None,
    arm: Annotated[str | None, typer.Option(help="Model arm: 'base' or a model version id.")] = None,
    faces: Annotated[
        Path | None, typer.Option(exists=True, help="Labelled faces (class folders or an NPZ); default: FER readings.")
    ] = None,
    personas: Annotated[str, typer.Option(help="'builtin', a JSON/YAML file, or ed:PATH (EmpatheticDialogues).")] = (
        "builtin"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the run: same seed and replies, same users.")] = 0,
    seconds_between_turns: Annotated[float | None, typer.Option(min=0.0, help="Pause after each reply.")] = None,
    fps: Annotated[float | None, typer.Option(min=0.0, help="Face inputs per second.")] = None,
    target: Annotated[str | None, typer.Option(help="Chat server address (default from the chat settings).")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write every session's outcome here (JSON lines).")] = None,
) -> None:
    """Run simulated users against the running chat service; prints a JSON summary (exit 1 if any failed)."""
    from emili_core.cli import CliSettings
    from emili_pipeline.settings import PipelineSettings
    from emili_pipeline.simulator import load_personas, run_users, summarize

    settings = load_settings(PipelineSettings)
    configure_logging("pipeline", settings.log_level, settings.log_format)
    overrides: dict[str, Any] = {
        "turns": turns,
        "model_arm": arm,
        "faces": faces,
        "seconds_between_turns": seconds_between_turns,
        "frames_per_second": fps,
    }
    simulator = settings.pipeline.simulator.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    try:
        cast = load_personas(personas)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"--personas {personas}: {exc}") from None
    cli = load_settings(CliSettings)
    fixed = cli.token.get_secret_value() if cli.token is not None else None
    secret = settings.auth.secret.get_secret_value()

    def token_for(subject: str) -> str:
        # EMILI_TOKEN (one caller for every user) wins; otherwise each simulated user is its own subject.
        if fixed is not None:
            return fixed
        return create_token(secret, subject, ["chat"], settings.auth.default_ttl_seconds, settings.auth.issuer)

    started = time.perf_counter()
    outcomes = asyncio.run(
        run_users(users, concurrency, target or _chat_target(), cast, simulator, seed, token_for=token_for)
    )
    summary = summarize(outcomes, time.perf_counter() - started)
    if out is not None:
        out.write_text("".join(json.dumps(o.to_dict()) + "\n" for o in outcomes))
        summary["outcomes"] = str(out)
    print(json.dumps(summary, indent=2))
    if summary["failed"]:
        raise typer.Exit(1)


# --- the pipeline: collect, then the canvas -------------------------------------------------------------------


def _producer() -> tuple[Any, Any]:
    from emili_core.objectstore import ObjectStore
    from emili_core.tasks import create_celery_app
    from emili_pipeline.settings import PipelineSettings

    settings = load_settings(PipelineSettings)
    store = ObjectStore(settings.s3)
    store.ensure_buckets()
    return create_celery_app("pipeline", settings), store


def _status_table(pipeline: str, views: list[Any], status: str) -> Any:
    from rich.table import Table

    colours = {"done": "green", "running": "yellow", "retrying": "yellow", "failed": "red", "queued": "cyan"}
    table = Table(title=f"pipeline {pipeline}: {status}", title_justify="left")
    for column in ("step", "what", "state", "time", "detail"):
        table.add_column(column, overflow="fold")
    for v in views:
        colour = colours.get(v.state, "white")
        seconds = f"{v.seconds:.0f} s" if v.seconds is not None else ""
        table.add_row(v.name, v.title, f"[{colour}]{v.state}[/{colour}]", seconds, v.detail)
    return table


def _follow(app: Any, store: Any, state: dict[str, Any], timeout_s: float | None) -> tuple[str, dict[str, Any]]:
    from rich.live import Live

    from emili_pipeline.orchestrate import Watcher

    watcher = Watcher(app, store, state)
    with Live(_status_table(watcher.pipeline_id, [], "submitted"), console=console, refresh_per_second=2) as live:
        status = watcher.wait(
            timeout_s, on_poll=lambda views, s: live.update(_status_table(watcher.pipeline_id, views, s))
        )
    for r in watcher.resubmissions:
        console.print(f"[yellow]step {r['step']}: {r['why']}; it was resubmitted[/yellow]")
    return status, watcher.state


def _print_report(store: Any, state: dict[str, Any], reports_dir: Path) -> None:
    from rich.markdown import Markdown

    from emili_pipeline.orchestrate import download_report
    from emili_pipeline.pipeline import model_arms, outputs

    run_id = outputs(state, "evaluate").get("run_id")
    if not run_id:
        console.print("[red]the pipeline has no evaluation report[/red]")
        return
    folder = reports_dir / run_id
    markdown, plots = download_report(store, run_id, folder)
    console.print(Markdown(markdown))
    arms = ", ".join(f"{label} = {arm}" for label, arm in model_arms(state).items())
    console.print(f"\narms: {arms}")
    notes = outputs(state, "datasets").get("notes") or []
    for note in notes:
        console.print(f"note: {note}")
    console.print(f"report: {folder / 'report.md'}")
    for plot in plots:
        console.print(f"plot: {plot}")


def _gateway_client() -> tuple[Any, dict[str, str]]:
    """An HTTP client for the gateway's root URL with an admin token, and the links its settings name (the
    participant app). Its address comes from its settings class, found through its ``emili.services`` entry point
    like every service's; nothing of the gateway is imported."""
    import httpx
    from pydantic import ValidationError

    from emili_core.cli import CliSettings, client_token
    from emili_core.settings import service_settings_classes
    from emili_pipeline.study import StudyUnavailable

    classes = service_settings_classes()
    if "gateway" not in classes:
        raise StudyUnavailable("the gateway is not installed")
    try:
        settings = classes["gateway"]()
    except ValidationError as exc:
        raise StudyUnavailable(f"the gateway's settings are not valid: {exc}") from None
    url = settings.http_url()
    if url is None:
        raise StudyUnavailable("the gateway's settings name no HTTP address")
    token = client_token(load_settings(CliSettings), "admin", "emili-pipeline")
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0)
    return http, settings.links()


def _print_demo_study(state: dict[str, Any]) -> None:
    """Beside the report: the participant app's address and an invite link to a study of base vs the trained
    model (created once, then reused). Never fails the run: when the gateway cannot be asked, says why."""
    from rich.markup import escape

    from emili_pipeline.study import StudyUnavailable, demo_arms, ensure_demo_study

    arms = demo_arms(state)
    try:
        http, links = _gateway_client()
        with http:
            demo = ensure_demo_study(http, arms)
    except StudyUnavailable as exc:
        console.print(f"[yellow]no demo study for people to try: {escape(str(exc))}[/yellow]")
        return
    except Exception as exc:  # The report is already out: a surprise here must not turn the run into a failure.
        console.print(f"[yellow]no demo study for people to try: {type(exc).__name__}: {escape(str(exc))}[/yellow]")
        return
    lines = [f"{what}: {url}" for what, url in links.items()]
    reused = " (reused)" if demo.reused_study else ""
    note = "" if len(arms) > 1 else "; the pipeline trained no model, so base only"
    lines.append(f"demo study {demo.study_id}{reused}: {escape(demo.name)}{note}")
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(demo.invite_expires_ms / 1000))
    lines.append(f"invite link ({demo.invite_uses_left} more people, until {until}): {demo.invite_url}")
    lines.append(f"follow it: emili study progress {demo.study_id}; export: emili study export {demo.study_id}")
    for line in lines:
        console.print(line, soft_wrap=True)  # Links stay whole, to be copied.


def _reports_dir() -> Path:
    from emili_core.settings import REPO_ROOT

    return REPO_ROOT / "var" / "reports"


@app.command()
def run(
    config_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Pipeline config YAML.")],
    target: Annotated[str | None, typer.Option(help="Chat server address (default from the chat settings).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up following after this many seconds.")] = None,
    study: Annotated[
        bool,
        typer.Option(help="After the report, a gateway study of base vs the trained model and an invite link."),
    ] = True,
) -> None:
    """Collect simulated sessions, run the canvas (label, datasets, SFT, DPO, arms, Table 2, evaluation), show
    live status, print the report (and, with the gateway running, an invite link for people to try the models)."""
    from emili_core.errors import InvalidInput
    from emili_pipeline.config import load_config, resolve
    from emili_pipeline.orchestrate import submit
    from emili_pipeline.pipeline import new_state, save_state
    from emili_pipeline.settings import PipelineSettings
    from emili_pipeline.simulator import load_personas, run_users, summarize

    settings = load_settings(PipelineSettings)
    configure_logging("pipeline", "WARNING", settings.log_format)
    started = time.perf_counter()
    try:
        config = resolve(load_config(config_file), config_file.resolve().parent, fetch_recipe=_fetch_recipe)
        simulator = config.simulator_settings(settings.pipeline.simulator)
        cast = load_personas(config.personas, config.persona_limit)
    except (InvalidInput, OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    secret = settings.auth.secret.get_secret_value()
    faces = f", faces {config.faces}" if config.faces else ", FER readings"
    console.print(
        f"collecting: {config.users} simulated users ({config.concurrency} at a time, personas {config.personas}"
        f"{faces}) talking to arm {config.arm}"
    )

    def token_for(subject: str) -> str:
        return create_token(secret, subject, ["chat"], settings.auth.default_ttl_seconds, settings.auth.issuer)

    outcomes = asyncio.run(
        run_users(
            config.users,
            config.concurrency,
            target or _chat_target(),
            cast,
            simulator,
            config.seed,
            token_for=token_for,
        )
    )
    summary = summarize(outcomes, time.perf_counter() - started)
    console.print(
        f"collected {summary['ok']} sessions ({summary['failed']} failed) in {summary['wall_s']:.0f} s; "
        f"ttft p50 {summary['ttft_s']['p50']} s"
    )
    if not summary["sessions"]:
        console.print("[red]no session was created; is the stack up (make up)?[/red]")
        raise typer.Exit(1)
    collected = {k: summary[k] for k in ("ok", "failed", "wall_s", "turns", "ttft_s", "mean_ratings", "errors")}
    state = new_state(config, summary["sessions"], collected)
    app_, store = _producer()
    save_state(store, state)
    console.print(
        f"pipeline {state['pipeline_id']}: {len(state['train_sessions'])} training sessions, "
        f"{len(state['heldout_sessions'])} held out"
    )
    state = submit(app_, store, state)
    status, state = _follow(app_, store, state, timeout)
    if status != "succeeded":
        console.print(
            f"[red]pipeline {state['pipeline_id']} {status}[/red]; `emili pipeline resume {state['pipeline_id']}`"
        )
        raise typer.Exit(1)
    _print_report(store, state, _reports_dir())
    if study:
        _print_demo_study(state)
    console.print(f"pipeline {state['pipeline_id']} finished in {time.perf_counter() - started:.0f} s")


@app.command()
def status(
    pipeline: Annotated[str, typer.Argument(help="A pipeline id (pl-...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the stored state as JSON.")] = False,
) -> None:
    """A pipeline's stored state: each step's state and outputs."""
    from emili_core.errors import NotFound
    from emili_pipeline.pipeline import STEPS, load_state

    _, store = _producer()
    try:
        state = load_state(store, pipeline)
    except NotFound as exc:
        raise typer.BadParameter(str(exc)) from None
    if as_json:
        print(json.dumps(state, indent=2))
        return
    from emili_pipeline.orchestrate import recorded_view, summary

    views = [recorded_view(step.name, step.title, state) for step in STEPS]
    console.print(_status_table(pipeline, views, f"attempt {state.get('attempt')}, {summary(state)}"))


@app.command("list")
def list_pipelines(
    unfinished: Annotated[bool, typer.Option(help="Only those not finished (running, failed or cancelled).")] = False,
    limit: Annotated[int, typer.Option(min=1, help="The most recently updated this many.")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="Print them as JSON lines.")] = False,
) -> None:
    """Stored pipelines, most recently updated first: where each stands (e.g. to find one left running by a stopped
    study, and cancel it)."""
    from rich.table import Table

    from emili_core.objectstore import Bucket
    from emili_pipeline.orchestrate import summary
    from emili_pipeline.pipeline import first_unfinished, load_state

    _, store = _producer()
    ids = sorted({k.split("/")[1] for k in store.list_keys(Bucket.MODELS, "pipelines/") if k.endswith("/state.json")})
    rows: list[dict[str, Any]] = []
    for pipeline in ids:
        state = load_state(store, pipeline)
        config: dict[str, Any] = state["config"] if isinstance(state.get("config"), dict) else {}
        try:
            where, done = summary(state), first_unfinished(state) is None
        except (KeyError, TypeError, AttributeError) as exc:  # A state from an older pipeline (other steps).
            where, done = f"unreadable state ({type(exc).__name__}: {exc})", False
        if unfinished and done:
            continue
        rows.append(
            {
                "pipeline_id": pipeline,
                "config": str(config.get("name", "")),
                "sessions": len(state.get("sessions") or []),
                "baseline": str(config.get("baseline", "base")),
                "attempt": int(state.get("attempt") or 0),
                "updated_ms": int(state.get("updated_ms") or 0),
                "state": where,
            }
        )
    rows.sort(key=lambda row: int(row["updated_ms"]), reverse=True)
    found, rows = len(rows), rows[:limit]
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    table = Table("config", "sessions", "baseline", "attempt", "updated (UTC)", "state")
    table.columns[0].overflow = "fold"
    table.add_column("pipeline", no_wrap=True)  # Whole, to copy into `status`, `resume` or `cancel`.
    for row in rows:
        updated = time.strftime("%Y-%m-%d %H:%M", time.gmtime(row["updated_ms"] / 1000))
        values = (row["config"], row["sessions"], row["baseline"], row["attempt"], updated, row["state"])
        table.add_row(*map(str, values), row["pipeline_id"])
    console.print(table)
    console.print(f"{len(rows)} of {found} pipeline(s)")


@app.command()
def resume(
    pipeline: Annotated[str, typer.Argument(help="A pipeline id (pl-...).")],
    step: Annotated[str | None, typer.Option(help="Resubmit from this step (default: the first not done).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up following after this many seconds.")] = None,
) -> None:
    """Resubmit a pipeline from its first unfinished step (finished work is found, not redone), follow it, and
    print the report."""
    from emili_core.errors import NotFound
    from emili_pipeline.orchestrate import submit
    from emili_pipeline.pipeline import STEP_NAMES, is_finished, load_state

    app_, store = _producer()
    try:
        state = load_state(store, pipeline)
    except NotFound as exc:
        raise typer.BadParameter(str(exc)) from None
    if step is not None and step not in STEP_NAMES:
        raise typer.BadParameter(f"--step must be one of {', '.join(STEP_NAMES)}")
    if step is not None or not is_finished(state):
        state = submit(app_, store, state, from_step=step)
        status, state = _follow(app_, store, state, timeout)
        if status != "succeeded":
            console.print(f"[red]pipeline {pipeline} {status}[/red]")
            raise typer.Exit(1)
    _print_report(store, state, _reports_dir())


@app.command()
def cancel(
    pipeline: Annotated[str, typer.Argument(help="A pipeline id (pl-...).")],
    why: Annotated[str, typer.Option(help="Recorded with the pipeline, on each unfinished step.")] = "by hand",
) -> None:
    """Stop a pipeline: its unfinished steps are recorded as failed, its tasks revoked, and any of its messages
    still queued or redelivered later stop at once. A running training or evaluation step's trainer run is
    cancelled (after its current optimiser step, or set of replies). Finished steps' outputs stay;
    `emili pipeline resume` carries it on."""
    from emili_core.errors import NotFound
    from emili_pipeline.orchestrate import cancel as cancel_pipeline
    from emili_pipeline.pipeline import STEP_NAMES, first_unfinished, load_state

    app_, store = _producer()
    try:
        state = load_state(store, pipeline)
    except NotFound as exc:
        raise typer.BadParameter(str(exc)) from None
    if first_unfinished(state) is None:
        console.print(f"pipeline {pipeline} has finished: nothing to cancel")
        return
    earlier = state.get("cancelled")
    state, runs = cancel_pipeline(app_, store, state, why)
    if earlier:
        console.print(f"pipeline {pipeline} was already cancelled ({earlier.get('why', '')})")
    else:
        stopped = [name for name in STEP_NAMES if str(state["steps"][name].get("error", "")).startswith("cancelled")]
        console.print(f"pipeline {pipeline} cancelled ({why}): {', '.join(stopped)} stopped")
    for run_id in runs:
        console.print(f"its trainer run {run_id}: {_cancel_trainer_run(run_id)}")


def _cancel_trainer_run(run_id: str) -> str:
    import grpc

    from emili.trainer.v1 import trainer_pb2

    async def call(stub: Any) -> None:
        await stub.CancelRun(trainer_pb2.CancelRunRequest(run_id=run_id))

    try:
        _call_trainer(call, _trainer_target("", "cancel the run with `emili trainer cancel` where it is"))
    except typer.BadParameter as exc:
        return f"not cancelled ({exc.message})"
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
            return f"nothing to cancel ({exc.details()})"
        details = f"{exc.code().name}: {exc.details()}"
        return f"not cancelled ({details}); it runs to its end and the pipeline records none of it"
    return "cancel requested (it stops after its current optimiser step, or set of replies)"


@app.command()
def load(
    users: Annotated[int, typer.Option(min=1, help="Simulated sessions open at once (M).")] = 20,
    minutes: Annotated[float, typer.Option(min=0.05, help="How long to keep them going (T).")] = 2.0,
    fps: Annotated[float, typer.Option(min=0.0, help="Face inputs per second per session.")] = 1.0,
    # One message and a minute of face input per session by default: the load is the face stream and the event
    # log, while the one CPU model (a reply at a time) would otherwise only measure its own queue.
    turns: Annotated[int, typer.Option(min=1, help="User messages per session.")] = 1,
    seconds_between_turns: Annotated[float, typer.Option(min=0.0, help="Pause after each reply.")] = 10.0,
    linger: Annotated[float, typer.Option(min=0.0, help="Face input kept on after the last reply (s).")] = 60.0,
    faces: Annotated[
        Path | None,
        typer.Option(exists=True, help="Send JPEG frames of these faces (FER in the loop); default: readings."),
    ] = None,
    personas: Annotated[str, typer.Option(help="'builtin', a JSON/YAML file, or ed:PATH.")] = "builtin",
    seed: Annotated[int, typer.Option(help="Seed of the simulated users.")] = 0,
    target: Annotated[str | None, typer.Option(help="Chat server address (default from the chat settings).")] = None,
) -> None:
    """Load test against the running stack: sustained face inputs/s, TTFT p50/p99, queue lag, errors, and the
    zero-loss check of every acknowledged event against the stored records. Prints JSON; exit 1 if anything
    acknowledged was lost."""
    from emili_core.objectstore import ObjectStore
    from emili_pipeline.load import report, run_load
    from emili_pipeline.settings import PipelineSettings
    from emili_pipeline.simulator import load_personas

    settings = load_settings(PipelineSettings)
    configure_logging("pipeline", "WARNING", settings.log_format)
    simulator = settings.pipeline.simulator.model_copy(
        update={
            "turns": turns,
            "seconds_between_turns": seconds_between_turns,
            "frames_per_second": fps,
            "linger_s": linger,
            "faces": faces,
            "subject_prefix": "load",
        }
    )
    store = ObjectStore(settings.s3)
    secret = settings.auth.secret.get_secret_value()

    def token_for(subject: str) -> str:
        return create_token(secret, subject, ["chat"], settings.auth.default_ttl_seconds, settings.auth.issuer)

    console.print(f"load: {users} sessions at once, {fps} face inputs/s each, for {minutes} min")
    result = asyncio.run(
        run_load(
            users,
            minutes,
            target or _chat_target(),
            load_personas(personas),
            simulator,
            store,
            settings.redis_url,
            token_for=token_for,
            seed=seed,
        )
    )
    summary = report(result, store, users, minutes, fps)
    print(json.dumps(summary, indent=2))
    if not summary["zero_loss"]:
        raise typer.Exit(1)
