"""``emili study simulate``: the loop simulation study (:mod:`emili_pipeline.study_sim`) with SIMULATED users.

``emili study`` is the gateway's command group (researchers' studies with real participants). This package adds
``simulate`` to it without importing the gateway: :data:`commands` (an ``emili.commands`` entry point, added after
every ``emili.cli`` group) holds a ``study`` group whose class takes the gateway's group, found through its own
``emili.cli`` entry point, and adds ``simulate`` to its commands. Without the gateway installed, ``emili study``
has ``simulate`` alone.
"""

from __future__ import annotations

import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from emili_pipeline.study_sim import (
    CONDITIONS,
    MIN_CANARY_SESSIONS,
    SIMULATION_GATE,
    SIMULATION_PIPELINE,
    Condition,
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
                help=f"{(gateway.help or '').strip()} Loop simulation study with simulated users: simulate.",
            )
        super().__init__(**kwargs)


study = typer.Typer(help="Studies: with participants on the gateway, or simulated (simulate).", no_args_is_help=True)
commands = typer.Typer()
commands.add_typer(study, name=GROUP, cls=StudyGroup)


def _conditions(value: str) -> tuple[Condition, ...]:
    if value == "both":
        return CONDITIONS
    if value in CONDITIONS:
        return (value,)  # type: ignore[return-value]
    raise typer.BadParameter(f"condition must be feedback, noise or both, not {value!r}")


@study.command()
def simulate(
    iterations: Annotated[int, typer.Option(min=1, help="Loop iterations per condition.")] = 2,
    sessions: Annotated[int, typer.Option(min=1, help="Simulated sessions recorded per iteration.")] = 8,
    eval_users: Annotated[
        int, typer.Option(min=2, help="Simulated users per arm after each candidate.")
    ] = MIN_CANARY_SESSIONS,
    canary_min_sessions: Annotated[
        int, typer.Option(min=2, help="Sessions per arm below which the offline canary never promotes.")
    ] = MIN_CANARY_SESSIONS,
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
    from emili_pipeline.cli import _chat_target, _fetch_recipe
    from emili_pipeline.settings import PipelineSettings
    from emili_pipeline.study_sim import Stack, StudyOptions, StudyResumeError, render_markdown, run_study

    settings = load_settings(PipelineSettings)
    configure_logging("pipeline", settings.log_level, settings.log_format)  # The loop's steps, as they happen.
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
