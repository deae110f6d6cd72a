"""The gateway's ``emili_server_serving{service="gateway"}``: what /readyz answers, as the gRPC servers export their
health status.

Readiness is computed by the /readyz route on request. ``ReadinessGauge`` wraps the ASGI app: every /readyz answer
sets the gauge (200: 1, anything else: 0), and when nobody asked for ``interval_s`` (no kubelet probing, as in the
local stack) it asks itself in-process, so the gauge never stays at a stale 1. It reads 0 until the first answer
and from the lifespan's shutdown on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx

from emili_core.metrics import serving_gauge

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

READINESS_PATH = "/readyz"
# The kubelet's readiness period (deploy/k8s/base/gateway/server.yaml) and a little more.
INTERVAL_S = 15.0


class ReadinessGauge:
    def __init__(self, app: ASGIApp, service: str = "gateway", interval_s: float = INTERVAL_S) -> None:
        self.app = app
        self.interval_s = interval_s
        self.gauge = serving_gauge().labels(service)
        self.gauge.set(0)
        self.last_answer = 0.0  # time.monotonic() of the last /readyz answer, 0: none yet.
        self._prober: asyncio.Task[None] | None = None

    def record(self, ready: bool) -> None:
        self.gauge.set(1 if ready else 0)
        self.last_answer = time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") == READINESS_PATH:

            async def observe(message: Message) -> None:
                if message["type"] == "http.response.start":
                    self.record(message["status"] == 200)
                await send(message)

            await self.app(scope, receive, observe)
        elif scope["type"] == "lifespan":
            await self.app(scope, self._lifespan_receive(receive), self._lifespan_send(send))
        else:
            await self.app(scope, receive, send)

    def _lifespan_send(self, send: Send) -> Send:
        async def started(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and self._prober is None:
                self._prober = asyncio.create_task(self._probe_when_idle(), name="gateway-readiness")
            await send(message)

        return started

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def stopping() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self._stop_probing()
                self.gauge.set(0)
            return message

        return stopping

    async def _stop_probing(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None

    async def _probe_when_idle(self) -> None:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            while True:
                if time.monotonic() - self.last_answer >= self.interval_s:
                    await self.probe(client)
                await asyncio.sleep(self.interval_s / 3)

    async def probe(self, client: httpx.AsyncClient) -> None:
        try:
            response = await client.get(READINESS_PATH, timeout=30)
        except Exception as exc:  # Whatever broke, the gateway cannot say it is ready.
            log.warning("gateway readiness self-check failed: %s", exc)
            self.record(False)
        else:
            self.record(response.status_code == 200)
