"""``emili-labeler-worker``: the Celery worker consuming the ``labeler`` queue."""

from __future__ import annotations

import sys

from emili_core.logs import configure_logging
from emili_core.settings import load_settings
from emili_core.tasks import create_celery_app, run_worker
from emili_labeler.settings import LabelerSettings


def main() -> None:
    settings = load_settings(LabelerSettings)
    configure_logging("labeler-worker", settings.log_level, settings.log_format)
    app = create_celery_app("labeler", settings)
    import emili_labeler.tasks  # noqa: F401  (registers the tasks on the app)
    from emili_labeler.tasks import runtime

    if "--check" not in sys.argv:
        runtime()
    worker = settings.labeler.worker
    run_worker(app, "labeler", settings, worker.concurrency, worker.metrics_port, sys.argv[1:])
