"""``emili-chat-worker``: the Celery worker consuming the ``chat`` queue (persists session records)."""

from __future__ import annotations

import sys

from emili_chat.settings import ChatSettings
from emili_core.logs import configure_logging
from emili_core.settings import load_settings
from emili_core.tasks import create_celery_app, run_worker


def main() -> None:
    settings = load_settings(ChatSettings)
    configure_logging("chat-worker", settings.log_level, settings.log_format)
    app = create_celery_app("chat", settings)
    import emili_chat.tasks  # noqa: F401  (registers the tasks on the app)
    from emili_chat.tasks import runtime

    if "--check" not in sys.argv:
        runtime()
    worker = settings.chat.worker
    run_worker(app, "chat", settings, worker.concurrency, worker.metrics_port, sys.argv[1:])
