"""``emili-gateway-server``: the gateway's HTTP server (uvicorn) and, on its own port, /metrics."""

from __future__ import annotations

import logging
import re

import uvicorn

from emili_core.logs import configure_logging
from emili_core.metrics import start_metrics_server
from emili_core.settings import load_settings
from emili_gateway.app import create_app
from emili_gateway.serving import ReadinessGauge
from emili_gateway.settings import GatewaySettings

_TOKEN_IN_URL = re.compile(r"(token=)[^&\s\"']+")


class RedactTokens(logging.Filter):
    """uvicorn logs WebSocket paths with their query, where a client may put its bearer token."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = _TOKEN_IN_URL.sub(r"\1[redacted]", message), ()
        return True


def serve() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging("gateway", settings.log_level, settings.log_format)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(RedactTokens())
    server = settings.gateway.server
    start_metrics_server(server.metrics_port, settings.metrics_host)
    uvicorn.run(
        ReadinessGauge(create_app(settings)),  # /readyz's answers as emili_server_serving{service="gateway"}.
        host=server.host,
        port=server.http_port,
        # Our own logging set-up (JSON in production); access lines would print invite codes and tokens in URLs.
        log_config=None,
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=server.forwarded_allow_ips,
        ws_max_size=settings.gateway.limits.max_ws_message_bytes,
        timeout_graceful_shutdown=int(server.grace_seconds),
    )
