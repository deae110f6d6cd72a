"""``emili loop``: the loop that turns new sessions into a promoted (or rejected) candidate without a person.

``run`` ticks every ``interval_s`` until stopped (SIGTERM or Ctrl-C), ``tick`` makes one step, ``status`` shows
where the loop stands. The policy is a YAML file (``--policy``, else ``EMILI_LOOP_POLICY``, else the shipped
``libs/pipeline/configs/loop-policy.yaml``, which is disabled). The local stack runs ``emili loop run`` as one
more process when the policy is enabled (:func:`stack_programs`, an ``emili.stack`` entry point) and ``emili
status`` shows it (:func:`status_rows`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from emili_core.settings import REPO_ROOT, CommonSettings, load_settings

if TYPE_CHECKING:
    import httpx

    from emili_core.stack import Program
    from emili_pipeline.loop import Loop, LoopPolicy, LoopState

SHIPPED_POLICY = REPO_ROOT / "libs" / "pipeline" / "configs" / "loop-policy.yaml"
LEASE_KEY = "emili:loop:lease"

app = typer.Typer(help="The automatic loop: sessions -> candidate -> gate -> canary -> promote.", no_args_is_help=True)
console = Console(stderr=True)
log = logging.getLogger("emili_pipeline.loop")


class LoopSettings(CommonSettings):
    """The loop process's settings (``EMILI_LOOP_POLICY``, ``EMILI_LOOP_GATEWAY_URL`` and the common ones)."""

    loop_policy: Path = SHIPPED_POLICY
    # The gateway's root URL; empty: from the gateway's own settings when it is installed (the local stack).
    loop_gateway_url: str = ""
    # The trainer's gRPC address, for shipped recipes the pipeline config names; empty: from the trainer's own
    # settings when it is installed (the local stack).
    loop_trainer_target: str = ""
    # Rewritten after every tick, failed or not; `emili loop live` (the liveness probe) reads its age.
    loop_heartbeat_file: Path = Path(tempfile.gettempdir()) / "emili-loop.heartbeat"


def _within(path: Path, folder: Path) -> Path:
    """A policy's relative path: beside the policy file when it is there, else from the repository root."""
    if path.is_absolute():
        return path
    return folder / path if (folder / path).exists() else REPO_ROOT / path


def load_policy(path: Path) -> LoopPolicy:
    from emili_pipeline.loop import load_loop_policy

    try:
        policy = load_loop_policy(path)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"loop policy {path}: {exc}") from None
    folder = path.resolve().parent
    return policy.model_copy(
        update={"gate": _within(policy.gate, folder), "pipeline": _within(policy.pipeline, folder)}
    )


def _gateway_factory(settings: LoopSettings) -> Callable[[], httpx.Client] | None:
    """An HTTP client for the gateway with an admin token minted per call (the loop runs for weeks)."""
    import httpx

    from emili_core.auth import create_token
    from emili_core.settings import service_settings_classes

    url = settings.loop_gateway_url
    if not url:
        classes = service_settings_classes()
        url = (classes["gateway"]().http_url() or "") if "gateway" in classes else ""
    if not url:
        return None
    secret, issuer = settings.auth.secret.get_secret_value(), settings.auth.issuer

    def make() -> httpx.Client:
        token = create_token(secret, "emili-loop", ["admin"], ttl_seconds=600, issuer=issuer)
        return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0)

    return make


def build_loop(policy_path: Path | None) -> tuple[Loop, LoopSettings]:
    import redis

    from emili_core.objectstore import ObjectStore
    from emili_core.tasks import create_celery_app
    from emili_pipeline.cli import _fetch_recipe as fetch_recipe
    from emili_pipeline.loop import Loop, RedisLease
    from emili_pipeline.loop_actions import SystemActions

    settings = load_settings(LoopSettings)
    policy = load_policy(policy_path or settings.loop_policy)
    store = ObjectStore(settings.s3)  # Buckets are made by the first tick (S3 may still be starting).
    actions = SystemActions(
        store,
        create_celery_app("pipeline", settings),
        policy.pipeline,
        gateway=_gateway_factory(settings),
        # The trainer's GetRecipe, as `emili pipeline run` does; only called for recipes named, not given as files.
        fetch_recipe=lambda name: fetch_recipe(name, settings.loop_trainer_target),
    )
    lease = RedisLease(redis.Redis.from_url(settings.redis_url), LEASE_KEY)
    # Host and pid name the acting instance (`emili loop status`); the suffix tells a restart on the same pid apart.
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
    return Loop(policy, store, lease, actions, owner), settings


def _unreachable(exc: Exception) -> typer.Exit:
    console.print(f"[red]{type(exc).__name__}: {exc}[/red]\nis the stack up (make up)?")
    return typer.Exit(1)


PolicyOption = Annotated[
    Path | None,
    typer.Option(
        "--policy", exists=True, dir_okay=False, help="Loop policy YAML (default: EMILI_LOOP_POLICY, else shipped)."
    ),
]


@app.command()
def run(policy: PolicyOption = None) -> None:
    """Tick every policy interval until stopped; each transition is logged. One instance acts at a time (a
    Redis lease): others wait, ready to take over when it stops."""
    from emili_core.logs import configure_logging

    loop, settings = build_loop(policy)
    configure_logging("loop", settings.log_level, settings.log_format)
    if not loop.policy.enabled:
        console.print(f"the loop policy {policy or settings.loop_policy} is disabled (enabled: false); not running")
        raise typer.Exit(1)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("loop %s: every %g s, policy %s", loop.owner, loop.policy.interval_s, policy or settings.loop_policy)
    acting: bool | None = None
    buckets = False
    settings.loop_heartbeat_file.touch()  # Alive from the start; a first tick that hangs is caught like any other.
    while not stop.is_set():
        try:
            if not buckets:
                loop.store.ensure_buckets()
                buckets = True
            state = loop.tick()
        except Exception:
            log.exception("loop: the tick failed; trying again in %g s", loop.policy.interval_s)
        else:
            if (state is not None) != acting:  # Said once per change, not every tick.
                acting = state is not None
                log.info("loop %s: %s", loop.owner, "holds the lease" if acting else "another instance holds the lease")
        settings.loop_heartbeat_file.touch()
        stop.wait(loop.policy.interval_s)
    try:
        loop.release()
    except Exception as exc:  # Redis is down: the lease lapses by itself.
        log.warning("loop %s: could not give the lease up (%s)", loop.owner, exc)
    log.info("loop %s stopped", loop.owner)


def heartbeat_limit_s(policy: LoopPolicy) -> float:
    """How old the heartbeat may be: three intervals (a tick that blocks longer hangs), and a minute to start."""
    return 3 * policy.interval_s + 60


@app.command()
def live(policy: PolicyOption = None) -> None:
    """Liveness: exit 0 while ``emili loop run`` ticks (its heartbeat file is fresh), 1 otherwise. Reads no Redis
    and no S3: an outage of either makes ticks fail, not the process dead."""
    settings = load_settings(LoopSettings)
    limit = heartbeat_limit_s(load_policy(policy or settings.loop_policy))
    try:
        age = time.time() - settings.loop_heartbeat_file.stat().st_mtime
    except FileNotFoundError:
        console.print(f"no heartbeat at {settings.loop_heartbeat_file}: the loop has not ticked yet")
        raise typer.Exit(1) from None
    if age > limit:
        console.print(f"the last tick was {age:.0f} s ago (more than {limit:.0f} s): the loop is stuck")
        raise typer.Exit(1)


@app.command()
def tick(policy: PolicyOption = None) -> None:
    """One step of the loop (even with a disabled policy); prints the state as JSON."""
    from emili_core.logs import configure_logging

    loop, settings = build_loop(policy)
    configure_logging("loop", settings.log_level, settings.log_format)
    if not loop.policy.enabled:
        console.print("[yellow]note: the policy is disabled; `emili loop run` would not run it[/yellow]")
    import redis

    from emili_core.errors import DependencyUnavailable

    try:
        loop.store.ensure_buckets()
        state = loop.tick()
        loop.release()
    except (DependencyUnavailable, redis.RedisError) as exc:
        raise _unreachable(exc) from None
    if state is None:
        console.print("another loop instance holds the lease; it acts, not this one")
        raise typer.Exit(1)
    print(json.dumps(state.model_dump(mode="json"), indent=2))


def _holder(settings: CommonSettings) -> str:
    import redis

    try:
        raw = redis.Redis.from_url(settings.redis_url, socket_timeout=2).get(LEASE_KEY)
    except redis.RedisError as exc:
        return f"unknown (Redis: {exc})"
    return "" if raw is None else (raw.decode() if isinstance(raw, bytes) else str(raw))


def _state_table(state: LoopState, policy: LoopPolicy, holder: str, last: int) -> Any:
    from rich.table import Table

    summary = Table(title="EMILI loop", show_header=False, title_justify="left")
    summary.add_column("what")
    summary.add_column("value", overflow="fold")
    rows = {
        "policy": "enabled" if policy.enabled else "disabled",
        "phase": state.phase,
        "pipeline": state.pipeline_id or "",
        "candidate": state.candidate or "",
        "production (baseline)": state.production or policy.production,
        "sessions (this round / used)": f"{len(state.sessions)} / {len(state.used_sessions)}",
        "study (canary)": policy.study_id or "(none: candidates stop after the gate)",
        "acting instance": holder or "(none)",
    }
    for what, value in rows.items():
        summary.add_row(what, value)
    history = Table(title=f"last {last} transitions", title_justify="left")
    for column in ("time (UTC)", "event", "phase", "numbers"):
        history.add_column(column, overflow="fold")
    for entry in state.history[-last:]:
        numbers = {k: v for k, v in entry.items() if k not in {"at_ms", "event", "phase"}}
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(entry.get("at_ms", 0)) / 1000))
        history.add_row(at, str(entry.get("event")), str(entry.get("phase")), json.dumps(numbers))
    return summary, history


@app.command()
def status(
    policy: PolicyOption = None,
    last: Annotated[int, typer.Option(min=1, help="Transitions shown.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stored state as JSON.")] = False,
) -> None:
    """Where the loop stands: phase, pipeline, candidate, production arm, the last decisions."""
    from emili_core.errors import DependencyUnavailable

    loop, settings = build_loop(policy)
    try:
        state = loop.state()
    except DependencyUnavailable as exc:
        raise _unreachable(exc) from None
    if as_json:
        print(json.dumps({**state.model_dump(mode="json"), "lease_holder": _holder(settings)}, indent=2))
        return
    out = Console()
    for table in _state_table(state, loop.policy, _holder(settings), last):
        out.print(table)


# --- the local stack (``emili.stack`` and ``emili.status`` entry points of emili_core) ------------------------


def _stack_policy() -> tuple[Path, LoopPolicy | None]:
    from emili_pipeline.loop import load_loop_policy

    path = load_settings(LoopSettings).loop_policy
    try:
        return path, load_loop_policy(path)
    except (OSError, ValueError):
        return path, None


def stack_programs(settings: CommonSettings) -> list[Program]:
    """``emili loop run`` as one process of the local stack when the policy is enabled (none otherwise)."""
    from emili_core.stack import Program, emili_command

    path, policy = _stack_policy()
    if policy is None or not policy.enabled:
        return []
    # After the services (their priorities are 10-40); it waits for nothing itself: a tick that finds a service
    # down fails, is logged, and the next one tries again.
    return [Program("loop", f"{emili_command()} loop run --policy {path}", priority=50, stopwaitsecs=10)]


def status_rows(settings: CommonSettings) -> list[tuple[str, str, str]]:
    """The loop's row of ``emili status``: DISABLED, or its process's state and what it is doing."""
    from emili_core import stack

    path, policy = _stack_policy()
    if policy is None:
        return [("loop", "INVALID", f"the loop policy {path} cannot be read")]
    if not policy.enabled:
        return [("loop", "DISABLED", f"{path} (enabled: false)")]
    process = stack.program_states().get("loop", "NOT RUNNING")
    detail = f"holder {_holder(settings) or '(none)'}"
    from emili_core.errors import NotFound
    from emili_core.objectstore import Bucket, ObjectStore
    from emili_pipeline.loop import STATE_KEY, LoopState

    try:
        state = LoopState.model_validate(ObjectStore(settings.s3).get_json(Bucket.MODELS, STATE_KEY))
        detail = f"phase {state.phase}, candidate {state.candidate or '-'}, {detail}"
    except NotFound:
        detail = f"no state yet (idle), {detail}"
    except Exception as exc:  # S3 down (its own row says so).
        detail = f"state unreadable ({type(exc).__name__}), {detail}"
    return [("loop", "OK" if process == "RUNNING" else process, detail)]
