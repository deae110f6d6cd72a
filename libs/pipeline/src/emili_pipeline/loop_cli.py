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
from pydantic import Field
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
    # The gateway's ``studies.prefix`` (where it keeps each study's sessions); empty: from the gateway's own settings
    # when it is installed (the local stack), else the gateway's default.
    loop_gateway_studies_prefix: str = Field("", pattern=r"^([a-z0-9][a-z0-9_-]{0,40})?$")
    # Rewritten after every tick, failed or not; `emili loop live` (the liveness probe) reads its age.
    loop_heartbeat_file: Path = Path(tempfile.gettempdir()) / "emili-loop.heartbeat"
    # Prometheus metrics of `emili loop run` (emili_loop_*); 0 serves none. On ``metrics_host``, like the services'.
    loop_metrics_port: int = Field(9106, ge=0, le=65535)


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


def gateway_url(settings: LoopSettings) -> str:
    """``EMILI_LOOP_GATEWAY_URL``, else the installed gateway's own address; empty when neither is known."""
    from emili_core.settings import service_settings_classes

    if settings.loop_gateway_url:
        return settings.loop_gateway_url
    classes = service_settings_classes()
    return (classes["gateway"]().http_url() or "") if "gateway" in classes else ""


def gateway_studies_prefix(settings: LoopSettings) -> str:
    """``EMILI_LOOP_GATEWAY_STUDIES_PREFIX``, else the installed gateway's ``studies.prefix``, else its default."""
    from emili_core.settings import service_settings_classes
    from emili_session.loop_records import STUDIES_PREFIX

    if settings.loop_gateway_studies_prefix:
        return settings.loop_gateway_studies_prefix
    classes = service_settings_classes()
    if "gateway" not in classes:
        return STUDIES_PREFIX
    gateway: Any = classes["gateway"]()  # The gateway's settings class, known here only through its entry point.
    return str(gateway.studies_prefix())


def _gateway_factory(settings: LoopSettings) -> Callable[[], httpx.Client] | None:
    """An HTTP client for the gateway with an admin token minted per call (the loop runs for weeks)."""
    import httpx

    from emili_core.auth import create_token

    url = gateway_url(settings)
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
    warn_undersized(policy)
    store = ObjectStore(settings.s3)  # Buckets are made by the first tick (S3 may still be starting).
    actions = SystemActions(
        store,
        create_celery_app("pipeline", settings),
        policy.pipeline,
        gateway=_gateway_factory(settings),
        # The trainer's GetRecipe, as `emili pipeline run` does; only called for recipes named, not given as files.
        fetch_recipe=lambda name: fetch_recipe(name, settings.loop_trainer_target),
        study_id=policy.sessions_study(),
        studies_prefix=gateway_studies_prefix(settings),
    )
    lease = RedisLease(redis.Redis.from_url(settings.redis_url), LEASE_KEY)
    # Host and pid name the acting instance (`emili loop status`); the suffix tells a restart on the same pid apart.
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
    return Loop(policy, store, lease, actions, owner), settings


def warn_undersized(policy: LoopPolicy) -> list[str]:
    """Say (log) which of the gate's checks the policy's pipeline can never give enough evidence for: with them, every
    candidate is rejected for "not enough evidence", which looks like a working loop that never promotes."""
    from emili_core.errors import InvalidInput
    from emili_pipeline.config import load_config
    from emili_pipeline.gate import load_policy as load_gate
    from emili_pipeline.loop import short_of_users, undersized_checks

    try:
        gate = load_gate(policy.gate)
        problems = undersized_checks(load_config(policy.pipeline), gate)
    except (InvalidInput, ValueError) as exc:  # A pipeline or gate file missing or malformed.
        raise typer.BadParameter(f"loop policy: {exc}") from None
    for problem in problems:
        log.warning("loop policy: %s; every candidate will fail it", problem)
    # Not "every": later candidates learn from more sessions. Said, not returned: the policy can still work.
    for shortfall in short_of_users(policy, gate):
        log.warning("loop policy: %s; the first candidates may fail it", shortfall)
    return problems


def warn_unmeasurable(policy: LoopPolicy, trainer_target: str = "") -> list[str]:
    """Say (log) which of the gate's checks are on a metric the trainer cannot measure (e.g. no EPITOME
    classifiers): every candidate will fail them. A trainer not yet reachable is logged, not fatal: the loop waits
    for its dependencies like any service."""
    from emili_core.errors import DependencyUnavailable
    from emili_pipeline.cli import _fetch_unmeasurable
    from emili_pipeline.gate import load_policy as load_gate
    from emili_pipeline.loop import unmeasurable_checks

    try:
        problems = unmeasurable_checks(load_gate(policy.gate), _fetch_unmeasurable(trainer_target))
    except DependencyUnavailable as exc:
        log.warning("loop policy: not checked whether the gate's metrics can be measured: %s", exc)
        return []
    for problem in problems:
        log.warning("loop policy: %s; every candidate will fail it", problem)
    return problems


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
    from emili_core.metrics import start_metrics_server
    from emili_pipeline.loop_metrics import loop_metrics

    loop, settings = build_loop(policy)
    configure_logging("loop", settings.log_level, settings.log_format)
    warn_unmeasurable(loop.policy, settings.loop_trainer_target)  # Where the loop acts; not for `loop status`.
    if not loop.policy.enabled:
        console.print(f"the loop policy {policy or settings.loop_policy} is disabled (enabled: false); not running")
        raise typer.Exit(1)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("loop %s: every %g s, policy %s", loop.owner, loop.policy.interval_s, policy or settings.loop_policy)
    acting: bool | None = None
    buckets = False
    metrics = loop_metrics()
    try:
        start_metrics_server(settings.loop_metrics_port, settings.metrics_host)
    except OSError as exc:  # The port is taken: the loop still does its work, unobserved (and says so).
        log.error("loop: no metrics on port %d (%s); set EMILI_LOOP_METRICS_PORT", settings.loop_metrics_port, exc)
    settings.loop_heartbeat_file.touch()  # Alive from the start; a first tick that hangs is caught like any other.
    while not stop.is_set():
        try:
            if not buckets:
                loop.store.ensure_buckets()
                buckets = True
            state = loop.tick()
        except Exception:
            metrics.ticked("failed")
            log.exception("loop: the tick failed; trying again in %g s", loop.policy.interval_s)
        else:
            metrics.ticked("standby" if state is None else "acted")
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
    warn_unmeasurable(loop.policy, settings.loop_trainer_target)
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
        "canary in": policy.canary_where(),
        "sessions from": policy.sessions_from,
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


# --- ``emili loop demo`` (``make loop-demo``) ------------------------------------------------------------------

DEMO_POLICY = REPO_ROOT / "libs" / "pipeline" / "configs" / "loop-demo-policy.yaml"
# The copy the loop process runs, with the demo study's id; `make loop-demo` points EMILI_LOOP_POLICY at it.
DEMO_RUNTIME_POLICY = REPO_ROOT / "var" / "run" / "loop-demo-policy.yaml"


def _restart_loop_process(settings: LoopSettings) -> None:
    """The stack updated with the demo's policy copy: the loop process added (or restarted, to read it again)."""
    from emili_core import stack

    if not stack.is_running():
        console.print("the local stack is not running: start it with `make loop-demo` (or make up)")
        raise typer.Exit(1)
    stack.up(settings)
    stack.supervisorctl("restart", "loop")


@app.command()
def demo(
    policy: Annotated[
        Path,
        typer.Option("--policy", exists=True, dir_okay=False, help="The demo's loop policy (study_id is filled in)."),
    ] = DEMO_POLICY,
    at_once: Annotated[
        int, typer.Option(min=1, max=8, help="Simulated participants at a time (1 while training).")
    ] = 2,
    minutes: Annotated[float, typer.Option(min=1, help="Give up after this long without a decision.")] = 60.0,
    seed: Annotated[int, typer.Option(help="Seeds the participants (personas, states, faces).")] = 0,
    faces: Annotated[
        str, typer.Option(help="Face images for the camera (class folders or NPZ), auto (../shared if there) or none.")
    ] = "auto",
) -> None:
    """SIMULATED participants take part in a demo study through the gateway, as people do, while the loop (run by
    the stack with the demo policy) trains, gates and canaries a candidate; prints progress until the loop decides
    on it, then the decision and where to see it. Run by `make loop-demo`; the numbers are a demo's, not a study's."""
    import asyncio

    import httpx

    from emili_core.auth import create_token
    from emili_core.logs import configure_logging
    from emili_core.objectstore import ObjectStore
    from emili_pipeline.config import SHARED_FACES
    from emili_pipeline.loop_demo import DemoError, DemoRun, ensure_demo_study, read_state, write_runtime_policy
    from emili_pipeline.simulator.faces import load_face_set
    from emili_pipeline.simulator.personas import load_personas
    from emili_pipeline.simulator.run import SimulatorSettings

    settings = load_settings(LoopSettings)
    configure_logging("loop-demo", "WARNING", settings.log_format)  # The demo's own lines, not every session's.
    if settings.loop_policy.resolve() != DEMO_RUNTIME_POLICY:
        console.print(
            f"EMILI_LOOP_POLICY must be {DEMO_RUNTIME_POLICY} (the copy the demo writes and the stack's loop runs); "
            "use `make loop-demo`"
        )
        raise typer.Exit(1)
    demo_policy = load_policy(policy)
    if not demo_policy.enabled:
        raise typer.BadParameter(f"{policy} is disabled (enabled: false)")
    url = gateway_url(settings)
    if not url:
        console.print("no gateway address: set EMILI_LOOP_GATEWAY_URL or install the gateway")
        raise typer.Exit(1)
    face_path = SHARED_FACES if faces == "auto" and SHARED_FACES.is_file() else None
    face_path = Path(faces) if faces not in ("auto", "none") else face_path
    simulator = SimulatorSettings(turns=2, seconds_between_turns=1.0, frames_per_second=1.0, linger_s=2.0)
    face_set = load_face_set(face_path, simulator.face) if face_path is not None else None
    secret, issuer = settings.auth.secret.get_secret_value(), settings.auth.issuer
    store = ObjectStore(settings.s3)
    token = create_token(secret, "emili-loop-demo", ["admin"], ttl_seconds=int(minutes * 60) + 3600, issuer=issuer)
    out = Console(highlight=False)
    started = time.monotonic()

    async def main() -> int:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30.0) as admin:
            study = await ensure_demo_study(admin, demo_policy.production)
            if study is None:
                out.print(
                    "[yellow]the gateway cannot record a study's sessions as synthetic, so NO simulated participant "
                    "takes part (they would pass for people); the loop runs without a study (no canary) on the "
                    "sessions already recorded[/yellow]"
                )
            else:
                out.print(
                    f"demo study {study.study_id} ({'reused' if study.reused else 'created'}), SIMULATED participants"
                )
            path = write_runtime_policy(
                demo_policy, study.study_id if study else "", settings.loop_policy, source=policy.resolve()
            )
            _restart_loop_process(settings)
            out.print(
                f"loop policy {path}: a tick every {demo_policy.interval_s:g} s, {demo_policy.min_new_sessions} new "
                f"sessions start a candidate; "
                + (
                    f"{at_once} participant(s) at a time, faces {face_set.source if face_set else 'none (camera off)'}"
                    if study
                    else "no participants"
                )
            )
            run = DemoRun(
                gateway_url=url,
                admin=admin,
                loop_state=lambda: read_state(store),
                personas=load_personas(),
                simulator=simulator,
                faces=face_set,
                at_once=at_once,
                seed=seed,
                say=out.print,
            )
            decision, state = await run.run(study, minutes * 60)
            tally = run.tally
            out.print(
                f"simulated participants: {tally.started} started, {tally.ok} sessions completed, {tally.failed} failed"
                + (f" (first errors: {'; '.join(tally.errors[:3])})" if tally.errors else "")
            )
            if decision is None:
                out.print(
                    f"[red]no decision after {minutes:g} minutes[/red]: loop phase {state.phase}, candidate "
                    f"{state.candidate or '-'}, pipeline {state.pipeline_id or '-'} (emili loop status)"
                )
                return 2
            numbers = {k: v for k, v in decision.items() if k not in ("at_ms", "event", "phase")}
            out.print(f"[bold]decision: {decision['event']}[/bold] {json.dumps(numbers)}")
            if study is not None:
                out.print(await run.canary_line(study.study_id))
            candidate = decision.get("candidate") or state.candidate or ""
            anchor = "".join(c if c.isalnum() or c in "_-" else "_" for c in candidate)
            out.print(
                f"took {(time.monotonic() - started) / 60:.1f} minutes; pipeline {state.pipeline_id}, "
                f"{len(state.sessions)} sessions in its round"
            )
            out.print(
                f"researcher page: {url}/researcher#loop-candidate-{anchor} (sign in with `emili token create "
                "--subject me --scope admin`); the candidate's card traces the gate, pipeline and sessions"
            )
            return 0

    try:
        code = asyncio.run(main())
    except DemoError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    raise typer.Exit(code)


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
    command = f"{emili_command()} loop run --policy {path}"
    port = load_settings(LoopSettings).loop_metrics_port
    return [Program("loop", command, priority=50, stopwaitsecs=10, metrics_port=port)]


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
