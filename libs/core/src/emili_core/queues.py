"""The queue catalogue and the one routing table.

Work is split by service because each queue is consumed by a different kind of worker: FER workers
hold an ONNX model (GPU nodes in production), chat workers persist sessions, labeler workers hold the
lexicon and embedding model, and the trainer worker owns a GPU for hours at concurrency 1. A slow
training job must never delay a session being saved, so they never share a queue.
"""

from __future__ import annotations

import enum


class Queue(enum.StrEnum):
    FER = "fer"
    CHAT = "chat"
    LABELER = "labeler"
    TRAINER = "trainer"


class UnroutedTaskError(LookupError):
    pass


# Every task the system defines, and the queue that runs it. A test checks both directions.
TASK_ROUTES: dict[str, Queue] = {
    "chat.persist_session": Queue.CHAT,
    "chat.pipeline_collect": Queue.CHAT,
    "chat.pipeline_arm_sessions": Queue.CHAT,
    "fer.analyze_session_frames": Queue.FER,
    "fer.ingest_video": Queue.FER,
    "labeler.label_session": Queue.LABELER,
    "labeler.label_all_unlabeled": Queue.LABELER,
    "labeler.build_sft_dataset": Queue.LABELER,
    "labeler.build_dpo_dataset": Queue.LABELER,
    "labeler.fit_user_weights": Queue.LABELER,
    "labeler.delta_table": Queue.LABELER,
    "labeler.pipeline_label": Queue.LABELER,
    "labeler.pipeline_datasets": Queue.LABELER,
    "labeler.pipeline_delta_table": Queue.LABELER,
    "trainer.train": Queue.TRAINER,
    "trainer.evaluate": Queue.TRAINER,
    "trainer.pipeline_sft": Queue.TRAINER,
    "trainer.pipeline_dpo": Queue.TRAINER,
    "trainer.pipeline_evaluate": Queue.TRAINER,
}


def queue_for(task_name: str) -> Queue:
    try:
        return TASK_ROUTES[task_name]
    except KeyError:
        raise UnroutedTaskError(f"task {task_name!r} has no route; add it to emili_core.queues.TASK_ROUTES") from None
