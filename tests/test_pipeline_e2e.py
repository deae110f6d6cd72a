"""The pipeline canvas through real Redis, S3 and chat, labeler and trainer workers, with the trainer worker
killed (SIGKILL) in the middle of SFT: the watcher resubmits from that step, the run resumes from its last
checkpoint, and every output (datasets, model versions, report) exists once.

Users are simulated against an in-process chat server with a scripted model; training uses a tiny random Llama
with SmolLM2's tokenizer, so the whole canvas runs in about a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from celery import Celery
from transformers import AutoTokenizer

from emili_chat.main import build_app
from emili_chat.settings import ChatSettings
from emili_core.grpc_server import RunningServer, start_server
from emili_core.keys import pipeline_arm_users_key, session_record_keys
from emili_core.objectstore import Bucket, ObjectStore
from emili_core.settings import REPO_ROOT, CommonSettings
from emili_core.tasks import create_celery_app
from emili_pipeline.config import PipelineConfig, Recipes, resolve
from emili_pipeline.orchestrate import Watcher, download_report, submit
from emili_pipeline.pipeline import DONE, load_state, new_state, outputs, save_state
from emili_pipeline.simulator import SimulatorSettings, load_personas, run_users
from emili_testing.chat import ScriptedBackend
from emili_testing.plugin import EntryPointProcess, Stack, tiny_llama, token

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARTIFACTS = REPO_ROOT / "var" / "artifacts" / "chat"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPLIES = (
    "That sounds like a lot. How are you feeling about it now?",
    "Whatever, calm down, it's no big deal.",
    "I'm sorry, that must be hard. What happened?",
)


def _recipe(kind: str, model_dir: Path) -> str:
    common = (
        f"model: {{path: {model_dir}, dtype: float32, attn_implementation: eager}}\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}\n"
        "device: cpu\n"
    )
    if kind == "sft":
        # Many small steps with a checkpoint after each: there is time to kill the worker in the middle.
        return (
            "name: tiny-sft\nkind: sft\n" + common + "optim: {name: adamw_torch, lr: 0.05, scheduler: constant}\n"
            "train: {epochs: 1, batch_size: 1, max_length: 1024, save_steps: 1, logging_steps: 1, max_steps: 24}\n"
        )
    return (
        "name: tiny-dpo\nkind: dpo\n" + common + "optim: {name: adamw_torch, lr: 0.05, scheduler: constant}\n"
        "train: {epochs: 1, batch_size: 2, max_length: 1024, save_steps: 2, logging_steps: 1, max_steps: 2}\n"
        "dpo: {beta: 0.1, loss_type: sigmoid, max_prompt_length: 768}\n"
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (ARTIFACTS / GGUF).is_file():
        pytest.fail(f"{ARTIFACTS / GGUF} is missing; run `make setup`")
    tokenizer = AutoTokenizer.from_pretrained(ARTIFACTS, gguf_file=GGUF, local_files_only=True)
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
async def chat_server(stack_env: dict[str, str]) -> AsyncIterator[RunningServer]:
    settings = ChatSettings()
    options = settings.chat.model_copy(
        update={
            "server": settings.chat.server.model_copy(update={"grpc_port": 0, "metrics_port": 0}),
            "readout": settings.chat.readout.model_copy(update={"post_response_reading_s": 1.0}),
        }
    )
    settings = settings.model_copy(update={"chat": options})
    backend = ScriptedBackend(REPLIES, delta_delay_s=0.005)
    server = await start_server(build_app(settings, backend), settings, settings.chat.server)
    await asyncio.wait_for(server.ready.wait(), 60)
    yield server
    await server.stop()


class Worker(EntryPointProcess):
    def __init__(self, service: str, env: dict[str, str], log: Path) -> None:
        super().__init__(f"emili-{service}-worker", env, log)
        self.service = service


@pytest.fixture
def worker_env(stack: Stack, stack_env: dict[str, str], chat_server: RunningServer, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        **stack.env(),
        "EMILI_CHAT__WORKER__METRICS_PORT": "0",
        "EMILI_LABELER__WORKER__METRICS_PORT": "0",
        "EMILI_TRAINER__WORKER__METRICS_PORT": "0",
        "EMILI_CHAT__SERVER__GRPC_PORT": str(chat_server.port),  # Where the arms' simulated users go.
        "EMILI_TRAINER__LOCK_TTL_SECONDS": "3",  # A dead worker's run is free again soon.
        "EMILI_TRAINER__WORK_DIR": str(tmp_path / "trainer"),
        "EMILI_TRAINER__TORCH_THREADS": "1",
        "EMILI_LABELER__EMPATHETIC_DIALOGUES": str(_empathetic_dialogues(tmp_path / "ed")),
    }


def _empathetic_dialogues(folder: Path) -> Path:
    """A tiny EmpatheticDialogues valid split: two sad and two joyful dialogues (opposite emotions)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags"]
    for i, (emotion, said, reply) in enumerate(
        [
            ("sad", "My dog died yesterday.", "I'm so sorry_comma_ that is heartbreaking."),
            ("sad", "I lost my job today.", "That is really hard. How are you coping?"),
            ("joyful", "I got the job I wanted!", "Congratulations! You must be thrilled."),
            ("joyful", "My sister had a baby.", "How wonderful! Boy or girl?"),
        ]
    ):
        rows.append(f"hit:{i}_conv:{i},1,{emotion},situation {i},1,{said.replace(',', '_comma_')},,")
        rows.append(f"hit:{i}_conv:{i},2,{emotion},situation {i},2,{reply.replace(',', '_comma_')},,")
    (folder / "valid.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def workers(worker_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, Worker]]:
    started = {s: Worker(s, worker_env, tmp_path / f"{s}-worker.log") for s in ("chat", "labeler", "trainer")}
    yield started
    for worker in started.values():
        worker.stop()


@pytest.fixture
def producer(stack_env: dict[str, str]) -> Iterator[Celery]:
    app = create_celery_app("tests", CommonSettings())
    yield app
    app.close()


def _kill_during_sft(
    producer: Celery, store: ObjectStore, pipeline: str, workers: dict[str, Worker], env: dict[str, str], log: Path
) -> int:
    """Wait until SFT has saved a few checkpoints, SIGKILL the trainer worker, start a new one; the step it
    reached."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        task_id = load_state(store, pipeline).get("tasks", {}).get("sft")
        meta = producer.backend.get_task_meta(task_id) if task_id else {}
        info = meta.get("result")
        assert meta.get("status") != "FAILURE", info
        if meta.get("status") == "PROGRESS" and isinstance(info, dict) and int(info.get("step", 0)) >= 4:
            workers["trainer"].kill()
            workers["trainer"] = Worker("trainer", env, log)
            return int(info["step"])
        time.sleep(0.05)
    raise AssertionError(f"SFT never got going: {workers['trainer'].log.read_text()[-3000:]}")


async def test_pipeline_survives_a_killed_trainer_worker(
    chat_server: RunningServer,
    stack_env: dict[str, str],
    object_store: ObjectStore,
    workers: dict[str, Worker],
    worker_env: dict[str, str],
    producer: Celery,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    # resolve() as the CLI does: the recipes are already text; it records the DPO recipe's epochs for the labeler.
    unresolved = PipelineConfig(
        name="e2e",
        users=6,
        concurrency=3,
        personas="builtin",
        persona_limit=1,  # Every user opens with the same words: replies to one context, for feedback pairs.
        faces=None,
        simulator={"turns": 2, "seconds_between_turns": 0.2, "frames_per_second": 4.0, "linger_s": 1.2},
        heldout_share=0.34,
        recipes=Recipes(sft=_recipe("sft", tiny_model), dpo=_recipe("dpo", tiny_model)),
        # Feedback pairs need a flagged and an unflagged reply to the same words, which depends on timing; the
        # EmPO pairs of a small EmpatheticDialogues file are the fallback, so DPO always has data.
        dpo_source="auto",
        evaluation={"max_examples": 2, "users_per_arm": 1, "concurrency": 1},  # type: ignore[arg-type]
    )
    config = resolve(unresolved, tmp_path)
    assert config.recipes.dpo_epochs == 1
    target = f"127.0.0.1:{chat_server.port}"
    outcomes = await run_users(
        config.users,
        config.concurrency,
        target,
        load_personas(config.personas, config.persona_limit),
        config.simulator_settings(SimulatorSettings()),
        config.seed,
        token_for=lambda subject: token(["chat"], subject),
    )
    sessions = [o.session_id for o in outcomes if o.ok]
    assert len(sessions) == 6, [o.errors for o in outcomes]

    before = {
        b: set(object_store.list_keys(b, p)) for b, p in ((Bucket.DATASETS, "index/"), (Bucket.MODELS, "registry/"))
    }
    state = new_state(config, sessions)
    pipeline = state["pipeline_id"]
    save_state(object_store, state)
    state = await asyncio.to_thread(submit, producer, object_store, state)
    watcher = Watcher(producer, object_store, state)
    follow = asyncio.create_task(asyncio.to_thread(watcher.wait, 420, 0.5))
    killed_at = await asyncio.to_thread(
        _kill_during_sft, producer, object_store, pipeline, workers, worker_env, tmp_path / "trainer-worker-2.log"
    )
    status = await follow
    logs = {s: w.log.read_text()[-3000:] for s, w in workers.items()}
    assert status == "succeeded", (load_state(object_store, pipeline)["steps"], logs)
    assert [r["step"] for r in watcher.resubmissions] == ["sft"]

    final = load_state(object_store, pipeline)
    assert all(step["state"] == DONE for step in final["steps"].values())
    assert final["attempt"] == 2 and final["steps"]["sft"]["runs"] == 2
    sft, dpo = outputs(final, "sft"), outputs(final, "dpo")
    assert sft["attempts"] == 2 and 0 < sft["resumed_from_step"] <= killed_at + 1  # Resumed, not restarted.
    assert sft["metrics"]["steps"] == 24
    assert dpo["init_version"] == sft["model_version"], outputs(final, "datasets")

    # Every output exists once: two new datasets, two new model versions, one evaluation report.
    datasets = outputs(final, "datasets")
    new_datasets = set(object_store.list_keys(Bucket.DATASETS, "index/")) - before[Bucket.DATASETS]
    assert new_datasets == {f"index/{d['id']}.json" for d in (datasets["sft"], datasets["dpo"])}
    new_models = set(object_store.list_keys(Bucket.MODELS, "registry/")) - before[Bucket.MODELS]
    assert new_models == {f"registry/{v}.json" for v in (sft["model_version"], dpo["model_version"])}
    arms = outputs(final, "arm_sessions")["arms"]
    assert set(arms) == {"base", "sft", "dpo"} and all(len(ids) == 1 for ids in arms.values())
    table = outputs(final, "delta_table")["table"]
    # Every session came from the simulator: synthetic rows only, none pooled with people's.
    assert set(table["arms"]) == {f"{a} · synthetic" for a in ("base", sft["model_version"], dpo["model_version"])}
    assert (table["real_sessions"], table["synthetic_sessions"]) == (0, table["sessions"])
    markdown, plots = download_report(object_store, outputs(final, "evaluate")["run_id"], tmp_path / "report")
    assert "Table 1" in markdown and "Table 2" in markdown and plots
    recorded = {k.split("/")[0] for k in object_store.list_keys(Bucket.SESSIONS, "") if k.endswith("/session.json")}
    assert set(sessions) | {s for ids in arms.values() for s in ids} <= recorded
    # The evaluation's users were named before they started (the loop never trains on them, even mid-step).
    named = set(object_store.get_json(Bucket.MODELS, pipeline_arm_users_key(pipeline))["users"])
    arm_users = {
        object_store.get_json(Bucket.SESSIONS, session_record_keys(s)["session.json"])["user_id"]
        for ids in arms.values()
        for s in ids
    }
    assert arm_users and arm_users <= named
    assert len(arm_users) == 1  # One simulated user per arm, and the same one on every arm: the gate pairs them.
