"""``emili-trainer-worker``: the Celery worker consuming the ``trainer`` queue (concurrency 1, prefetch 1)."""

from __future__ import annotations

import logging

from emili_core.tasks import worker_main
from emili_trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


def warm_up() -> None:
    # Imported here, not at the top: the probes (``--live``, ``--check``) must not load torch every minute.
    import torch

    from emili_trainer import tasks

    rt = tasks.runtime()
    if rt.settings.trainer.torch_threads:
        torch.set_num_threads(rt.settings.trainer.torch_threads)
    orphans = tasks.enqueue_orphans()
    if orphans:
        log.info("resuming runs left by a dead worker: %s", ", ".join(orphans))


def main() -> None:
    worker_main("trainer", TrainerSettings, warm_up)
