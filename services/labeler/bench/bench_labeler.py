"""Labeler benchmark: ScoreTexts throughput (cold and warm), and sessions labelled end to end through the queue.

    make up && python services/labeler/bench/bench_labeler.py [--sessions 1000] [--texts 20000]

Uses the running local stack (Redis, the S3 server, the labeler's gRPC server and worker). Utterances
come from EmpatheticDialogues when ../shared/data has it, else from a built-in list. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import time
import uuid

from emili.labeler.v1 import labeler_pb2, labeler_pb2_grpc
from emili_core.cli import CliSettings, client_token
from emili_core.grpc_client import make_channel
from emili_core.keys import session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import REPO_ROOT, load_settings
from emili_core.tasks import create_celery_app
from emili_labeler.settings import LabelerSettings
from emili_session.events import Event, EventKind

ED = REPO_ROOT.parent / "shared" / "data" / "empatheticdialogues" / "test.csv"
FALLBACK = [
    "I finally passed my exam and I feel amazing!",
    "My dog has been sick all week and I am worried.",
    "Work was exhausting today, my boss yelled at everyone.",
    "We are going to the beach this weekend, so excited.",
    "I can't believe my friend forgot my birthday again.",
    "The new apartment feels cozy and quiet.",
]


def utterances(n: int) -> list[str]:
    texts: list[str] = []
    if ED.exists():
        with ED.open(newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if len(row) > 5 and row[5] != "utterance":
                    texts.append(row[5].replace("_comma_", ","))
    texts = texts or FALLBACK
    return [texts[i % len(texts)] for i in range(n)]


async def score_texts(target: str, token: str, texts: list[str], batch: int) -> float:
    async with make_channel(target, token, timeout=300) as channel:
        stub = labeler_pb2_grpc.LabelerServiceStub(channel)
        started = time.perf_counter()
        for i in range(0, len(texts), batch):
            await stub.ScoreTexts(labeler_pb2.ScoreTextsRequest(texts=texts[i : i + batch]))
        return time.perf_counter() - started


def record_sessions(store: ObjectStore, n: int) -> list[str]:
    """Synthetic session records in the format the chat worker stores (marked synthetic), written straight to
    object storage: the labeler reads records, and a benchmark of it needs no chat service."""
    ids = []
    t0 = int(time.time() * 1000)
    texts = utterances(4 * n)
    face = {"angry": 0.05, "disgust": 0.0, "fear": 0.05, "happy": 0.3, "sad": 0.1, "surprise": 0.0, "neutral": 0.5}
    for i in range(n):
        sid = f"bench-{uuid.uuid4().hex[:12]}"
        events: list[Event] = []

        def add(kind: EventKind, at: int, events: list[Event] = events, **payload: object) -> None:
            events.append(Event(f"{at}-{len(events)}", kind, at, dict(payload)))

        add(
            EventKind.SESSION_CREATED,
            t0,
            model_arm="base",
            model_id="bench",
            options={},
            system_prompt="You are EMILI.",
        )
        add(EventKind.PRE_SURVEY, t0 + 10, current_feelings=[], desired_feelings=[], text=texts[4 * i])
        reading = {"face_found": True, "probabilities": face, "source": "client"}
        add(EventKind.FER_READING, t0 + 950, capture_time_ms=t0 + 950, **reading)
        add(EventKind.USER_MESSAGE, t0 + 1000, text=texts[4 * i + 1])
        reply = {"turn_id": "t1", "unprompted": False, "model_id": "bench"}
        add(EventKind.ASSISTANT_MESSAGE, t0 + 2000, text=texts[4 * i + 2], **reply)
        add(EventKind.FER_READING, t0 + 2500, capture_time_ms=t0 + 2500, **reading)
        add(EventKind.POST_SURVEY, t0 + 9000, current_feelings=[], desired_feelings=[], text=texts[4 * i + 3])
        keys = session_record_keys(sid)
        lines = [json.dumps(e.to_json()) + "\n" for e in events]
        store.put_bytes(Bucket.SESSIONS, keys["events.jsonl"], "".join(lines).encode())
        fer = [line for e, line in zip(events, lines, strict=True) if e.kind == EventKind.FER_READING]
        store.put_bytes(Bucket.SESSIONS, keys["fer.jsonl"], "".join(fer).encode())
        manifest = {
            "session_id": sid,
            "user_id": f"user-{i % 50}",
            "model_arm": "base",
            "model_id": "bench",
            "store_frames": False,
            "use_for_training": True,
            "options": {},
            "state": "ended",
            "created_ms": t0,
            "ended_ms": t0 + 9000,
            "synthetic": True,
            "last_event_id": events[-1].event_id,
        }
        store.put_json(Bucket.SESSIONS, keys["session.json"], manifest)
        ids.append(sid)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=1000)
    args = parser.parse_args()
    cli = load_settings(CliSettings)
    labeler = load_settings(LabelerSettings)
    token = client_token(cli, "labeler", subject="bench")
    texts = utterances(args.texts)
    report: dict[str, object] = {
        "machine": {"cpus": os.cpu_count()},
        "utterances": "EmpatheticDialogues test" if ED.exists() else "built-in sample",
    }
    # Cold: words never seen by the server's out-of-lexicon cache; warm: the same texts again.
    unique = [f"{t} {uuid.uuid4().hex[:6]}zq" for t in texts[: args.texts // 4]]
    cold = asyncio.run(score_texts(labeler.grpc_target(), token, unique, args.batch))
    asyncio.run(score_texts(labeler.grpc_target(), token, texts, args.batch))
    warm = asyncio.run(score_texts(labeler.grpc_target(), token, texts, args.batch))
    report["score_texts"] = {
        "batch": args.batch,
        "cold_utterances_per_s": round(len(unique) / cold, 1),
        "warm_utterances_per_s": round(len(texts) / warm, 1),
        "note": "cold texts each carry one made-up word, so every batch embeds new out-of-lexicon words",
    }
    store = ObjectStore(cli.s3)
    started = time.perf_counter()
    record_sessions(store, args.sessions)
    recorded = time.perf_counter() - started
    app = create_celery_app("bench", cli)
    started = time.perf_counter()
    result = app.send_task("labeler.label_all_unlabeled").get(timeout=3600)
    labelled = time.perf_counter() - started
    report["sessions_through_queue"] = {
        "sessions": args.sessions,
        "record_s": round(recorded, 1),
        "label_all_unlabeled_s": round(labelled, 1),
        "sessions_per_s": round(result["labelled"] / labelled, 1),
        "result": {k: v for k, v in result.items() if k != "failed"} | {"failed": len(result["failed"])},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
