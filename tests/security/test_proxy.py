"""A job's proxy is usable by that job only: credentials, source CIDR, ports, no revealing headers."""

from __future__ import annotations

import base64
import socket

import pytest

from tilehopper_bench import procs
from tilehopper_bench.stack import Bench
from tests.security.conftest import PORT, JobProxy, needs_tinyproxy

pytestmark = [pytest.mark.bench, needs_tinyproxy]


def tile_url(bench: Bench, x: int = 3) -> str:
    return bench.env["TILE_URL"].format(x=x, y=2, z=3)


def tile_requests_from(bench: Bench, ip: str) -> int:
    return int(bench.tiles.stats()["sources"].get(ip, {}).get("requests", 0))


def raw_request(proxy: JobProxy, request: str, *, auth: tuple[str, str] | None, source: str = "127.0.0.1") -> int:
    """Status of one request sent to the proxy from a chosen loopback source address."""
    header = ""
    if auth:
        header = f"Proxy-Authorization: Basic {base64.b64encode(':'.join(auth).encode()).decode()}\r\n"
    with socket.create_connection((proxy.ip, PORT), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(f"{request}\r\n{header}\r\n".encode())
        first = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(first.split()[1])


def connect(target: str) -> str:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}"


def test_the_jobs_own_credentials_work(bench: Bench, job_proxies: tuple[JobProxy, JobProxy]) -> None:
    a, _ = job_proxies
    before = tile_requests_from(bench, a.ip)
    assert a.get(tile_url(bench), auth=a.credentials).status_code == 200
    assert tile_requests_from(bench, a.ip) == before + 1


def test_no_credentials_gets_407(bench: Bench, job_proxies: tuple[JobProxy, JobProxy]) -> None:
    a, _ = job_proxies
    before = tile_requests_from(bench, a.ip)
    answer = a.get(tile_url(bench), auth=None)
    assert answer.status_code == 407
    assert "Proxy-Authenticate" in answer.headers
    assert tile_requests_from(bench, a.ip) == before


def test_another_jobs_credentials_are_refused(bench: Bench, job_proxies: tuple[JobProxy, JobProxy]) -> None:
    a, b = job_proxies
    assert a.credentials != b.credentials
    before = tile_requests_from(bench, a.ip), tile_requests_from(bench, b.ip)
    assert a.get(tile_url(bench), auth=b.credentials).status_code in (401, 407)
    assert b.get(tile_url(bench), auth=a.credentials).status_code in (401, 407)
    assert (tile_requests_from(bench, a.ip), tile_requests_from(bench, b.ip)) == before


def test_a_client_outside_the_allowed_cidr_is_refused(bench: Bench, job_proxies: tuple[JobProxy, JobProxy]) -> None:
    a, _ = job_proxies
    get = f"GET {tile_url(bench)} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close"
    assert raw_request(a, get, auth=a.credentials) == 200  # from 127.0.0.1, the allowed /32
    assert raw_request(a, get, auth=a.credentials, source="127.0.0.2") == 403  # right password, wrong source


def test_connect_only_to_443(bench: Bench, job_proxies: tuple[JobProxy, JobProxy]) -> None:
    a, _ = job_proxies
    tile_port = int(bench.env["TILE_SERVER_URL"].rsplit(":", 1)[1])
    for port in (tile_port, 22, 25, 8888):
        assert raw_request(a, connect(f"127.0.0.1:{port}"), auth=a.credentials) == 403, port
    # 443 passes the proxy's rules: nothing listens there on the bench, so the tunnel itself fails
    # (an upstream error, not the 403 of a refused port).
    assert not procs.port_open("127.0.0.1", 443)
    status = raw_request(a, connect("127.0.0.1:443"), auth=a.credentials)
    assert status not in (200, 403, 407) and status >= 500


def test_plain_http_only_to_the_sources_port(bench: Bench, job_proxies: tuple[JobProxy, JobProxy]) -> None:
    a, _ = job_proxies
    other = procs.free_port()
    assert a.get(f"http://127.0.0.1:{other}/", auth=a.credentials).status_code == 403
    assert a.get("http://127.0.0.1:22/", auth=a.credentials).status_code == 403


def test_the_tile_server_sees_no_header_revealing_the_client(
    bench: Bench, job_proxies: tuple[JobProxy, JobProxy]
) -> None:
    a, _ = job_proxies
    assert a.get(tile_url(bench, x=4), auth=a.credentials).status_code == 200
    source = bench.tiles.stats()["sources"][a.ip]  # the server sees the proxy's address, not ours
    assert source["requests"] >= 1
    assert source["headers_seen"] == []
