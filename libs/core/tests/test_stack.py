"""The local stack's programs and ``emili status`` follow what each service's settings class declares: whether it
has a worker, how its server is health-checked (gRPC health or an HTTP URL), and the links people open."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from emili_core import cli, stack
from emili_core.settings import CommonSettings, HealthCheck, S3Settings
from emili_testing.plugin import free_port


class WebServer:
    """A local HTTP server whose /readyz answers ``status`` (with a JSON body naming what is down)."""

    def __init__(self) -> None:
        self.status = 200
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b'{"status": "ok", "down": []}' if owner.status == 200 else b'{"down": ["chat", "redis"]}'
                self.send_response(owner.status if self.path == "/readyz" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def web() -> Iterator[WebServer]:
    server = WebServer()
    yield server
    server.server.shutdown()
    server.server.server_close()


def http_service(url: str) -> type[CommonSettings]:
    class WebSettings(CommonSettings):
        service_name: ClassVar[str] = "web"
        has_worker: ClassVar[bool] = False

        def health_check(self) -> HealthCheck:
            return HealthCheck("http", f"{url}/readyz")

        def links(self) -> dict[str, str]:
            return {"web app": f"{url}/"}

    return WebSettings


def grpc_service(port: int) -> type[CommonSettings]:
    class RpcSettings(CommonSettings):
        service_name: ClassVar[str] = "rpc"

        def grpc_target(self) -> str:
            return f"127.0.0.1:{port}"

    return RpcSettings


def test_a_service_without_a_worker_runs_only_its_server() -> None:
    classes = {"web": http_service("http://127.0.0.1:1"), "rpc": grpc_service(1)}
    names = [p.name for p in stack.programs(CommonSettings(), ("rpc", "web", "absent"), classes)]
    assert names == ["redis", "s3", "rpc-server", "rpc-worker", "web-server", "absent-server", "absent-worker"]


def test_the_local_stack_runs_the_gateway_server_only() -> None:
    names = {p.name for p in stack.programs(CommonSettings())}
    assert {"gateway-server", "chat-server", "chat-worker"} <= names
    assert "gateway-worker" not in names
    assert "gateway" in stack.LOCAL_SERVICES


def test_the_default_health_check_is_grpc_on_the_grpc_port() -> None:
    assert grpc_service(50099)().health_check() == HealthCheck("grpc", "127.0.0.1:50099")
    assert CommonSettings().links() == {} and CommonSettings().http_url() is None


@pytest.mark.integration
def test_status_checks_each_server_its_own_way(
    web: WebServer, redis_url: str, s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    rpc_port = free_port()  # Nothing listens there.
    classes = {"web": http_service(web.url), "rpc": grpc_service(rpc_port)}
    monkeypatch.setattr(cli, "service_settings_classes", lambda: classes)
    settings = cli.CliSettings(redis_url=redis_url, s3=s3_settings)

    rows = {r.name: r for r in cli.collect_status(settings, ["web", "rpc", "absent"])}
    assert set(rows) == {"redis", "s3", "web-server", "rpc-server", "rpc-worker", "absent-server"}
    assert (rows["web-server"].state, rows["web-server"].detail) == ("SERVING", f"{web.url}/readyz")
    assert rows["web-server"].ok
    assert rows["rpc-server"].state == "UNREACHABLE" and f"127.0.0.1:{rpc_port}" in rows["rpc-server"].detail
    assert rows["rpc-worker"].state == "DOWN" and rows["absent-server"].state == "NOT INSTALLED"

    web.status = 503
    (row,) = [r for r in cli.collect_status(settings, ["web"]) if r.name == "web-server"]
    assert (row.state, row.detail, row.ok) == ("NOT_SERVING", f"{web.url}/readyz: HTTP 503, down: chat, redis", False)

    web.server.shutdown()
    web.server.server_close()
    (row,) = [r for r in cli.collect_status(settings, ["web"]) if r.name == "web-server"]
    assert row.state == "UNREACHABLE" and row.detail.startswith(f"{web.url}/readyz: ")


@pytest.mark.integration
def test_status_prints_the_links(
    web: WebServer, redis_url: str, s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "service_settings_classes", lambda: {"web": http_service(web.url)})
    monkeypatch.setattr(stack, "LOCAL_SERVICES", ("web",))
    env = {
        "EMILI_REDIS_URL": redis_url,
        "EMILI_S3__ENDPOINT": s3_settings.endpoint,
        "EMILI_S3__ACCESS_KEY": s3_settings.access_key.get_secret_value(),
        "EMILI_S3__SECRET_KEY": s3_settings.secret_key.get_secret_value(),
        "EMILI_S3__REGION": s3_settings.region,
        "EMILI_S3__BUCKET_PREFIX": s3_settings.bucket_prefix,
    }
    result = CliRunner().invoke(cli.app, ["status"], env=env)
    assert result.exit_code == 0, result.output
    assert "web-server" in result.stdout and f"web app: {web.url}/" in result.stdout
    as_json = CliRunner().invoke(cli.app, ["status", "--json"], env=env)
    assert "web app" not in as_json.stdout and '"name": "web-server"' in as_json.stdout


def test_the_stacks_listening_ports_come_from_every_services_settings() -> None:
    settings = CommonSettings(s3=S3Settings(endpoint="127.0.0.1:9000"))
    ports = stack.listening_ports(settings)
    assert {6379, 9000, settings.monitoring.prometheus_port, settings.monitoring.flower_port} <= set(ports)
    # Each installed service's gRPC (or HTTP) and metrics ports: the trainer's 50054 is the one seen taken.
    assert {50051, 50052, 50053, 50054, 8080, 9101, 9105} <= set(ports)
    assert 0 not in ports


def test_reserve_ports_adds_the_ports_in_the_ephemeral_range_to_what_is_reserved(tmp_path: Any) -> None:
    port_range, reserved = tmp_path / "range", tmp_path / "reserved"
    port_range.write_text("32768\t60999\n")
    reserved.write_text("40000-40002,45000\n")
    done, failed = stack.reserve_ports([6379, 50051, 50052, 50054, 40001], reserved, port_range)
    assert (done, failed) == ([40001, 50051, 50052, 50054], [])
    assert reserved.read_text() == "40000-40002,45000,50051-50052,50054\n"  # Kept what was there.
    before = reserved.stat().st_mtime_ns
    assert stack.reserve_ports([50051], reserved, port_range) == ([50051], [])
    assert reserved.stat().st_mtime_ns == before  # Already reserved: not written again.


def test_reserve_ports_reports_what_it_could_not_reserve(tmp_path: Any) -> None:
    port_range = tmp_path / "range"
    port_range.write_text("32768 60999\n")
    unwritable = tmp_path / "no-such-dir" / "reserved"
    assert stack.reserve_ports([9000, 50054], unwritable, port_range) == ([], [50054])
    # No such kernel setting (not Linux): nothing is known to collide.
    assert stack.reserve_ports([50054], unwritable, tmp_path / "missing") == ([], [])
    assert stack.reserve_ports([9000], unwritable, port_range) == ([], [])
