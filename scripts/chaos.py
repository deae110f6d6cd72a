"""``make chaos``: the load test against the running local stack while faults are injected; prints the audit.

Usage: chaos.py [--minutes T] [--users M] [--s3-outage S] [-- extra `emili pipeline load` options]

It runs ``emili pipeline load`` (simulated users, then the zero-loss audit of every acknowledged event against
the stored records) and meanwhile, through the stack's supervisor (``emili_core.stack``): restarts the FER
server, SIGKILLs the chat worker (the supervisor starts it again), stops the S3 server for ``--s3-outage``
seconds, and SIGKILLs Redis (restarted, with its append-only file). The load test's JSON is printed with the
fault timeline; the exit status is the load test's (1 if anything acknowledged was lost).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from emili_core import stack

BIN = Path(sys.executable).parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--s3-outage", type=float, default=60.0)
    args, extra = parser.parse_known_args()
    if not stack.is_running():
        print("the local stack is not running: `make up` first", file=sys.stderr)
        return 2
    timeline: list[dict[str, object]] = []
    started = time.monotonic()

    def fault(what: str, *command: str) -> None:
        result = stack.supervisorctl(*command)
        timeline.append({"t_s": round(time.monotonic() - started, 1), "fault": what, "ok": result.returncode == 0})
        print(f"[chaos {time.monotonic() - started:6.1f} s] {what}: {result.stdout.strip()}", file=sys.stderr)

    def inject() -> None:
        schedule: list[tuple[float, str, tuple[str, ...]]] = [
            (20, "restart FER", ("restart", "fer-server")),
            (40, "SIGKILL the chat worker", ("signal", "KILL", "chat-worker")),
            (60, "stop S3", ("stop", "s3")),
            (60 + args.s3_outage, "start S3", ("start", "s3")),
            (90 + args.s3_outage, "SIGKILL Redis", ("signal", "KILL", "redis")),
        ]
        for at, what, command in schedule:
            time.sleep(max(0.0, at - (time.monotonic() - started)))
            fault(what, *command)
        for name in ("s3", "redis", "chat-worker", "fer-server"):  # Leave everything running.
            stack.supervisorctl("start", name)

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    load = subprocess.run(
        [str(BIN / "emili"), "pipeline", "load", "--users", str(args.users), "--minutes", str(args.minutes), *extra],
        capture_output=True,
        text=True,
    )
    injector.join(timeout=max(0.0, 120 + args.s3_outage - (time.monotonic() - started)))
    sys.stderr.write(load.stderr)
    try:
        audit = json.loads(load.stdout[load.stdout.index("{") :])
    except ValueError:
        audit = {"output": load.stdout}
    print(json.dumps({"faults": timeline, "load": audit}, indent=2))
    return load.returncode


if __name__ == "__main__":
    raise SystemExit(main())
