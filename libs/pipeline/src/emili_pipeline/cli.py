"""``emili pipeline``: simulated users and the end-to-end pipeline."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from emili_core.auth import create_token
from emili_core.logs import configure_logging
from emili_core.settings import load_settings

app = typer.Typer(help="Simulated users, the collect-label-train-evaluate pipeline, load tests.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Simulated users, the collect-label-train-evaluate pipeline, load tests."""


def _chat_target() -> str:
    from emili_core.cli import service_settings_classes

    classes = service_settings_classes()
    if "chat" not in classes:
        raise typer.BadParameter("the chat service is not installed; pass --target HOST:PORT")
    return load_settings(classes["chat"]).grpc_target()


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
