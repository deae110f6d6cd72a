"""``emili-chat-worker``: the Celery worker consuming the ``chat`` queue (persists session records)."""

from __future__ import annotations

from emili_chat import tasks
from emili_chat.settings import ChatSettings
from emili_core.tasks import worker_main


def main() -> None:
    worker_main("chat", ChatSettings, tasks.runtime)
