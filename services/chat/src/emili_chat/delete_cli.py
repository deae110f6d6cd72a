"""``emili chat delete-user USER_ID`` and ``emili chat delete-session SESSION_ID``: delete a person's data.

Chat deletes the sessions (Redis, the record in object storage, stored frames; a tombstone stays), then, unless
``--no-labels``, the labeler's ``labeler.forget_sessions`` is sent by name over Celery (labels, datasets built from
the sessions withdrawn and rebuilt without them, per-user weights) and awaited. Both print what they removed and
their audit record. The token is ``EMILI_CLI__TOKEN`` when set (e.g. the user's own), else an admin token made
from the configured secret.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.markup import escape

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_chat.settings import ChatSettings
from emili_core.grpc_client import make_channel
from emili_core.settings import TLSSettings, load_settings

console = Console()
FORGET_TASK = "labeler.forget_sessions"

Target = Annotated[str | None, typer.Option(help="Chat server address (default from settings).")]
Reason = Annotated[str, typer.Option(help="A short reason for the audit log (no personal content).")]
Labels = Annotated[
    bool, typer.Option("--labels/--no-labels", help="Also have the labeler forget the sessions (and wait for it).")
]
Wait = Annotated[float, typer.Option(help="Seconds to wait for the labeler.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print what was removed as JSON.")]


def register(app: typer.Typer) -> None:
    app.command("delete-user")(delete_user)
    app.command("delete-session")(delete_session)


def _token() -> str:
    from emili_core.auth import create_token
    from emili_core.cli import CliSettings

    settings = load_settings(CliSettings)
    if settings.token is not None:
        return settings.token.get_secret_value()
    secret = settings.auth.secret.get_secret_value()
    return create_token(secret, "emili-cli", ["admin"], ttl_seconds=600, issuer=settings.auth.issuer)


def _session_json(s: chat_pb2.DeletedSession) -> dict[str, Any]:
    return {
        "session_id": s.session_id,
        "already_deleted": s.already_deleted,
        "redis_keys": list(s.redis_keys),
        "events": s.events,
        "record_objects": s.record_objects,
        "frames": s.frames,
        "tombstone_key": s.tombstone_key,
        "deleted_ms": s.deleted_ms,
    }


async def _delete_user(
    target: str, tls: TLSSettings, token: str, user_id: str, session_ids: list[str], reason: str
) -> chat_pb2.DeleteUserDataResponse:
    async with make_channel(target, token, tls=tls, timeout=300) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = chat_pb2.DeleteUserDataRequest(user_id=user_id, session_ids=session_ids, reason=reason)
        reply: chat_pb2.DeleteUserDataResponse = await stub.DeleteUserData(request)
        return reply


async def _delete_session(
    target: str, tls: TLSSettings, token: str, session_id: str, reason: str
) -> chat_pb2.DeleteSessionDataResponse:
    async with make_channel(target, token, tls=tls, timeout=300) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        request = chat_pb2.DeleteSessionDataRequest(session_id=session_id, reason=reason)
        reply: chat_pb2.DeleteSessionDataResponse = await stub.DeleteSessionData(request)
        return reply


def _forget(settings: ChatSettings, session_ids: list[str], user_ids: list[str], reason: str, wait: float) -> Any:
    from emili_core.tasks import create_celery_app

    app = create_celery_app("chat-cli", settings)
    try:
        kwargs = {"session_ids": session_ids, "user_ids": user_ids, "requested_by": "emili-cli", "reason": reason}
        result = app.send_task(FORGET_TASK, kwargs=kwargs)
        deadline = time.monotonic() + wait
        while not result.ready():
            if time.monotonic() > deadline:
                return {"task_id": result.id, "state": "still running after the wait (is a labeler worker up?)"}
            time.sleep(0.5)
        if result.failed():
            return {"task_id": result.id, "state": f"failed: {result.result}"}
        return result.result
    finally:
        app.close()


def _run(work: Any) -> Any:
    try:
        return asyncio.run(work)
    except grpc.aio.AioRpcError as exc:
        console.print(f"[red]error:[/red] {exc.code().name}: {escape(exc.details() or '')}")
        raise typer.Exit(1) from None


def _report(chat: dict[str, Any], labeler: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"chat": chat, "labeler": labeler}, indent=2, sort_keys=True))
        return
    for s in chat["sessions"]:
        again = " (already deleted before: swept again)" if s["already_deleted"] else ""
        console.print(
            f"session {s['session_id']}{again}: {len(s['redis_keys'])} Redis keys ({s['events']} events), "
            f"{s['record_objects']} record objects, {s['frames']} frames; tombstone {s['tombstone_key']}",
            markup=False,
        )
    if not chat["sessions"]:
        console.print("no sessions found", style="yellow")
    console.print(f"chat audit record: {chat['audit_key']}", style="dim", markup=False)
    if labeler is None:
        return
    if "audit_key" not in labeler:
        console.print(f"labeler: {labeler}", style="yellow", markup=False)
        return
    console.print(
        f"labeler: {labeler['labels']} labels deleted, {labeler['datasets_withdrawn']} datasets withdrawn "
        f"({labeler['datasets_rebuilt']} rebuilt without the sessions), {labeler['user_weight_entries']} "
        "per-user weight entries removed",
        markup=False,
    )
    for dataset in labeler.get("datasets", []):
        console.print(
            f"  dataset {dataset['id']} withdrawn; replacement {dataset['replacement'] or '-'} ({dataset['note']})",
            markup=False,
        )
    console.print(f"labeler audit record: {labeler['audit_key']}", style="dim", markup=False)


def delete_user(
    user_id: Annotated[str, typer.Argument(help="The user id (token subject) whose sessions are deleted.")],
    session: Annotated[
        list[str] | None, typer.Option("--session", help="Also this session (repeatable), if chat's index lacks it.")
    ] = None,
    reason: Reason = "user request",
    labels: Labels = True,
    wait: Wait = 300.0,
    target: Target = None,
    as_json: AsJson = False,
) -> None:
    """Delete every session of USER_ID (admin): chat's data, then the labeler's."""
    settings = load_settings(ChatSettings)
    reply = _run(
        _delete_user(target or settings.grpc_target(), settings.tls, _token(), user_id, list(session or []), reason)
    )
    chat = {"user_id": reply.user_id, "sessions": [_session_json(s) for s in reply.sessions]}
    chat["audit_key"] = reply.audit_key
    ids = [s["session_id"] for s in chat["sessions"]]
    forgotten = _forget(settings, ids, [reply.user_id], reason, wait) if labels and ids else None
    _report(chat, forgotten, as_json)


def delete_session(
    session_id: Annotated[str, typer.Argument(help="The session whose data are deleted.")],
    reason: Reason = "user request",
    labels: Labels = True,
    wait: Wait = 300.0,
    target: Target = None,
    as_json: AsJson = False,
) -> None:
    """Delete one session's data (its owner's token in EMILI_CLI__TOKEN, or admin): chat's, then the labeler's."""
    settings = load_settings(ChatSettings)
    reply = _run(_delete_session(target or settings.grpc_target(), settings.tls, _token(), session_id, reason))
    chat = {"sessions": [_session_json(reply.deleted)], "audit_key": reply.audit_key}
    forgotten = _forget(settings, [session_id], [], reason, wait) if labels else None
    _report(chat, forgotten, as_json)
