"""``emili study simulate``: the loop simulation study (:mod:`emili_pipeline.study_sim`) with SIMULATED users, and
``emili study combine``: one study from its conditions run apart (:mod:`.study_combine`),
``emili study power``: how many sessions per arm the gate needs to see its candidates' gain (:mod:`.study_power`),
``emili study gate-replies``: what the gate's simulated users heard (:mod:`.study_gate_replies`),
``emili study canary-power``: how often the gateway's canary rule promotes, by planned size (:mod:`.study_power`).

``emili study`` is the gateway's command group (researchers' studies with real participants). This package adds
these five to it without importing the gateway: :data:`commands` (an ``emili.commands`` entry point, added after
every ``emili.cli`` group) holds a ``study`` group whose class takes the gateway's group, found through its own
``emili.cli`` entry point, and adds them to its commands. Without the gateway installed, ``emili study`` has these
five alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from emili_pipeline.study_sim import (
    CANARY_PLANNED_SESSIONS,
    CANARY_RULES,
    CONDITIONS,
    MIN_CANARY_SESSIONS,
    SIMULATION_GATE,
    SIMULATION_PIPELINE,
    CanaryRuleName,
    Condition,
    NoiseFaces,
)

console = Console(stderr=True, highlight=False)
GROUP = "study"


def _gateway_study_group() -> TyperGroup | None:
    """The gateway's ``emili study`` group, through its entry point (never its code); None when not installed."""
    for ep in entry_points(group="emili.cli", name=GROUP):
        if ep.value.startswith("emili_pipeline."):
            continue
        command = typer.main.get_command(ep.load())
        if isinstance(command, TyperGroup):
            return command
    return None


class StudyGroup(TyperGroup):
    """``emili study``: the gateway's group (its options, callback and commands) with this package's commands."""

    def __init__(self, **kwargs: Any) -> None:
        gateway = _gateway_study_group()
        if gateway is not None:
            kwargs.update(
                commands={**gateway.commands, **(kwargs.get("commands") or {})},
                # get_command makes the gateway's app a root command: its shell-completion options stay behind.
                params=[p for p in gateway.params if p.name not in ("install_completion", "show_completion")],
                callback=gateway.callback,
                help=f"{(gateway.help or '').strip()} Loop simulation study with simulated users: "
                "simulate, combine, power, gate-replies, canary-power.",
            )
        super().__init__(**kwargs)


study = typer.Typer(
    help="Studies: with participants on the gateway, or simulated (simulate, combine, power, gate-replies, "
    "canary-power).",
    no_args_is_help=True,
)
commands = typer.Typer()
commands.add_typer(study, name=GROUP, cls=StudyGroup)


def _conditions(value: str) -> tuple[Condition, ...]:
    if value == "both":
        return CONDITIONS
    if value in CONDITIONS:
        return (value,)  # type: ignore[return-value]
    raise typer.BadParameter(f"condition must be feedback, noise or both, not {value!r}")


def _noise_faces(value: str) -> NoiseFaces:
    if value in ("everywhere", "training"):
        return cast(NoiseFaces, value)
    raise typer.BadParameter(f"noise-faces must be everywhere or training, not {value!r}")


def _canary_rule(value: str | None) -> CanaryRuleName | None:
    if value is None or value in CANARY_RULES:
        return value
    raise typer.BadParameter(f"canary-rule must be one of {', '.join(CANARY_RULES)}, not {value!r}")


@study.command()
def simulate(
    iterations: Annotated[int, typer.Option(min=1, help="Loop iterations per condition.")] = 2,
    sessions: Annotated[int, typer.Option(min=1, help="Simulated sessions recorded per iteration.")] = 8,
    eval_users: Annotated[
        int, typer.Option(min=2, help="Simulated users per arm after each candidate.")
    ] = MIN_CANARY_SESSIONS,
    canary_min_sessions: Annotated[
        int,
        typer.Option(
            min=2,
            help="Sessions per arm the offline canary is planned at (gateway rule) or needs to promote (dv-gain).",
        ),
    ] = CANARY_PLANNED_SESSIONS,
    seed: Annotated[int, typer.Option(help="The study's seed (users, personas, arms).")] = 0,
    condition: Annotated[str, typer.Option(help="feedback, noise or both.")] = "both",
    out: Annotated[Path, typer.Option(help="Folder for study.json and study.md.")] = Path("var/reports/study-simulate"),
    pipeline: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="Pipeline config each candidate is trained with.")
    ] = SIMULATION_PIPELINE,
    gate: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="The gate policy.")] = SIMULATION_GATE,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Simulated users at a time (chat batches their replies).")
    ] = 4,
    noise_faces: Annotated[
        str,
        typer.Option(
            help="Where the noise condition's faces show the decoy: everywhere (default), or training (only in the "
            "sessions the loop learns from; the gate and the comparison read real faces: the stricter control)."
        ),
    ] = "everywhere",
    canary_rule: Annotated[
        str | None,
        typer.Option(
            help="How the offline canary decides: gateway (the gateway's rule: no harm, rating not worse; default for "
            "a new study) or dv-gain (a hidden Δv gain with 95% confidence, the earlier studies' rule). A resumed "
            "study keeps its own unless none of its canaries was decided yet."
        ),
    ] = None,
    iteration_timeout: Annotated[
        float,
        typer.Option(
            min=60.0,
            help="Seconds an iteration waits for the loop to train, gate and canary its candidate; past it the "
            "condition stops there, to be resumed (--resume).",
        ),
    ] = 3 * 3600.0,
    target: Annotated[str | None, typer.Option(help="Chat server address (default from the chat settings).")] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Carry on the study in --out (same options; --iterations may grow), including an iteration it was "
            "stopped in. Needs the stack's data it ran on (not after make clean)."
        ),
    ] = False,
) -> None:
    """The loop with SIMULATED users of known preferences: per iteration, users talk to the production arm, the loop
    trains, gates and canaries (offline) a candidate, and users talk to base and candidate; with faces showing the
    users' state (feedback) or noise. Needs the local stack (make up). Writes study.json and study.md."""
    from emili_core.auth import create_token
    from emili_core.logs import configure_logging
    from emili_core.objectstore import ObjectStore
    from emili_core.settings import load_settings
    from emili_core.tasks import create_celery_app
    from emili_pipeline.cli import _chat_target, _fetch_recipe, _fetch_unmeasurable
    from emili_pipeline.gate import load_policy as load_gate
    from emili_pipeline.loop import unmeasurable_checks
    from emili_pipeline.settings import PipelineSettings
    from emili_pipeline.study_sim import Stack, StudyOptions, StudyResumeError, render_markdown, run_study

    settings = load_settings(PipelineSettings)
    configure_logging("pipeline", settings.log_level, settings.log_format)  # The loop's steps, as they happen.
    # A gate check on a metric the trainer cannot measure fails every candidate: say so now, not after an hour.
    unmeasurable = unmeasurable_checks(load_gate(gate), _fetch_unmeasurable())
    if unmeasurable:
        for problem in unmeasurable:
            console.print(f"[red]error:[/red] {escape(problem)}")
        console.print("Make the metric measurable, or pass a --gate without that check.")
        raise typer.Exit(1)
    secret = settings.auth.secret.get_secret_value()

    def token_for(subject: str) -> str:
        return create_token(secret, subject, ["chat"], settings.auth.default_ttl_seconds, settings.auth.issuer)

    options = StudyOptions(
        iterations=iterations,
        sessions=sessions,
        eval_users=eval_users,
        canary_min_sessions=canary_min_sessions,
        seed=seed,
        conditions=_conditions(condition),
        out=out,
        pipeline=pipeline.resolve(),
        gate=gate.resolve(),
        concurrency=concurrency,
        noise_faces=_noise_faces(noise_faces),
        canary_rule=_canary_rule(canary_rule),
        iteration_timeout_s=iteration_timeout,
    )
    stack = Stack(
        store=ObjectStore(settings.s3),
        celery=create_celery_app("pipeline", settings),
        chat_target=target or _chat_target(),
        token_for=token_for,
        fetch_recipe=_fetch_recipe,
        base_simulator=settings.pipeline.simulator,
    )
    console.print(
        f"SIMULATED users: {iterations} iteration(s) x {', '.join(options.conditions)}; {sessions} sessions per "
        f"iteration, {eval_users} users per arm; reports in {out}"
    )
    started = time.perf_counter()

    def progress(record: dict[str, Any]) -> None:
        canary = (record.get("canary") or {}).get("outcome") or "not run"
        gate_passed = (record.get("gate") or {}).get("passed")
        console.print(
            f"{record.get('condition')} iteration {record.get('iteration')}: candidate {record.get('candidate')}, "
            f"gate {'passed' if gate_passed else 'failed' if gate_passed is not None else '-'}, canary {canary}, "
            f"production {record.get('production_after')} ({time.perf_counter() - started:.0f} s)"
        )

    try:
        report = run_study(stack, options, progress, resume=resume)
    except StudyResumeError as exc:
        raise typer.BadParameter(str(exc), param_hint="--resume") from exc
    typer.echo(render_markdown(report))
    console.print(f"wrote {out / 'study.json'} and {out / 'study.md'}")
    for why in (report.get("stopped") or {}).values():
        console.print(f"[red]not finished:[/red] {why}")
    if report.get("stopped"):
        raise typer.Exit(1)


@study.command()
def combine(
    parts: Annotated[
        list[Path], typer.Argument(help="The studies to merge (their folders or study.json), one per condition.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the combined study.json and study.md.")] = Path(
        "var/reports/study-simulate"
    ),
) -> None:
    """One study from its conditions run apart: `emili study simulate --condition feedback` and `--condition noise`
    with the same options, at the same time on one stack, merged into the report one run of both would write."""
    from emili_pipeline.study_combine import StudyCombineError, combine_reports, read_part
    from emili_pipeline.study_sim import render_markdown, write_report

    try:
        report = combine_reports({str(path): read_part(path) for path in parts})
    except StudyCombineError as exc:
        raise typer.BadParameter(str(exc), param_hint="PARTS") from exc
    write_report(report, out)
    typer.echo(render_markdown(report))
    console.print(f"wrote {out / 'study.json'} and {out / 'study.md'}")


@study.command()
def pool(
    studies: Annotated[
        list[Path],
        typer.Argument(help="Runs of the same loop with different seeds (their folders or study.json; parts welcome)."),
    ],
    out: Annotated[Path, typer.Option(help="Folder for pool.json and pool.md.")] = Path("var/reports/study-pool"),
) -> None:
    """Does the loop's candidate beat base run after run, and feedback's beat noise's? Each run's (seed's) mean
    paired difference per iteration and metric, pooled across runs by random effects: an interval for the loop's
    average effect over runs, which counts how much runs differ, not only their simulated users. Needs no stack."""
    import json

    from emili_pipeline.study_combine import StudyCombineError, read_part
    from emili_pipeline.study_pool import StudyPoolError, group_runs, pool_runs, render_pool

    try:
        report = pool_runs(group_runs({str(path): read_part(path) for path in studies}))
    except (StudyCombineError, StudyPoolError) as exc:
        raise typer.BadParameter(str(exc), param_hint="STUDIES") from exc
    markdown = render_pool(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pool.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "pool.md").write_text(markdown)
    typer.echo(markdown)
    console.print(f"wrote {out / 'pool.json'} and {out / 'pool.md'}")


@study.command("gate-replies")
def gate_replies_command(
    report: Annotated[
        Path, typer.Argument(exists=True, help="A simulation study's folder or study.json, rewritten in place.")
    ],
) -> None:
    """Add to a simulation study's report what its gates' simulated users heard: the hidden quality, length penalty
    and cut-off share of the replies in each iteration's gate sessions, candidate against production (reports
    written before `emili study simulate` recorded it). Needs the stack's object storage (make up)."""
    import json

    from emili_core.errors import DependencyUnavailable, EmiliError
    from emili_core.objectstore import ObjectStore
    from emili_core.settings import load_settings
    from emili_pipeline.settings import PipelineSettings
    from emili_pipeline.study_gate_replies import gate_replies
    from emili_pipeline.study_sim import render_markdown, write_report

    path = report / "study.json" if report.is_dir() else report
    if path.name != "study.json":
        raise typer.BadParameter(f"give a study's folder or its study.json, not {path}", param_hint="REPORT")
    try:
        study = json.loads(path.read_text())
        conditions = study["conditions"]
    except (OSError, ValueError, KeyError) as exc:
        raise typer.BadParameter(f"{path} is not a simulation study's study.json ({exc})", param_hint="REPORT") from exc
    store = ObjectStore(load_settings(PipelineSettings).s3)
    seed = int((study.get("options") or {}).get("seed", 0))
    for condition, iterations in conditions.items():
        for it in iterations:
            if not it.get("pipeline_id") or not it.get("candidate"):
                continue
            try:
                it["gate_replies"] = gate_replies(
                    store, it["pipeline_id"], it["candidate"], it.get("production_before") or "base", seed
                )
            except DependencyUnavailable:
                raise  # Nothing can be read: stop before rewriting the report (emili's main says what to do).
            except EmiliError as exc:
                console.print(f"[red]{condition} iteration {it['iteration']}:[/red] {escape(str(exc))}")
    write_report(study, path.parent)
    typer.echo(render_markdown(study))
    console.print(f"rewrote {path} and {path.parent / 'study.md'}")


def _sizes(value: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise typer.BadParameter(f"sizes are whole numbers separated by commas, like 6,12,24; not {value!r}") from None
    if not sizes or sizes[0] < 2:
        raise typer.BadParameter("give at least one size, each 2 or more")
    return sizes


@study.command("canary-power")
def canary_power_command(
    report: Annotated[
        Path,
        typer.Option(exists=True, dir_okay=False, help="A simulation study's study.json (its base arms' ratings)."),
    ],
    sizes: Annotated[str, typer.Option(help="Planned sessions per arm to try, comma-separated.")] = "20,40,60,100",
    shifts: Annotated[str, typer.Option(help="The candidate's rating shifts to try, comma-separated.")] = "0,0.1,-0.3",
    repeats: Annotated[int, typer.Option(min=10, help="Draws per size and shift.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the draws.")] = 0,
) -> None:
    """How often the gateway's canary rule promotes a candidate rated like the production arm (shift 0), a little
    better or clearly worse, at each planned size, resampling a study's SIMULATED base sessions. Needs no stack."""
    import json

    from emili_pipeline.study_power import canary_power, render_canary_power, report_ratings

    try:
        moved = sorted({float(v) for v in shifts.split(",") if v.strip()})
    except ValueError:
        raise typer.BadParameter(f"shifts are numbers separated by commas, like 0,0.1; not {shifts!r}") from None
    try:
        ratings = report_ratings(json.loads(report.read_text()))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--report") from exc
    rows = canary_power(ratings, _sizes(sizes), moved or [0.0], repeats, seed)
    typer.echo(render_canary_power(rows, len(ratings), str(report)))


@study.command()
def power(
    report: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="A simulation study's study.json (its feedback arms).")
    ],
    sizes: Annotated[str, typer.Option(help="Sessions per arm to try, comma-separated.")] = "6,12,24,48,96",
    users: Annotated[int, typer.Option(min=10, help="Simulated users per arm behind the draws.")] = 1000,
    repeats: Annotated[int, typer.Option(min=10, help="Draws per size.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the users and the draws.")] = 0,
    pipeline: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="Pipeline config (personas, turns, state model).")
    ] = SIMULATION_PIPELINE,
    gate: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="The gate policy.")] = SIMULATION_GATE,
    labeler_target: Annotated[
        str | None, typer.Option(help="Labeler address (default from the labeler's settings).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for power.json and power.md.")] = None,
    paired: Annotated[
        bool, typer.Option(help="The same users on both arms, compared user by user (as the pipeline's arm sessions).")
    ] = False,
) -> None:
    """How many sessions per arm the gate's Δv checks need to see the gain a study's candidates had, with SIMULATED
    users: their hidden Δv against the gold Δv the running labeler gives their surveys. Needs the labeler (make up)."""
    import asyncio
    import json

    import grpc

    from emili.labeler.v1 import labeler_pb2, labeler_pb2_grpc
    from emili_core.cli import CliSettings, client_token
    from emili_core.grpc_client import make_channel
    from emili_core.settings import load_settings
    from emili_pipeline.cli import _service_target
    from emili_pipeline.config import load_config
    from emili_pipeline.gate import load_policy
    from emili_pipeline.simulator import load_personas
    from emili_pipeline.study_power import power_analysis, render_markdown, report_qualities

    try:
        pooled = report_qualities(json.loads(report.read_text()))
        policy = load_policy(gate)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    config = load_config(pipeline)
    simulator = config.simulator_settings()
    target = labeler_target or _service_target("labeler", "pass --labeler-target HOST:PORT")
    cli_settings = load_settings(CliSettings)
    token = client_token(cli_settings, "labeler", subject="study-power")

    def score(texts: Sequence[str]) -> list[float | None]:
        async def call() -> list[float | None]:
            async with make_channel(target, token, tls=cli_settings.tls, timeout=120) as channel:
                stub = labeler_pb2_grpc.LabelerServiceStub(channel)
                response = await stub.ScoreTexts(labeler_pb2.ScoreTextsRequest(texts=list(texts)))
                return [s.vad.valence if s.HasField("vad") else None for s in response.scores]

        return asyncio.run(call())

    console.print(f"SIMULATED users: {users} per arm, sizes {sizes}, {repeats} draws each; labeler at {target}")
    try:
        result = power_analysis(
            {arm: pooled[arm]["reply_quality"] for arm in pooled},
            score,
            policy,
            load_personas(config.personas, config.persona_limit),
            sizes=_sizes(sizes),
            users=users,
            turns=simulator.turns,
            repeats=repeats,
            seed=seed,
            state_model=simulator.state,
            observed_delta_v={arm: pooled[arm]["delta_v"] for arm in pooled},
            paired=paired,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    except grpc.aio.AioRpcError as exc:
        console.print(
            f"[red]the labeler at {target} did not score the surveys ({exc.code().name}: {exc.details()}); is the "
            "stack up (make up)?[/red]"
        )
        raise typer.Exit(1) from exc
    result["report"] = str(report)
    markdown = render_markdown(result)
    typer.echo(markdown)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "power.json").write_text(json.dumps(result, indent=1))
        (out / "power.md").write_text(markdown)
        console.print(f"wrote {out / 'power.json'} and {out / 'power.md'}")
