"""``emili-labeler-worker``: the Celery worker consuming the ``labeler`` queue."""

from __future__ import annotations

from emili_core.tasks import worker_main
from emili_labeler.settings import LabelerSettings


def warm_up() -> None:
    from emili_labeler import tasks  # Imported here: the probes (``--live``, ``--check``) need none of it.

    tasks.runtime()


def main() -> None:
    worker_main("labeler", LabelerSettings, warm_up)
