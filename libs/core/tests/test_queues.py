"""Every task is routed to a queue, and every route names a task that exists."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

import pytest
from pydantic import ValidationError

from emili_core.queues import REDELIVERY, TASK_ROUTES, Queue, Redelivery, UnroutedTaskError
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


def test_each_queue_has_its_own_redelivery_and_unacked_keys() -> None:
    assert set(REDELIVERY) == set(Queue)
    chat = create_celery_app("chat", CommonSettings())
    trainer = create_celery_app("trainer", CommonSettings())
    chat_options, trainer_options = chat.conf.broker_transport_options, trainer.conf.broker_transport_options
    assert chat_options["visibility_timeout"] <= 60  # A chat record comes back within a minute of a worker's death.
    assert trainer_options["visibility_timeout"] >= 12 * 3600  # A training run is not handed to a second GPU.
    for app in (chat, trainer):
        assert app.conf.broker_transport_options["visibility_timeout"] > app.conf.task_time_limit
    assert chat_options["unacked_key"] == "unacked:chat" and trainer_options["unacked_key"] == "unacked:trainer"
    assert chat_options["unacked_index_key"] != trainer_options["unacked_index_key"]
    assert chat_options["unacked_mutex_key"] != trainer_options["unacked_mutex_key"]


def test_per_queue_redelivery_is_validated_and_overridable(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="must exceed"):
        Redelivery(visibility_timeout_s=30, task_time_limit_s=30)
    monkeypatch.setenv("EMILI_QUEUES", '{"chat": {"visibility_timeout_s": 90, "task_time_limit_s": 60}}')
    assert CommonSettings().redelivery("chat") == Redelivery(90, 60)
    monkeypatch.setenv("EMILI_QUEUES", '{"chat": {"visibility_timeout_s": 60, "task_time_limit_s": 60}}')
    with pytest.raises(ValidationError, match="must exceed"):
        CommonSettings()
    monkeypatch.delenv("EMILI_QUEUES")
    assert (
        CommonSettings().redelivery("not-a-queue").visibility_timeout_s == CommonSettings().visibility_timeout_seconds
    )


def test_persisting_a_session_retries_for_as_long_as_storage_is_down() -> None:
    app = create_celery_app("chat", CommonSettings())
    importlib.import_module("emili_chat.tasks")
    app.finalize(auto=True)
    task = app.tasks["chat.persist_session"]
    assert task.max_retries is None
    assert task.retry_backoff_max < app.conf.broker_transport_options["visibility_timeout"]


@pytest.mark.integration
def test_a_live_worker_renews_the_leases_of_the_messages_it_holds(redis_url: str) -> None:
    import types

    import redis

    from emili_core.tasks import LeaseRenewal

    client = redis.Redis.from_url(redis_url)
    index = "unacked_index:leasetest"
    client.delete(index)
    client.zadd(index, {"tag-1": 1.0, "tag-2": 1.0, "other": 1.0})
    lease = LeaseRenewal("leasetest", redis_url, visibility_s=3600)
    request = types.SimpleNamespace(id="task-1", message=types.SimpleNamespace(delivery_tag="tag-1"))
    lease._received(request=request)
    retry = types.SimpleNamespace(id="task-1", message=types.SimpleNamespace(delivery_tag="tag-2"))
    lease._received(request=retry)  # Its retry, received before the first run ends.
    lease._postrun(task_id="task-1")
    assert lease.renew() == 1
    scores = dict(client.zrange(index, 0, -1, withscores=True))
    assert scores[b"tag-2"] > 1.0 and scores[b"tag-1"] == 1.0 and scores[b"other"] == 1.0
    lease.running["task-2"] = ["gone"]  # Acknowledged meanwhile: not added back.
    lease.renew()
    assert client.zscore(index, "gone") is None
    client.delete(index)


@pytest.mark.integration
def test_a_worker_waits_for_its_dependencies_instead_of_exiting(redis_url: str) -> None:
    from emili_core.errors import DependencyUnavailable
    from emili_core.tasks import wait_until_ready

    calls = []

    def warm_up() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise DependencyUnavailable("object store down")

    wait_until_ready("test", CommonSettings(redis_url=redis_url), warm_up, max_delay_s=0.01)
    assert len(calls) == 3


def test_the_global_numbers_when_set_still_apply_to_every_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMILI_TASK_TIME_LIMIT_SECONDS", "8")
    monkeypatch.setenv("EMILI_VISIBILITY_TIMEOUT_SECONDS", "10")
    assert CommonSettings().redelivery("fer") == Redelivery(10, 8)
