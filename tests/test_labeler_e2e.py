"""The labeler through real Redis, S3, a Celery worker and the gRPC API, on sessions recorded by chat code; and the
gateway's client of it (a canary's outcomes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from celery import Celery

from emili.labeler.v1 import labeler_pb2, labeler_pb2_grpc
from emili_chat.persist import persist_session
from emili_chat.store import SessionRecord, SessionStore
from emili_core.errors import NotFound
from emili_core.grpc_client import make_channel
from emili_core.grpc_server import start_server
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import CommonSettings
from emili_core.tasks import create_celery_app
from emili_gateway.chat_client import LabelerClient
from emili_labeler import jobs
from emili_labeler.main import build_app
from emili_labeler.runtime import build_runtime
from emili_labeler.settings import LabelerSettings
from emili_testing.plugin import Stack, token

pytestmark = [pytest.mark.integration, pytest.mark.slow]
T0 = 1_790_000_000_000
HAPPY = {"angry": 0.0, "disgust": 0.0, "fear": 0.0, "happy": 0.9, "sad": 0.0, "surprise": 0.0, "neutral": 0.1}
SAD = {"angry": 0.05, "disgust": 0.05, "fear": 0.0, "happy": 0.0, "sad": 0.8, "surprise": 0.0, "neutral": 0.1}
NEUTRAL = {"angry": 0.0, "disgust": 0.0, "fear": 0.0, "happy": 0.1, "sad": 0.1, "surprise": 0.0, "neutral": 0.8}


async def record_session(redis_url: str, session_id: str, user: str, arm: str) -> None:
    """A session as the chat service records it: neutral face, a reply the user smiles at, one they frown at."""
    client = aioredis.Redis.from_url(redis_url)
    store = SessionStore(client)
    record = await store.create(
        SessionRecord(session_id, user, arm, "scripted", False, True, {"cadence": "before_user_message"})
    )

    async def add(kind: str, at_ms: int, **payload: object) -> None:
        await store.append(session_id, kind, payload, time_ms=at_ms)

    def reading(at_ms: int, probabilities: dict[str, float]) -> dict[str, object]:
        return {"capture_time_ms": at_ms, "face_found": True, "probabilities": probabilities, "source": "client"}

    await add("session_created", T0, model_arm=arm, model_id="scripted", options={}, system_prompt="You are EMILI.")
    await add(
        "pre_survey", T0 + 100, current_feelings=["Sad"], desired_feelings=["Joyful"], text="I feel sad and tired."
    )
    await add("fer_reading", T0 + 900, **reading(T0 + 900, NEUTRAL))
    await add("user_message", T0 + 1000, text="I failed my driving test today.")
    await add(
        "assistant_message",
        T0 + 3000,
        text="Oh no. How are you holding up?",
        turn_id="t1",
        unprompted=False,
        model_id="scripted",
        model_arm=arm,
    )
    await add("fer_reading", T0 + 3500, **reading(T0 + 3500, HAPPY))
    await add("fer_reading", T0 + 9900, **reading(T0 + 9900, HAPPY))
    await add("user_message", T0 + 10000, text="Better now, thanks for asking.")
    await add(
        "assistant_message",
        T0 + 12000,
        text="Driving tests are pointless anyway.",
        turn_id="t2",
        unprompted=False,
        model_id="scripted",
        model_arm=arm,
    )
    await add("fer_reading", T0 + 12500, **reading(T0 + 12500, SAD))
    await add("post_survey", T0 + 20000, current_feelings=["Happy"], desired_feelings=[], text="I feel happy and calm.")
    await store.end(record)  # Chat refuses events after EndSession, so the session ends last, as it does live.
    await client.aclose()


@pytest.fixture
def labeler_worker(stack: Stack, tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "labeler-worker.log"
    env = {**os.environ, **stack.env(), "EMILI_LABELER__WORKER__METRICS_PORT": "0"}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "emili-labeler-worker")],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield log
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)


@pytest.fixture
def producer(stack_env: dict[str, str]) -> Iterator[Celery]:
    app = create_celery_app("tests", CommonSettings())
    yield app
    app.close()


async def test_label_and_datasets_through_the_worker_and_grpc(
    stack: Stack, stack_env: dict[str, str], object_store: ObjectStore, labeler_worker: Path, producer: Celery
) -> None:
    await record_session(stack.redis_url, "lab-1", "alice", "base")
    persist_session(redis.Redis.from_url(stack.redis_url), object_store, "lab-1")

    label = producer.send_task("labeler.label_session", args=["lab-1"]).get(timeout=300)
    gold = label["gold"]
    assert gold["delta"]["valence"] > 0.1, gold  # "sad and tired" -> "happy and calm".
    assert gold["lexicon"] and label["settings"]["oov_method"] == "softmax"
    flags = {t["turn_id"]: t for t in label["turns"]}
    assert flags["t1"]["flagged"] is True and flags["t1"]["delta"] > 0  # Neutral -> happy after the reply.
    assert flags["t2"]["flagged"] is False and flags["t2"]["delta"] < 0  # Happy -> sad after the reply.
    again = producer.send_task("labeler.label_session", args=["lab-1"]).get(timeout=60)
    assert again["reused"] is True and again["key"] == label["key"]
    assert object_store.list_keys(Bucket.SESSIONS, "lab-1/labels/") == [label["key"]]

    sft = producer.send_task("labeler.build_sft_dataset", args=[["lab-1"]]).get(timeout=120)
    assert sft["kind"] == "sft" and sft["counts"]["flagged_turns"] == 1
    (example,) = [json.loads(line) for line in object_store.get_bytes(Bucket.DATASETS, sft["key"]).splitlines()]
    weights = {m["content"]: m.get("weight") for m in example["messages"] if m["role"] == "assistant"}
    assert weights == {"Oh no. How are you holding up?": 1, "Driving tests are pointless anyway.": 0}
    assert all("weight" not in m for m in example["messages"] if m["role"] != "assistant")
    rebuilt = producer.send_task("labeler.build_sft_dataset", args=[["lab-1"]]).get(timeout=120)
    assert rebuilt["id"] == sft["id"]  # Same content, same immutable dataset.

    weights = producer.send_task("labeler.fit_user_weights", args=[["lab-1"]]).get(timeout=120)
    assert weights["users"] == 1 and weights["samples"] == 2  # One face-and-text sample per user message.
    fitted = object_store.get_json(Bucket.DATASETS, weights["key"])["users"]["alice"]
    assert fitted["fell_back"] is True and fitted["n_samples"] == 2  # Too little data: population weights.

    # Flags from the learned weights (here the population's: alice has too little data), and Table 2.
    learned = LabelerSettings()
    learned = learned.model_copy(update={"labeler": learned.labeler.model_copy(update={"weights": "learned"})})
    runtime = await asyncio.to_thread(build_runtime, learned)
    relabel = await asyncio.to_thread(jobs.label_session, runtime, "lab-1")
    assert relabel["key"] != label["key"] and relabel["settings"]["learned_weights_sha256"]
    assert {t["turn_id"] for t in relabel["turns"]} == {"t1", "t2"} and all(
        t["delta"] is not None for t in relabel["turns"]
    )
    table = await asyncio.to_thread(jobs.delta_table, runtime, ["lab-1"])
    row = table["arms"]["base · real"]  # A session made through the chat API by a person's client.
    assert row["n"] == 1 and (table["real_sessions"], table["synthetic_sessions"]) == (1, 0)
    assert row["valence"]["mean"] == pytest.approx(gold["delta"]["valence"])
    pooled = await asyncio.to_thread(jobs.delta_table, runtime, ["lab-1"], True)
    assert set(pooled["arms"]) == {"base"} and pooled["pooled_synthetic"]

    settings = LabelerSettings()
    settings = settings.model_copy(
        update={
            "labeler": settings.labeler.model_copy(
                update={"server": settings.labeler.server.model_copy(update={"grpc_port": 0})}
            )
        }
    )
    server = await start_server(build_app(settings), settings, settings.labeler.server)
    try:
        await asyncio.wait_for(server.ready.wait(), 300)
        async with make_channel(f"127.0.0.1:{server.port}", token(["labeler"])) as channel:
            stub = labeler_pb2_grpc.LabelerServiceStub(channel)
            scores = await stub.ScoreTexts(labeler_pb2.ScoreTextsRequest(texts=["I love this!", "", "grief and loss"]))
            assert len(scores.scores) == 3 and not scores.scores[1].HasField("vad")
            assert scores.scores[0].vad.valence > scores.scores[2].vad.valence
            reply = await stub.LabelSession(labeler_pb2.LabelSessionRequest(session_id="lab-1"))
            assert reply.label.delta.valence == pytest.approx(gold["delta"]["valence"])
            assert [t.flagged for t in reply.label.turns] == [True, False]
            manifest = (await stub.GetDataset(labeler_pb2.GetDatasetRequest(dataset_id=sft["id"]))).manifest
            assert manifest.kind == labeler_pb2.DATASET_KIND_SFT and manifest.key == sft["key"]
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.LabelSession(labeler_pb2.LabelSessionRequest(session_id="never-recorded"))
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.ScoreTexts(labeler_pb2.ScoreTextsRequest(texts=["x" * 200_000]))
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The gateway's canary reads the same label: Δv, and one of the two read reactions flagged positive.
        labels = LabelerClient(f"127.0.0.1:{server.port}", token(["labeler"]), 60)
        try:
            reactions = await labels.reactions("lab-1")
            assert reactions.delta_v == pytest.approx(gold["delta"]["valence"])
            assert reactions.positive_reaction == 0.5
            with pytest.raises(NotFound):
                await labels.reactions("never-recorded")
        finally:
            await labels.close()
    finally:
        await server.stop()


def test_eval_oov_cli(tmp_path: Path) -> None:
    words = [
        "happy",
        "joyful",
        "glad",
        "cheerful",
        "delighted",
        "sad",
        "gloomy",
        "miserable",
        "unhappy",
        "sorrowful",
        "calm",
        "peaceful",
        "relaxed",
        "angry",
        "furious",
        "table",
        "chair",
        "window",
        "paper",
        "stone",
    ]
    valence = [8.2, 8.0, 7.8, 7.9, 8.1, 2.1, 2.5, 1.8, 2.0, 2.2, 7.0, 7.5, 7.3, 2.5, 2.0, 5.2, 5.1, 5.3, 5.0, 5.0]
    lines = ["Word,V.Mean.Sum,A.Mean.Sum,D.Mean.Sum"] + [
        f"{w},{v},5.0,5.0" for w, v in zip(words, valence, strict=True)
    ]
    (tmp_path / "norms.csv").write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "emili"),
            "labeler",
            "eval-oov",
            "--lexicon",
            str(tmp_path / "norms.csv"),
            "--holdout",
            "0.25",
            "--seed",
            "3",
            "--format",
            "warriner",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["n_holdout"] == 5 and report["n_train"] == 15
    assert set(report["methods"]) == {"softmax", "topk", "ridge", "fusion"}
    assert report["methods"]["softmax"]["valence"] > 0.5  # Synonyms of held-out words are in the training part.
