"""Every task is routed to a queue, and every route names a task that exists."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

import pytest

from emili_core.queues import TASK_ROUTES, Queue, UnroutedTaskError
from emili_core.settings import CommonSettings
from emili_core.tasks import create_celery_app, idempotent_task


def _registered_task_names() -> set[str]:
    app = create_celery_app("test", CommonSettings())
    for ep in entry_points(group="emili.services"):
        try:
            importlib.import_module(f"emili_{ep.name}.tasks")
        except ModuleNotFoundError as exc:
            if exc.name != f"emili_{ep.name}.tasks":
                raise
    app.loader.import_default_modules()
    app.finalize(auto=True)
    return {name for name in app.tasks if not name.startswith("celery.")}


def test_every_task_is_routed_and_every_route_is_a_task() -> None:
    registered = _registered_task_names()
    assert registered, "no tasks found; the service task modules did not load"
    assert registered - set(TASK_ROUTES) == set(), "tasks without a route"
    assert set(TASK_ROUTES) - registered == set(), "routes naming no task"


def test_each_route_is_the_queue_named_before_the_dot() -> None:
    for name, queue in TASK_ROUTES.items():
        assert name.split(".")[0] == queue.value
        assert queue in Queue


def test_sending_an_unrouted_task_fails() -> None:
    app = create_celery_app("test", CommonSettings())
    with pytest.raises(UnroutedTaskError, match="no route"):
        app.send_task("fer.not_a_task", args=[])


def test_an_unrouted_task_cannot_be_defined() -> None:
    with pytest.raises(LookupError, match="no route"):

        @idempotent_task("labeler.unrouted")
        def unrouted(self: object) -> None:
            pass


def test_idempotent_tasks_ack_late_and_retry_only_transient_errors() -> None:
    app = create_celery_app("test", CommonSettings())
    importlib.import_module("emili_fer.tasks")
    app.finalize(auto=True)
    task = app.tasks["fer.analyze_session_frames"]
    assert task.acks_late and task.reject_on_worker_lost
    assert ConnectionError in task.autoretry_for and Exception not in task.autoretry_for
    assert app.conf.task_serializer == "json" and app.conf.accept_content == ["json"]
    assert app.conf.broker_transport_options["visibility_timeout"] > app.conf.task_time_limit
