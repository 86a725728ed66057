"""health.check_proxy through a real tinyproxy configured from the one proxy template."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tilehopper.proxyconf import ProxySettings, parse_user_data, render_user_data
from tilehopper_bench import procs
from tilehopper_operator.health import check_proxy, looks_like_image, proxy_url_with_credentials

pytestmark = pytest.mark.bench

USERNAME = "health-user"
PASSWORD = "s3cret-Pa55word-xyz"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


class Tiles(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith("/vt"):
            self._answer(200, "image/png", PNG)
        elif self.path.startswith("/banned"):
            self._answer(403, "text/html", b"banned")
        elif self.path.startswith("/html"):
            self._answer(200, "text/html", b"<html>not a tile</html>")
        else:
            self._answer(404, "text/plain", b"no")

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def tile_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Tiles)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def proxy(tile_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.skip("tinyproxy is not installed")
    workdir: Path = tmp_path_factory.mktemp("proxy")
    port = procs.free_port()
    tile_port = int(tile_server.rsplit(":", 1)[1])
    settings = ProxySettings(
        username=USERNAME, password=PASSWORD, allowed_cidrs=("127.0.0.0/8",), http_ports=(tile_port,), port=port
    )
    parsed = parse_user_data(render_user_data(settings), "127.0.0.1", str(workdir / "filter"))
    (workdir / "filter").write_text(parsed.filter)
    (workdir / "tinyproxy.conf").write_text(parsed.config)
    proc = procs.start("tinyproxy", [binary, "-d", "-c", str(workdir / "tinyproxy.conf")], log_dir=workdir)
    try:
        procs.wait_for(lambda: procs.port_open("127.0.0.1", port), timeout=10, what="tinyproxy", proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop(timeout=5)


def test_healthy_proxy_brings_back_a_tile(proxy: str, tile_server: str, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    ok, detail = check_proxy(
        proxy_url=proxy, username=USERNAME, password=PASSWORD, probe_url=f"{tile_server}/vt?lyrs=s&x=1&y=2&z=3"
    )
    assert ok, detail
    assert "image/png" in detail
    assert PASSWORD not in detail and PASSWORD not in caplog.text


def test_wrong_credentials_are_not_healthy(proxy: str, tile_server: str):
    ok, detail = check_proxy(proxy_url=proxy, username=USERNAME, password="wrong-password-1", probe_url=f"{tile_server}/vt")
    assert not ok and "credentials refused" in detail
    assert "wrong-password-1" not in detail
    ok, detail = check_proxy(proxy_url=proxy, username="", password="", probe_url=f"{tile_server}/vt")
    assert not ok and "credentials refused" in detail


def test_a_ban_is_not_healthy(proxy: str, tile_server: str):
    ok, detail = check_proxy(proxy_url=proxy, username=USERNAME, password=PASSWORD, probe_url=f"{tile_server}/banned")
    assert not ok and "403" in detail


def test_a_200_without_an_image_is_not_healthy(proxy: str, tile_server: str):
    ok, detail = check_proxy(proxy_url=proxy, username=USERNAME, password=PASSWORD, probe_url=f"{tile_server}/html")
    assert not ok and "no image" in detail


def test_a_dead_proxy_is_not_healthy_and_the_error_hides_the_password(tile_server: str):
    dead = f"http://127.0.0.1:{procs.free_port()}"
    ok, detail = check_proxy(proxy_url=dead, username=USERNAME, password=PASSWORD, probe_url=f"{tile_server}/vt", timeout=2)
    assert not ok
    assert PASSWORD not in detail and USERNAME not in detail


def test_helpers():
    assert proxy_url_with_credentials("http://127.1.0.4:8888", "u", "p@ss/word") == "http://u:p%40ss%2Fword@127.1.0.4:8888"
    assert looks_like_image("image/png", b"x")
    assert looks_like_image("application/octet-stream", PNG)
    assert not looks_like_image("image/png", b"")
    assert not looks_like_image("text/html", b"<html>")
