"""The ``emili`` command. Services add their own sub-commands through the ``emili.cli`` entry points."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from importlib.metadata import distributions, entry_points, version
from pathlib import Path
from typing import Annotated

import grpc
import redis
import typer
import urllib3
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from emili_core import stack
from emili_core.auth import KNOWN_SCOPES, create_token
from emili_core.errors import DependencyUnavailable, EmiliError
from emili_core.grpc_client import open_channel
from emili_core.objectstore import ObjectStore
from emili_core.retention import retention_app
from emili_core.settings import REPO_ROOT, CommonSettings, HealthCheck, TLSSettings, load_settings
from emili_core.settings import service_settings_classes as service_settings_classes  # Re-exported (moved there).

app = typer.Typer(help="EMILI: emotionally intelligent listener platform.", no_args_is_help=True)
token_app = typer.Typer(help="Bearer tokens for the gRPC APIs.", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack (Redis, S3 server, services) under supervisord.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(stack_app, name="stack")
app.add_typer(retention_app, name="retention")
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
        return self.state in {"SERVING", "OK", "DISABLED"}  # A disabled process is as configured, not down.


async def _grpc_health(target: str, tls: TLSSettings | None = None) -> tuple[str, str]:
    async with open_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.aio.AioRpcError as exc:
            return "UNREACHABLE", f"{target}: {exc.code().name}"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status), target


def _http_health(url: str) -> tuple[str, str]:
    """SERVING when the URL answers 200; NOT_SERVING naming what the server says is down; UNREACHABLE."""
    try:
        reply = urllib3.request("GET", url, timeout=urllib3.Timeout(total=3), retries=False)
    except urllib3.exceptions.HTTPError as exc:
        return "UNREACHABLE", f"{url}: {type(exc).__name__}"
    if reply.status == 200:
        return "SERVING", url
    try:
        down = ", ".join(reply.json().get("down") or [])
    except (ValueError, AttributeError):
        down = ""
    return "NOT_SERVING", f"{url}: HTTP {reply.status}" + (f", down: {down}" if down else "")


def server_health(check: HealthCheck, tls: TLSSettings | None = None) -> tuple[str, str]:
    """(state, detail) of a server, checked the way its settings class says (gRPC health, over TLS when ``tls`` is
    enabled, or an HTTP URL)."""
    if check.kind == "http":
        return _http_health(check.target)
    return asyncio.run(_grpc_health(check.target, tls))


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
        service_settings = classes[service]()
        state, detail = server_health(service_settings.health_check(), service_settings.tls)
        rows.append(ComponentStatus(f"{service}-server", state, detail))
        if not classes[service].has_worker:
            continue
        alive = [w for w in workers if w.startswith(f"{service}-")]
        rows.append(ComponentStatus(f"{service}-worker", "OK" if alive else "DOWN", ", ".join(alive) or "no pong"))
    return rows


def monitoring_status(settings: CliSettings) -> list[ComponentStatus]:
    """Prometheus and Flower of the local stack: OK, down, or not installed (none of which makes the stack
    unhealthy: they watch it)."""
    rows = []
    for tool in stack.monitoring_tools(settings):
        if not tool.installed:
            rows.append(ComponentStatus(tool.name, "NOT INSTALLED", tool.install_hint))
            continue
        state, _ = _http_health(tool.health_url)
        rows.append(ComponentStatus(tool.name, "OK" if state == "SERVING" else state, tool.url))
    return rows


def extension_status(settings: CliSettings) -> list[ComponentStatus]:
    """The rows of the processes other packages add to the local stack (``emili.status`` entry points: a function
    of the settings returning (name, state, detail) rows; the pipeline's loop)."""
    rows: list[ComponentStatus] = []
    for ep in entry_points(group="emili.status"):
        try:
            rows.extend(ComponentStatus(name, state, detail) for name, state, detail in ep.load()(settings))
        except Exception as exc:  # One package's broken status must not hide the rest of the stack's.
            rows.append(ComponentStatus(ep.name, "ERROR", f"{type(exc).__name__}: {exc}"[:120]))
    return rows


def monitoring_links(settings: CliSettings, rows: list[ComponentStatus]) -> dict[str, str]:
    """The address of each monitoring tool that answers (Prometheus, Flower)."""
    answering = {row.name for row in rows if row.ok}
    return {tool.title: tool.url for tool in stack.monitoring_tools(settings) if tool.name in answering}


def _worker_hostnames(settings: CliSettings) -> list[str]:
    from emili_core.tasks import create_celery_app

    celery_app = create_celery_app("cli", settings)
    try:
        return sorted(name for reply in celery_app.control.ping(timeout=1.5) for name in reply)
    except Exception:
        return []


def service_links(services: list[str]) -> dict[str, str]:
    """What people open in a browser (e.g. the participant app), from each installed service's settings."""
    classes = service_settings_classes()
    links: dict[str, str] = {}
    for service in services:
        if service in classes:
            links |= classes[service]().links()
    return links


def print_status(rows: list[ComponentStatus], links: dict[str, str] | None = None) -> None:
    table = Table(title="EMILI local stack")
    for column in ("component", "state", "detail"):
        table.add_column(column)
    for row in rows:
        style = "green" if row.ok else "red"
        table.add_row(row.name, f"[{style}]{row.state}[/{style}]", row.detail)
    out = Console()
    out.print(table)
    for what, url in (links or {}).items():
        out.print(f"{what}: {url}", highlight=False, soft_wrap=True)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Health of Redis, the S3 server, each local service's gRPC server and worker, the loop; Prometheus and
    Flower."""
    settings = load_settings(CliSettings)
    rows = collect_status(settings, list(stack.LOCAL_SERVICES)) + extension_status(settings)
    monitoring = monitoring_status(settings)
    if as_json:
        listed = rows + monitoring
        print(json.dumps([{"name": r.name, "state": r.state, "detail": r.detail} for r in listed], indent=2))
    else:
        links = service_links(list(stack.LOCAL_SERVICES)) | monitoring_links(settings, monitoring)
        print_status(rows + monitoring, links)
    raise typer.Exit(0 if all(r.ok for r in rows) else 1)


@stack_app.command("up")
def stack_up(
    wait: Annotated[float, typer.Option(help="Seconds to wait for every component to be healthy.")] = 300,
) -> None:
    """Start (or update) the local stack and wait until every component is healthy."""
    settings = load_settings(CliSettings)
    unreserved = stack.up(settings)
    if unreserved:
        ports = ",".join(map(str, unreserved))
        console.print(
            f"[yellow]ports {ports} lie in the kernel's ephemeral range and could not be reserved (needs root): an "
            "outgoing connection may take one before its server binds; if a server keeps exiting, run `sysctl -w "
            f"net.ipv4.ip_local_reserved_ports={ports}` (as root) or `make down && make up`[/yellow]"
        )
    console.print(f"supervisord running; logs in {stack.LOG_DIR}")
    deadline = time.monotonic() + wait
    workers_started = False
    while True:
        rows = collect_status(settings, list(stack.LOCAL_SERVICES))
        waiting = [r.name for r in rows if not r.ok]
        if not workers_started and not [name for name in waiting if not name.endswith("-worker")]:
            stack.start_workers()  # Every server has bound its port: workers may open connections now.
            workers_started = True
            continue
        if not waiting:
            monitoring = monitoring_status(settings)
            links = service_links(list(stack.LOCAL_SERVICES)) | monitoring_links(settings, monitoring)
            print_status(rows + extension_status(settings) + monitoring, links)
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


@stack_app.command("certs")
def stack_certs(
    directory: Annotated[Path, typer.Option("--dir", help="Where to write ca.crt, server.crt and server.key.")] = (
        REPO_ROOT / "var" / "tls"
    ),
    host: Annotated[list[str] | None, typer.Option(help="Repeatable: names the certificate is for.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing certificates.")] = False,
) -> None:
    """Make development TLS certificates (a local CA, and one certificate for 127.0.0.1/localhost).

    Use them with EMILI_TLS__ENABLED=true (the EMILI_TLS__* defaults name these files); `emili stack up` makes
    them itself when TLS is enabled and they are missing. Never for production."""
    from emili_core.tls import DEFAULT_HOSTS, dev_certificates, generate_dev_certificates

    existed = dev_certificates(directory).exist()
    paths = generate_dev_certificates(directory, tuple(host) if host else DEFAULT_HOSTS, overwrite=overwrite)
    verb = "kept existing" if existed and not overwrite else "wrote"
    console.print(f"{verb} {paths.ca_file}, {paths.cert_file}, {paths.key_file}")


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


UNREACHABLE_HINT = "Is the stack running? Locally: `make up`; `emili status` shows each part."


def main() -> None:
    """``emili``: a domain error ends the command with its message (exit 1), not a traceback; one that names an
    unreachable dependency says how to check on it."""
    _load_plugins()
    try:
        app()
    except (EmiliError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        unreachable = isinstance(exc, DependencyUnavailable | redis.exceptions.TimeoutError) or (
            isinstance(exc, redis.exceptions.ConnectionError)
            and not isinstance(exc, redis.exceptions.AuthenticationError)
        )
        hint = f"\n{UNREACHABLE_HINT}" if unreachable else ""
        console.print(f"[red]error:[/red] {escape(str(exc))}{hint}", highlight=False)
        raise SystemExit(1) from None
