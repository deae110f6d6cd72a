"""``emili-fer-worker``: the Celery worker consuming the ``fer`` queue."""

from __future__ import annotations

from emili_core.tasks import worker_main
from emili_fer import tasks
from emili_fer.settings import FerSettings


def main() -> None:
    worker_main("fer", FerSettings, tasks.runtime)
