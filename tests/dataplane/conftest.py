"""Real processes for the data-plane tests: RabbitMQ, the bench's tile server, plain tinyproxies.

These tests need no Kubernetes and no moto, so they start only what they use (on free loopback
ports, stopped by PID at the end). Each test gets its own queue and tiles folder.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tilehopper.proxyconf import PRIVATE_IP, ProxySettings, render_config, render_filter
from tilehopper_bench import procs

PROXY_USER = "tileuser1"
PROXY_PASSWORD = "proxy-pass-1234"

needs_rabbit = pytest.mark.skipif(
    not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists() or shutil.which("tinyproxy") is None,
    reason="needs Debian's rabbitmq-server and tinyproxy",
)


def distinct_ports(count: int) -> list[int]:
    """Free loopback ports, all different: each socket stays bound until all are picked."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


@pytest.fixture(scope="session")
def dataplane_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dataplane")


@pytest.fixture(scope="session")
def rabbit(dataplane_dir: Path) -> Iterator[object]:
    from tilehopper_bench.rabbit import RabbitMQ

    amqp, mgmt, epmd, dist = distinct_ports(4)
    broker = RabbitMQ(dataplane_dir / "rabbit", amqp_port=amqp, mgmt_port=mgmt, epmd_port=epmd, dist_port=dist)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def tile_server_session(dataplane_dir: Path) -> Iterator[object]:
    from tilehopper_bench.tileserver import TileServer

    server = TileServer(dataplane_dir / "tileserver")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tile_server(tile_server_session: object) -> object:
    tile_server_session.reset(keep_config=False)  # type: ignore[attr-defined]
    return tile_server_session


class Tinyproxy:
    """One tinyproxy on its own loopback address, binding its outgoing traffic to it (like an instance)."""

    def __init__(self, workdir: Path, ip: str, tile_port: int) -> None:
        self.ip = ip
        self.port = procs.free_port(ip)
        self.workdir = workdir
        settings = ProxySettings(username=PROXY_USER, password=PROXY_PASSWORD, allowed_cidrs=("127.0.0.0/8",),
                                 http_ports=(tile_port,), port=self.port, bind_outgoing=True)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "filter").write_text(render_filter(settings))
        conf = render_config(settings, str(workdir / "filter")).replace(PRIVATE_IP, ip)
        (workdir / "tinyproxy.conf").write_text(conf)
        self.proc: procs.Proc | None = None

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    def announcement(self, generation: int) -> dict[str, object]:
        """What the operator's ConfigMap (plus the Secret) would say, for the file proxy source."""
        return {"url": self.url, "generation": str(generation), "instanceId": f"i-{self.ip}", "state": "active",
                "banStatusCodes": "403", "username": PROXY_USER, "password": PROXY_PASSWORD}

    def start(self) -> None:
        self.proc = procs.start(f"tinyproxy-{self.ip}", [shutil.which("tinyproxy") or "tinyproxy", "-d", "-c",
                                str(self.workdir / "tinyproxy.conf")], log_dir=self.workdir / "logs")
        procs.wait_for(lambda: procs.port_open(self.ip, self.port), timeout=10, what="tinyproxy", proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=5)
            self.proc = None


@pytest.fixture
def proxies(tmp_path: Path, tile_server: object) -> Iterator[Callable[[str], Tinyproxy]]:
    started: list[Tinyproxy] = []
    port = int(tile_server.port)  # type: ignore[attr-defined]

    def make(ip: str) -> Tinyproxy:
        proxy = Tinyproxy(tmp_path / f"proxy-{ip}", ip, port)
        proxy.start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


class Consumers:
    """Consumer processes of one test; every one is stopped (by PID) at the end."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.procs: list[procs.Proc] = []

    def start(self, name: str, **extra: str) -> procs.Proc:
        env = {**self.env, "TILEHOPPER_REPORTER": name, **extra}
        proc = procs.start(name, [sys.executable, "-m", "tilehopper_consumer"], log_dir=self.workdir / "logs", env=env)
        self.procs.append(proc)
        return proc

    def stop(self, proc: procs.Proc) -> dict[str, object]:
        """SIGTERM, expect exit code 0, return the summary line."""
        proc.stop(timeout=30)
        assert proc.popen is not None
        assert proc.popen.returncode == 0, proc.tail()
        return json.loads(proc.tail(1))

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.stop(timeout=30)


@pytest.fixture
def job(tmp_path: Path, rabbit: object, tile_server: object) -> Iterator[dict[str, object]]:
    """A unique queue, a tiles folder and consumer processes wired to the bench."""
    queue = f"tilehopper.test.{uuid.uuid4().hex[:10]}"
    tiles_dir = tmp_path / "tiles"
    env = {
        "AMQP_URL": rabbit.amqp_url,  # type: ignore[attr-defined]
        "TILEHOPPER_QUEUE": queue,
        "TILEHOPPER_TILES_DIR": str(tiles_dir),
        "TILEHOPPER_URL_TEMPLATE": tile_server.env["TILE_URL"],  # type: ignore[attr-defined]
        "TILEHOPPER_PROXY_FILE": str(tmp_path / "proxy.json"),
        "TILEHOPPER_THREADS": "8",
        "TILEHOPPER_LOG_LEVEL": "INFO",
    }
    consumers = Consumers(tmp_path, env)
    try:
        yield {"queue": queue, "tiles_dir": tiles_dir, "env": env, "consumers": consumers,
               "proxy_file": tmp_path / "proxy.json", "dir": tmp_path}
    finally:
        consumers.stop_all()
