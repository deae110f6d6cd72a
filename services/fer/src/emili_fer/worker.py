"""``emili-fer-worker``: the Celery worker consuming the ``fer`` queue."""

from __future__ import annotations

from emili_core.tasks import worker_main
from emili_fer.settings import FerSettings


def warm_up() -> None:
    from emili_fer import tasks  # Imported here: the probes (``--live``, ``--check``) need none of it.

    tasks.runtime()


def main() -> None:
    worker_main("fer", FerSettings, warm_up)
