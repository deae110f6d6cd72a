"""``emili study``: create studies, invite people, follow progress and export sessions through the gateway's HTTP
API, with an admin token (``EMILI_TOKEN``, or one minted from ``EMILI_AUTH__SECRET`` like ``emili token create``).

Errors the API returns (``{"error": code, "detail": message}``) are printed as their message, exit status 1.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from emili_core.cli import CliSettings, client_token
from emili_core.settings import load_settings
from emili_gateway.settings import GatewaySettings

API = "/api/v1"
EXAMPLE = "services/gateway/examples/two-arm-study.yaml"

app = typer.Typer(
    help="Studies with real participants on the gateway: create, invite, progress, export.", no_args_is_help=True
)
console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ApiError(Exception):
    """What the gateway said went wrong (its ``detail``), or why it could not be asked."""


def parse_duration(text: str) -> int:
    """Seconds in ``90``, ``90s``, ``30m``, ``12h``, ``7d`` or ``2w``."""
    match = _DURATION.match(text.lower())
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a duration; write e.g. 7d, 12h, 30m or 3600 (seconds)")
    return int(match.group(1)) * _SECONDS[match.group(2)]


class GatewayApi:
    """The researcher endpoints of one gateway, called with an admin token."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, f"{API}{path}", **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                f"cannot reach the gateway at {self.http.base_url} ({type(exc).__name__}: {exc}); is it running "
                "(make up, then make status)? Another address: --url or EMILI_GATEWAY__SERVER__HTTP_PORT"
            ) from None
        if response.is_success:
            return response
        try:
            body = response.json()
            detail = body["detail"] if isinstance(body, dict) and body.get("detail") else response.text
        except ValueError:
            detail = response.text.strip() or response.reason_phrase
        raise ApiError(str(detail))

    def create_study(self, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(self.call("POST", "/studies", json=spec).json())

    def studies(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/studies").json()["studies"])

    def invite(self, study_id: str, count: int, max_uses: int, expires_in_seconds: int) -> list[dict[str, Any]]:
        body = {"count": count, "max_uses": max_uses, "expires_in_seconds": expires_in_seconds}
        return list(self.call("POST", f"/studies/{study_id}/invites", json=body).json()["invites"])

    def progress(self, study_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/studies/{study_id}/progress").json())

    def export(self, study_id: str, fmt: str) -> str:
        return self.call("GET", f"/studies/{study_id}/export", params={"format": fmt}).text


def http_client(url: str | None) -> httpx.Client:
    """An HTTP client for the gateway at ``url`` (default: where its settings say it listens), admin token set."""
    base = (url or load_settings(GatewaySettings).http_url()).rstrip("/")
    token = client_token(load_settings(CliSettings), "admin", "emili-study")
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60.0)


@contextmanager
def _api(ctx: typer.Context) -> Iterator[GatewayApi]:
    """The gateway API for a command; an API error is printed as the gateway's message, exit status 1."""
    with http_client(ctx.obj) as http:
        try:
            yield GatewayApi(http)
        except ApiError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(1) from None


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000))


def _arms(study: dict[str, Any]) -> str:
    return ", ".join(f"{a['arm']} ({a['weight']:g})" for a in study.get("arms") or [])


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(help="The gateway's address, e.g. http://127.0.0.1:8080 (default: from its settings)."),
    ] = None,
) -> None:
    """Studies with real participants on the gateway: create, invite, progress, export."""
    ctx.obj = url


@app.command()
def create(
    ctx: typer.Context,
    study_file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help=f"The study as YAML (see {EXAMPLE}).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the created study as JSON.")] = False,
) -> None:
    """Create a study from a YAML file (name, arms and weights, consent text, survey words, conversation rules);
    prints its id."""
    try:
        spec = yaml.safe_load(study_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        console.print(f"[red]error:[/red] cannot read {escape(str(study_file))}: {escape(str(exc))}")
        raise typer.Exit(2) from None
    if not isinstance(spec, dict):
        console.print(
            f"[red]error:[/red] {escape(str(study_file))} must be a YAML mapping with the study's fields "
            f"(see {EXAMPLE})"
        )
        raise typer.Exit(2)
    with _api(ctx) as api:
        study = api.create_study(spec)
    if as_json:
        print(json.dumps(study, indent=2))
        return
    print(study["study_id"])
    console.print(
        f"created study {study['study_id']} {escape(study['name'])!r}: arms {escape(_arms(study))}; "
        f"invite people with: emili study invite {study['study_id']} --count N"
    )


@app.command("list")
def list_studies(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the studies as JSON.")] = False,
) -> None:
    """Every study: id, name, arms (with weights), when and by whom it was created."""
    with _api(ctx) as api:
        studies = api.studies()
    if as_json:
        print(json.dumps(studies, indent=2))
        return
    if not studies:
        console.print("no studies yet: emili study create STUDY.yaml")
        return
    table = Table(title="studies", title_justify="left")
    table.add_column("study", no_wrap=True)
    for column in ("name", "arms (weight)", "created", "by"):
        table.add_column(column, overflow="fold")
    for study in studies:
        table.add_row(
            study["study_id"],
            escape(study["name"]),
            escape(_arms(study)),
            _when(study["created_ms"]),
            escape(study["created_by"]),
        )
    out.print(table)


@app.command()
def invite(
    ctx: typer.Context,
    study_id: Annotated[str, typer.Argument(help="The study (st-...).")],
    count: Annotated[int, typer.Option(min=1, help="How many invite links to make.")] = 1,
    max_uses: Annotated[int, typer.Option(min=1, help="People per link: 1 = single-use.")] = 1,
    expires_in: Annotated[str, typer.Option(help="How long the links work: e.g. 7d, 12h, 30m.")] = "14d",
) -> None:
    """Make invite links; prints one per line (a person opens it to take part)."""
    seconds = parse_duration(expires_in)
    with _api(ctx) as api:
        invites = api.invite(study_id, count, max_uses, seconds)
    for item in invites:
        print(item["url"])
    people = "one person each" if max_uses == 1 else f"up to {max_uses} people each"
    expires = _when(invites[0]["expires_ms"]) if invites else "-"
    console.print(f"{len(invites)} invite link(s) to study {study_id}, {people}, until {expires}")


@app.command()
def progress(
    ctx: typer.Context,
    study_id: Annotated[str, typer.Argument(help="The study (st-...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the progress as JSON.")] = False,
) -> None:
    """Participants, invites and sessions per arm: assigned, active, completed, abandoned, withdrawn."""
    with _api(ctx) as api:
        report = api.progress(study_id)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    columns = ("assigned", "active", "completed", "abandoned", "withdrawn")
    table = Table(title=f"study {study_id}", title_justify="left")
    table.add_column("arm", overflow="fold")
    table.add_column("weight", justify="right")
    for column in columns:
        table.add_column(column, justify="right")
    for arm in report["arms"]:
        table.add_row(escape(arm["arm"]), f"{arm['weight']:g}", *(str(arm[c]) for c in columns))
    out.print(table)
    out.print(
        f"participants {report['participants']}, sessions {report['sessions']}, "
        f"invites {report['invites']} (used {report['invite_uses']} times)"
    )


def _rows(text: str, fmt: str) -> int:
    if fmt == "csv":
        return max(0, sum(1 for _ in csv.reader(io.StringIO(text))) - 1)
    return sum(1 for line in text.splitlines() if line.strip())


@app.command()
def export(
    ctx: typer.Context,
    study_id: Annotated[str, typer.Argument(help="The study (st-...).")],
    fmt: Annotated[Literal["jsonl", "csv"], typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here (default: standard output).")] = (
        None
    ),
) -> None:
    """Every session not withdrawn: arm, consent, surveys, rating and transcript."""
    with _api(ctx) as api:
        text = api.export(study_id, fmt)
    rows = _rows(text, fmt)
    if output is None:
        print(text, end="")
        return
    output.write_text(text, encoding="utf-8")
    console.print(f"wrote {rows} session(s) of study {study_id} to {output}")
