"""Client channels that always carry a deadline and a token, and retry only UNAVAILABLE.

Retries use gRPC's own retry policy (service config), so they also cover streaming calls
before the first response and never retry a call that already reached the server's logic.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc

DEFAULT_TIMEOUT_SECONDS = 10.0


def retry_service_config(max_attempts: int = 4, initial_backoff: float = 0.1, max_backoff: float = 2.0) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{}],  # Every service and method on the channel.
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": f"{initial_backoff}s",
                        "maxBackoff": f"{max_backoff}s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


class _CallDefaults:
    """Adds the bearer token and, when the caller gave none, the default deadline."""

    def __init__(self, token: str | None, timeout: float, stream_timeout: float | None) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.stream_timeout = stream_timeout

    def details(self, details: grpc.aio.ClientCallDetails, streaming: bool) -> grpc.aio.ClientCallDetails:
        timeout = details.timeout
        if timeout is None:
            timeout = self.stream_timeout if streaming else self.timeout
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files each interceptor under the first call type it matches, so each type needs its own class.
class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, defaults: _CallDefaults) -> None:
        self.defaults = defaults

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(self.defaults.details(details, False), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, defaults: _CallDefaults) -> None:
        self.defaults = defaults

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(self.defaults.details(details, True), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, defaults: _CallDefaults) -> None:
        self.defaults = defaults

    async def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await continuation(self.defaults.details(details, False), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, defaults: _CallDefaults) -> None:
        self.defaults = defaults

    async def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return await continuation(self.defaults.details(details, True), requests)


def make_channel(
    target: str,
    token: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    stream_timeout: float | None = 3600.0,
    max_attempts: int = 4,
    max_message_bytes: int = 16 * 1024 * 1024,
) -> grpc.aio.Channel:
    """An insecure aio channel (TLS terminates at the mesh/ingress) with deadlines, auth and retries."""
    options = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(max_attempts)),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    defaults = _CallDefaults(token, timeout, stream_timeout)
    interceptors = [cls(defaults) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
