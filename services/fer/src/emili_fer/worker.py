"""``emili-fer-worker``: the Celery worker consuming the ``fer`` queue."""

from __future__ import annotations

import sys

from emili_core.logs import configure_logging
from emili_core.settings import load_settings
from emili_core.tasks import create_celery_app, run_worker
from emili_fer.settings import FerSettings


def main() -> None:
    settings = load_settings(FerSettings)
    configure_logging("fer-worker", settings.log_level, settings.log_format)
    app = create_celery_app("fer", settings)
    import emili_fer.tasks  # noqa: F401  (registers the tasks on the app)
    from emili_fer.tasks import runtime

    if "--check" not in sys.argv:
        runtime()  # Load the model and create buckets before taking work.
    worker = settings.fer.worker
    run_worker(app, "fer", settings, worker.concurrency, worker.metrics_port, sys.argv[1:])
