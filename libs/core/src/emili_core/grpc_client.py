"""Client channels that always carry a deadline and a token, and retry only UNAVAILABLE.

Retries use gRPC's own retry policy (service config), so they also cover streaming calls
before the first response and never retry a call that already reached the server's logic.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from emili_core.auth import create_token

if TYPE_CHECKING:
    from emili_core.settings import TLSSettings

DEFAULT_TIMEOUT_SECONDS = 10.0
# A token, or something that returns a current one for each call (``ServiceToken``).
TokenSource = str | Callable[[], str] | None


class ServiceToken:
    """A service's own short-lived token, minted again before it expires.

    Pass it as ``make_channel(..., token=ServiceToken(...))``: each call asks it for the current token, so a
    long-running service never holds a token that outlives ``ttl_seconds`` (a leaked one soon stops working).
    """

    def __init__(
        self,
        secret: str,
        subject: str,
        scopes: list[str],
        *,
        ttl_seconds: int = 15 * 60,
        issuer: str = "emili",
        refresh_before_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_seconds < 60:
            raise ValueError("a service token must live at least 60 s")
        self._secret, self._subject, self._scopes = secret, subject, scopes
        self.ttl_seconds, self._issuer, self._clock = ttl_seconds, issuer, clock
        # Renew when a fifth of its life is left (at least 30 s), so a token is never sent about to expire.
        self.refresh_before = refresh_before_seconds if refresh_before_seconds is not None else max(30, ttl_seconds / 5)
        self._lock = threading.Lock()
        self._token = ""
        self._expires = 0.0

    def __call__(self) -> str:
        with self._lock:
            now = self._clock()
            if now >= self._expires - self.refresh_before:
                self._token = create_token(self._secret, self._subject, self._scopes, self.ttl_seconds, self._issuer)
                self._expires = now + self.ttl_seconds
            return self._token


def channel_credentials(tls: TLSSettings) -> grpc.ChannelCredentials:
    """Client credentials: trust ``tls.ca_file`` (system roots when unset); present a client certificate when the
    servers require one (``tls.require_client_cert``)."""
    ca = tls.ca_file.read_bytes() if tls.ca_file is not None else None
    if tls.require_client_cert:
        return grpc.ssl_channel_credentials(ca, tls.key_file.read_bytes(), tls.cert_file.read_bytes())
    return grpc.ssl_channel_credentials(ca)


def tls_options(tls: TLSSettings | None) -> list[tuple[str, Any]]:
    if tls is not None and tls.enabled and tls.server_name_override:
        return [("grpc.ssl_target_name_override", tls.server_name_override)]
    return []


def open_channel(
    target: str,
    tls: TLSSettings | None = None,
    *,
    options: list[tuple[str, Any]] | None = None,
    interceptors: list[Any] | None = None,
) -> grpc.aio.Channel:
    """A bare aio channel: over TLS when ``tls`` is enabled, plaintext otherwise. Prefer ``make_channel``."""
    options = [*(options or []), *tls_options(tls)]
    if tls is not None and tls.enabled:
        return grpc.aio.secure_channel(target, channel_credentials(tls), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


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

    def __init__(self, token: TokenSource, timeout: float, stream_timeout: float | None) -> None:
        self.token = token
        self.timeout = timeout
        self.stream_timeout = stream_timeout

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.token() if callable(self.token) else self.token
        return (("authorization", f"Bearer {token}"),) if token else ()

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
    token: TokenSource = None,
    *,
    tls: TLSSettings | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    stream_timeout: float | None = 3600.0,
    max_attempts: int = 4,
    max_message_bytes: int = 16 * 1024 * 1024,
) -> grpc.aio.Channel:
    """An aio channel with deadlines, auth and retries; over TLS when ``tls`` (``settings.tls``) is enabled.

    ``token`` is a bearer token, or a callable asked for one on every call (``ServiceToken``)."""
    options = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(max_attempts)),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    defaults = _CallDefaults(token, timeout, stream_timeout)
    interceptors = [cls(defaults) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
    return open_channel(target, tls, options=options, interceptors=interceptors)
