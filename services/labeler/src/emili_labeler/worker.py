"""``emili-labeler-worker``: the Celery worker consuming the ``labeler`` queue."""

from __future__ import annotations

from emili_core.tasks import worker_main
from emili_labeler import tasks
from emili_labeler.settings import LabelerSettings


def main() -> None:
    worker_main("labeler", LabelerSettings, tasks.runtime)
