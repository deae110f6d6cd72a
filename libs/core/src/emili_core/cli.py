"""The ``emili`` command. Services add their own sub-commands through the ``emili.cli`` entry points."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from importlib.metadata import distributions, entry_points, version
from typing import Annotated

import grpc
import redis
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from emili_core import stack
from emili_core.auth import KNOWN_SCOPES, create_token
from emili_core.objectstore import ObjectStore
from emili_core.settings import CommonSettings, load_settings

app = typer.Typer(help="EMILI: emotionally intelligent listener platform.", no_args_is_help=True)
token_app = typer.Typer(help="Bearer tokens for the gRPC APIs.", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack (Redis, S3 server, services) under supervisord.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(stack_app, name="stack")
console = Console(stderr=True)


def _installed_versions() -> str:
    """``emili``'s own version and every installed EMILI package's, one per line."""
    packages = sorted(d.metadata["Name"] for d in distributions() if (d.metadata["Name"] or "").startswith("emili-"))
    lines = [f"emili {version('emili-core')}"]
    lines += [f"  {name} {version(name)}" for name in dict.fromkeys(packages) if name != "emili-core"]
    return "\n".join(lines)


def _print_version(value: bool) -> None:
    if value:
        print(_installed_versions())
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the versions and exit."),
    ] = False,
) -> None:
    """EMILI: emotionally intelligent listener platform."""


class CliSettings(CommonSettings):
    token: SecretStr | None = None  # EMILI_TOKEN: used instead of minting one from the secret.


def service_settings_classes() -> dict[str, type[CommonSettings]]:
    """Each installed service's settings class, from the ``emili.services`` entry points."""
    return {ep.name: ep.load() for ep in entry_points(group="emili.services")}


def client_token(settings: CliSettings, scope: str, subject: str = "emili-cli") -> str:
    if settings.token is not None:
        return settings.token.get_secret_value()
    return create_token(settings.auth.secret.get_secret_value(), subject, [scope], ttl_seconds=600)


@token_app.command("create")
def token_create(
    subject: Annotated[str, typer.Option("--subject", "-s", help="User or client id the token speaks for.")],
    scope: Annotated[list[str], typer.Option("--scope", help=f"Repeatable; one of {sorted(KNOWN_SCOPES)}.")],
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 0,
) -> None:
    """Print a signed bearer token made with the configured EMILI_AUTH__SECRET."""
    settings = load_settings(CliSettings)
    try:
        token = create_token(
            settings.auth.secret.get_secret_value(),
            subject,
            scope,
            ttl or settings.auth.default_ttl_seconds,
            settings.auth.issuer,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    print(token)


@dataclass
class ComponentStatus:
    name: str
    state: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state in {"SERVING", "OK"}


async def _grpc_health(target: str) -> tuple[str, str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.aio.AioRpcError as exc:
            return "UNREACHABLE", f"{target}: {exc.code().name}"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), target


def collect_status(settings: CliSettings, services: list[str]) -> list[ComponentStatus]:
    rows: list[ComponentStatus] = []
    try:
        redis.Redis.from_url(settings.redis_url, socket_timeout=2).ping()
        rows.append(ComponentStatus("redis", "OK", settings.redis_url))
    except redis.RedisError as exc:
        rows.append(ComponentStatus("redis", "DOWN", str(exc)))
    try:
        ObjectStore(settings.s3).ping()
        rows.append(ComponentStatus("s3", "OK", settings.s3.endpoint))
    except Exception as exc:
        rows.append(ComponentStatus("s3", "DOWN", str(exc)[:120]))
    workers = _worker_hostnames(settings) if rows[0].ok else []
    classes = service_settings_classes()
    for service in services:
        if service not in classes:
            rows.append(ComponentStatus(f"{service}-server", "NOT INSTALLED"))
            continue
        target = classes[service]().grpc_target()
        state, detail = asyncio.run(_grpc_health(target))
        rows.append(ComponentStatus(f"{service}-server", state, detail))
        alive = [w for w in workers if w.startswith(f"{service}-")]
        rows.append(ComponentStatus(f"{service}-worker", "OK" if alive else "DOWN", ", ".join(alive) or "no pong"))
    return rows


def _worker_hostnames(settings: CliSettings) -> list[str]:
    from emili_core.tasks import create_celery_app

    celery_app = create_celery_app("cli", settings)
    try:
        return sorted(name for reply in celery_app.control.ping(timeout=1.5) for name in reply)
    except Exception:
        return []


def print_status(rows: list[ComponentStatus]) -> None:
    table = Table(title="EMILI local stack")
    for column in ("component", "state", "detail"):
        table.add_column(column)
    for row in rows:
        style = "green" if row.ok else "red"
        table.add_row(row.name, f"[{style}]{row.state}[/{style}]", row.detail)
    Console().print(table)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Health of Redis, the S3 server, and each local service's gRPC server and worker."""
    settings = load_settings(CliSettings)
    rows = collect_status(settings, list(stack.LOCAL_SERVICES))
    if as_json:
        print(json.dumps([{"name": r.name, "state": r.state, "detail": r.detail} for r in rows], indent=2))
    else:
        print_status(rows)
    raise typer.Exit(0 if all(r.ok for r in rows) else 1)


@stack_app.command("up")
def stack_up(
    wait: Annotated[float, typer.Option(help="Seconds to wait for every component to be healthy.")] = 300,
) -> None:
    """Start (or update) the local stack and wait until every component is healthy."""
    settings = load_settings(CliSettings)
    stack.up(settings)
    console.print(f"supervisord running; logs in {stack.LOG_DIR}")
    deadline = time.monotonic() + wait
    while True:
        rows = collect_status(settings, list(stack.LOCAL_SERVICES))
        waiting = [r.name for r in rows if not r.ok]
        if not waiting:
            print_status(rows)
            return
        if time.monotonic() > deadline:
            print_status(rows)
            console.print(f"[red]not healthy after {wait:.0f} s: {', '.join(waiting)}; see {stack.LOG_DIR}[/red]")
            raise typer.Exit(1)
        failed = [name for name, state in stack.program_states().items() if state == "FATAL"]
        if failed:
            print_status(rows)
            for name in failed:
                console.print(f"[red]{name} keeps exiting; last lines of {stack.LOG_DIR / name}.log:[/red]")
                console.print(stack.log_tail(name))
            raise typer.Exit(1)
        console.print(f"waiting for: {', '.join(waiting)}")
        time.sleep(2)


@stack_app.command("down")
def stack_down() -> None:
    """Stop every local component (data in var/ is kept)."""
    console.print("stopped" if stack.down() else "the local stack was not running")


def _load_plugins() -> None:
    for ep in entry_points(group="emili.cli"):
        app.add_typer(ep.load(), name=ep.name)
    # Typer apps whose commands join the top level (``emili train``, ``emili report``).
    for ep in entry_points(group="emili.commands"):
        app.add_typer(ep.load())


def main() -> None:
    _load_plugins()
    app()
