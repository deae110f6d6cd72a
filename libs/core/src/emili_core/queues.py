"""The queue catalogue and the one routing table.

Work is split by service because each queue is consumed by a different kind of worker: FER workers
hold an ONNX model (GPU nodes in production), chat workers persist sessions, labeler workers hold the
lexicon and embedding model, and the trainer worker owns a GPU for hours at concurrency 1. A slow
training job must never delay a session being saved, so they never share a queue.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
    "chat.retention_sweep": Queue.CHAT,
    "fer.analyze_session_frames": Queue.FER,
    "fer.ingest_video": Queue.FER,
    "labeler.label_session": Queue.LABELER,
    "labeler.label_all_unlabeled": Queue.LABELER,
    "labeler.build_sft_dataset": Queue.LABELER,
    "labeler.build_dpo_dataset": Queue.LABELER,
    "labeler.fit_user_weights": Queue.LABELER,
    "labeler.delta_table": Queue.LABELER,
    "labeler.forget_sessions": Queue.LABELER,
    "labeler.pipeline_label": Queue.LABELER,
    "labeler.pipeline_datasets": Queue.LABELER,
    "labeler.pipeline_delta_table": Queue.LABELER,
    "trainer.train": Queue.TRAINER,
    "trainer.evaluate": Queue.TRAINER,
    "trainer.pipeline_sft": Queue.TRAINER,
    "trainer.pipeline_dpo": Queue.TRAINER,
    "trainer.pipeline_evaluate": Queue.TRAINER,
}


@dataclass(frozen=True)
class Redelivery:
    """How a queue's unacknowledged messages come back when their worker dies.

    The Redis transport hands a message that has not been acknowledged ``visibility_timeout_s`` after its delivery
    to another worker, so the timeout must outlast the queue's ``task_time_limit_s`` (or a task still running
    would run twice). Each queue keeps its unacked messages under its own keys (``unacked:<queue>``, ...), so a
    worker's sweep restores only its own queue's messages, with its own timeout.
    """

    visibility_timeout_s: int
    task_time_limit_s: int

    def __post_init__(self) -> None:
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError(
                f"visibility timeout ({self.visibility_timeout_s} s) must exceed the task time limit "
                f"({self.task_time_limit_s} s)"
            )


# Per-queue defaults (settings may override them: ``EMILI_QUEUES__<QUEUE>__...``). Chat records come back within a
# minute of a worker's death; FER and labeler jobs within minutes; a training run keeps hours (its lock's expiry,
# not redelivery, is what resumes it).
REDELIVERY: dict[Queue, Redelivery] = {
    Queue.CHAT: Redelivery(visibility_timeout_s=45, task_time_limit_s=30),
    Queue.FER: Redelivery(visibility_timeout_s=2 * 3600, task_time_limit_s=3600),
    Queue.LABELER: Redelivery(visibility_timeout_s=2 * 3600, task_time_limit_s=3600),
    Queue.TRAINER: Redelivery(visibility_timeout_s=13 * 3600, task_time_limit_s=12 * 3600),
}


def unacked_keys(queue: str) -> dict[str, str]:
    """The Redis transport's bookkeeping keys for ``queue``'s consumers (kombu transport options)."""
    return {
        "unacked_key": f"unacked:{queue}",
        "unacked_index_key": f"unacked_index:{queue}",
        "unacked_mutex_key": f"unacked_mutex:{queue}",
    }


# Kombu's Redis transport keeps a queue as Redis lists: ``<queue>`` for messages without a priority (all of EMILI's)
# and ``<queue>\x06\x16<step>`` for the other priority steps. Publishers push on the left, consumers pop from the
# right, so a list's last element is its oldest message. Messages being run are not in the lists (they are in the
# ``unacked`` keys).
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s waiting messages."""
    return [queue, *(f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS)]


def queue_for(task_name: str) -> Queue:
    try:
        return TASK_ROUTES[task_name]
    except KeyError:
        raise UnroutedTaskError(f"task {task_name!r} has no route; add it to emili_core.queues.TASK_ROUTES") from None
