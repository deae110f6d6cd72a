"""``emili-chat-worker``: the Celery worker consuming the ``chat`` queue (persists session records).

Beside its tasks it runs the reconciler (:mod:`emili_chat.reconcile`) on a timer; a Redis lock lets one worker
at a time do it.
"""

from __future__ import annotations

from celery import Celery

from emili_chat import tasks
from emili_chat.reconcile import Reconciler
from emili_chat.settings import ChatSettings
from emili_core.tasks import worker_main


def start_reconciler(app: Celery, settings: ChatSettings) -> None:
    options = settings.chat.reconcile
    if not options.enabled:
        return
    client, store = tasks.runtime()

    def enqueue(session_id: str) -> None:
        app.send_task("chat.persist_session", args=[session_id])

    Reconciler(client, store, enqueue, interval_s=options.interval_s, requeue_after_s=options.requeue_after_s).start()


def main() -> None:
    worker_main("chat", ChatSettings, tasks.runtime, start_reconciler)
