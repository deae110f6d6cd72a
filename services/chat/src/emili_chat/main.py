"""``emili-chat-server``: the chat gRPC server."""

from __future__ import annotations

import asyncio
import logging

import grpc

from emili.chat.v1 import chat_pb2, chat_pb2_grpc
from emili_chat.engine import ChatEngine
from emili_chat.llm import ChatBackend, build_backend
from emili_chat.servicer import ChatServicer
from emili_chat.settings import ChatSettings
from emili_chat.store import SessionStore, redis_client
from emili_core.grpc_client import ServiceToken, make_channel
from emili_core.grpc_server import ServiceApp, serve_forever
from emili_core.logs import configure_logging
from emili_core.objectstore import ObjectStore
from emili_core.settings import load_settings
from emili_core.tasks import create_celery_app

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
log = logging.getLogger(__name__)


def make_backend(settings: ChatSettings) -> ChatBackend:
    llm = settings.chat.llm
    if llm.backend == "local":
        model = settings.artifact(llm.local_model)
        is_gguf = model.suffix == ".gguf"
        return build_backend(
            "local",
            model_path=model.parent if is_gguf else model,
            gguf_file=model.name if is_gguf else None,
            cache_dir=settings.artifact(llm.local_cache) if is_gguf else None,
            context_window=llm.context_window,
            threads=llm.local_threads or None,
            max_batch=llm.local_max_batch,
            prefix_cache_tokens=llm.local_prefix_cache_tokens,
            weights=llm.local_weights,
        )
    return build_backend(
        llm.backend,
        base_url=llm.base_url,
        api_key=llm.api_key.get_secret_value(),
        model=llm.model,
        context_window=llm.context_window,
        **({"lora_dir": llm.lora_dir} if llm.backend == "openai" else {}),
    )


def build_app(settings: ChatSettings, backend: ChatBackend | None = None) -> ServiceApp:
    """The chat service: its own token (scope ``fer``) to call the FER service; sessions in Redis."""
    # Chat's own token for FER: short-lived (15 min), minted again before it expires, asked for on every call.
    fer_token = ServiceToken(
        settings.auth.secret.get_secret_value(), "chat-service", ["fer"], issuer=settings.auth.issuer
    )
    objects = ObjectStore(settings.s3)
    celery = create_celery_app("chat", settings)

    def persist_later(session_id: str) -> None:
        celery.send_task("chat.persist_session", args=[session_id])

    resilience = settings.chat.resilience
    engine = ChatEngine(
        settings,
        backend or make_backend(settings),
        SessionStore(
            redis_client(
                settings.redis_url,
                health_check_interval_s=resilience.redis_health_check_interval_s,
                command_retries=resilience.redis_command_retries,
                socket_timeout_s=resilience.redis_socket_timeout_s,
            ),
            retry_s=resilience.redis_retry_s,
            retry_initial_s=resilience.redis_retry_initial_s,
        ),
        objects=objects,
        on_session_ended=persist_later,
    )

    def register(server: grpc.aio.Server) -> None:
        chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(engine), server)

    async def startup() -> None:
        # gRPC aio channels belong to the event loop they are made in: make it in the server's loop.
        engine.fer_channel = make_channel(
            settings.chat.fer_target, fer_token, tls=settings.tls, stream_timeout=24 * 3600
        )
        await asyncio.to_thread(objects.ensure_buckets)
        await engine.store.redis.ping()
        await engine.start()

    async def shutdown() -> None:
        if engine.frames is not None:  # Store what is buffered while storage answers, for a while.
            await engine.frames.close(settings.chat.frame_buffer.drain_s)
        if engine.fer_channel is not None:
            await engine.fer_channel.close()
        await engine.store.redis.aclose()

    return ServiceApp(name="chat", service_names=[SERVICE_NAME], register=register, startup=startup, shutdown=shutdown)


def serve() -> None:
    settings = load_settings(ChatSettings)
    configure_logging("chat", settings.log_level, settings.log_format)
    asyncio.run(serve_forever(build_app(settings), settings, settings.chat.server))
