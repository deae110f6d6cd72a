"""``emili-chat-worker``: the Celery worker consuming the ``chat`` queue (persists session records).

Beside its tasks it runs the reconciler (:mod:`emili_chat.reconcile`) on a timer; a Redis lock lets one worker
at a time do it. The same timer enqueues the retention sweep once per configured period, across all workers.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from emili_chat.reconcile import Reconciler
from emili_chat.settings import ChatSettings
from emili_core.tasks import worker_main


def start_reconciler(app: Any, settings: ChatSettings) -> None:
    options = settings.chat.reconcile
    if not options.enabled:
        return
    from emili_chat import tasks

    client, store = tasks.runtime()

    def enqueue(session_id: str) -> None:
        app.send_task("chat.persist_session", args=[session_id])

    Reconciler(client, store, enqueue, interval_s=options.interval_s, requeue_after_s=options.requeue_after_s).start()
    if options.retention_sweep_interval_s > 0:
        period = options.retention_sweep_interval_s
        threading.Thread(
            target=_schedule_retention,
            args=(app, client, period, options.interval_s),
            name="chat-retention",
            daemon=True,
        ).start()


RETENTION_DUE_KEY = "emili:chat:retention:scheduled"
log = logging.getLogger(__name__)


def schedule_retention_once(app: Any, client: redis.Redis, period_s: float) -> bool:
    """Enqueue ``chat.retention_sweep`` unless one was enqueued within ``period_s`` (by any worker): the key's
    expiry is the schedule, so restarts and several workers still give one sweep per period."""
    if not client.set(RETENTION_DUE_KEY, "1", nx=True, px=max(1000, int(period_s * 1000))):
        return False
    app.send_task("chat.retention_sweep")
    return True


def _schedule_retention(app: Any, client: redis.Redis, period_s: float, check_every_s: float) -> None:
    stopped = threading.Event()
    while not stopped.wait(check_every_s):
        try:
            if schedule_retention_once(app, client, period_s):
                log.info("retention sweep enqueued (next in %.0f s)", period_s)
        except Exception:  # Redis down for a moment: the next check tries again.
            log.exception("could not schedule the retention sweep")


def warm_up() -> None:
    from emili_chat import tasks  # Imported here: the probes (``--live``, ``--check``) need none of it.

    tasks.runtime()


def main() -> None:
    worker_main("chat", ChatSettings, warm_up, start_reconciler)
