"""FER benchmark: accuracy on labelled crops, and throughput/latency through the real gRPC server.

    python services/fer/bench/bench_fer.py [--npz PATH] [--seconds 20] [--sessions 100]

Starts `emili-fer-server` as its own process on a free port, then drives it from this process:
1. saturation: S streams, each keeping W frames in flight, for T seconds -> sustained frames/s;
2. live sessions: N sessions at 1 frame/s each (each stream paced on its own clock) -> latency p50/p99.
Reports the server's CPU use (from /proc) and where the time goes (its per-stage histograms).
Prints one JSON object. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emili.fer.v1 import fer_pb2, fer_pb2_grpc
from emili_core.grpc_client import make_channel
from emili_core.settings import REPO_ROOT
from emili_testing.plugin import TEST_SECRET, free_port, token

DEFAULT_NPZ = REPO_ROOT.parent / "shared" / "data" / "fer2013-publictest" / "fer2013_publictest_48x48.npz"
FACE = REPO_ROOT / "var" / "artifacts" / "samples" / "face_640x480.jpg"


def accuracy(npz: Path) -> dict[str, object]:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "emili"), "fer", "eval", "--npz", str(npz)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def stage_costs(frame: bytes, repeats: int = 200) -> dict[str, float]:
    """Single-threaded cost of each stage for one frame, in this process (no gRPC, no contention)."""
    from emili_fer.engine import FerEngine, FrameInput
    from emili_fer.settings import FerSettings

    settings = FerSettings()
    engine = FerEngine(settings.fer, settings.artifacts_dir)
    engine.load()
    prepared = [engine.prepare(FrameInput(frame)) for _ in range(repeats)]
    tensor = prepared[0].tensor
    assert tensor is not None, "no face found in the benchmark frame"
    batch = np.stack([tensor] * 32)
    started = time.perf_counter()
    for _ in range(repeats // 10):
        engine.run_batch(batch[:1])
    single = (time.perf_counter() - started) / (repeats // 10)
    started = time.perf_counter()
    for _ in range(repeats // 10):
        engine.run_batch(batch)
    batched = (time.perf_counter() - started) / (repeats // 10) / len(batch)
    return {
        "decode_ms": round(float(np.median([p.timings.decode_ms for p in prepared])), 3),
        "detect_and_crop_ms": round(float(np.median([p.timings.detect_ms for p in prepared])), 3),
        "classify_ms_batch_1": round(single * 1e3, 3),
        "classify_ms_per_face_batch_32": round(batched * 1e3, 3),
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(
            r'^(emili_fer_(?:stage_duration_seconds|batch_size)_(?:sum|count))(\{stage="(\w+)"\})? (\S+)$', line
        )
        if m:
            values[f"{m.group(1)}:{m.group(3) or ''}"] = float(m.group(4))
    return values


def stage_breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, object]:
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    stages = {}
    for stage in ("decode", "detect", "classify"):
        count = delta(f"emili_fer_stage_duration_seconds_count:{stage}")
        if count:
            stages[f"{stage}_ms_mean"] = round(1e3 * delta(f"emili_fer_stage_duration_seconds_sum:{stage}") / count, 3)
    batches = delta("emili_fer_batch_size_count:")
    if batches:
        stages["mean_batch_size"] = round(delta("emili_fer_batch_size_sum:") / batches, 2)
    return stages


async def wait_serving(target: str, process: subprocess.Popen[bytes], limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit("the FER server exited during start-up")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the FER server did not become SERVING")


async def run_streams(
    target: str, frame: bytes, sessions: int, seconds: float, interval: float | None, window: int
) -> dict[str, object]:
    """interval=None: saturate (``window`` in flight per stream); else one frame per ``interval`` seconds."""
    latencies: list[float] = []
    errors = 0
    request_frame = fer_pb2.Frame(data=frame, format=fer_pb2.FRAME_FORMAT_JPEG)
    stop_at = time.monotonic() + seconds

    async def session(index: int, stub: fer_pb2_grpc.FerServiceStub) -> None:
        nonlocal errors
        sent: dict[int, float] = {}
        slots = asyncio.Semaphore(window)

        async def requests():  # type: ignore[no-untyped-def]
            sequence = 0
            start = time.monotonic() + (index / sessions) * (interval or 0)  # Spread the sessions' phases.
            while True:
                if interval is not None:
                    due = start + sequence * interval
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                else:
                    await slots.acquire()
                if time.monotonic() >= stop_at:
                    return
                sent[sequence] = time.perf_counter()
                yield fer_pb2.StreamAnalyzeRequest(session_id=f"bench-{index}", sequence=sequence, frame=request_frame)
                sequence += 1

        async for reply in stub.StreamAnalyze(requests()):
            latencies.append(time.perf_counter() - sent.pop(reply.sequence))
            if reply.WhichOneof("result") != "reading" or not reply.reading.face_found:
                errors += 1
            if interval is None:
                slots.release()

    channels = [make_channel(target, token(["fer"]), stream_timeout=seconds + 60) for _ in range(4)]
    started = time.monotonic()
    await asyncio.gather(*(session(i, fer_pb2_grpc.FerServiceStub(channels[i % 4])) for i in range(sessions)))
    elapsed = time.monotonic() - started
    for channel in channels:
        await channel.close()
    lat = np.array(latencies) * 1e3
    return {
        "sessions": sessions,
        "seconds": round(elapsed, 2),
        "frames": len(latencies),
        "frames_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 2),
        "latency_ms_max": round(float(lat.max()), 2),
        "errors_or_no_face": errors,
    }


def start_server(port: int, metrics_port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "EMILI_AUTH__SECRET": TEST_SECRET,
        "EMILI_FER__SERVER__GRPC_PORT": str(port),
        "EMILI_FER__SERVER__METRICS_PORT": str(metrics_port),
        "EMILI_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen([str(Path(sys.executable).parent / "emili-fer-server")], env=env)


async def measure(args: argparse.Namespace) -> dict[str, object]:
    port, metrics_port = free_port(), free_port()
    server = start_server(port, metrics_port)
    target = f"127.0.0.1:{port}"
    try:
        await wait_serving(target, server)
        frame = FACE.read_bytes()
        await run_streams(target, frame, 4, 2.0, None, 4)  # Warm-up.
        results: dict[str, object] = {}
        for name, sessions, interval, window in (
            ("saturation", args.streams, None, args.window),
            ("live_1fps", args.sessions, 1.0, 1),
        ):
            metrics_before, cpu_before = scrape(metrics_port), cpu_seconds(server.pid)
            client_before = time.process_time()
            run = await run_streams(target, frame, sessions, args.seconds, interval, window)
            cpu = cpu_seconds(server.pid) - cpu_before
            run["client_cpu_cores"] = round((time.process_time() - client_before) / float(run["seconds"]), 2)  # type: ignore[arg-type]
            run["server_cpu_cores"] = round(cpu / float(run["seconds"]), 2)  # type: ignore[arg-type]
            run["server_cpu_ms_per_frame"] = round(1e3 * cpu / max(1, int(run["frames"])), 2)  # type: ignore[call-overload]
            run["stages"] = stage_breakdown(metrics_before, scrape(metrics_port))
            results[name] = run
        return results
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, default=DEFAULT_NPZ, help="labelled crops for the accuracy figure")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--streams", type=int, default=16, help="saturation: concurrent streams")
    parser.add_argument("--window", type=int, default=8, help="saturation: frames in flight per stream")
    parser.add_argument("--sessions", type=int, default=100, help="live: concurrent 1-frame-per-second sessions")
    args = parser.parse_args()
    report: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "frame": "640x480 JPEG, real face (public-domain astronaut photo)"},
    }
    if args.npz.exists():
        report["accuracy"] = accuracy(args.npz)
    else:
        report["accuracy"] = f"skipped: {args.npz} not found (pass --npz)"
    report["single_thread_stage_costs"] = stage_costs(FACE.read_bytes())
    report.update(asyncio.run(measure(args)))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
