"""The bench's tile server: real process on a free loopback port, driven over plain HTTP."""

from __future__ import annotations

import http.client
import io
import json
import struct
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tilehopper_bench import procs
from tilehopper_bench.tileimage import TEXT_KEY, adler32_combine, tile_identity, tile_png
from tilehopper_bench.tileserver import TileServer

ZOOM20 = (268396, 390159, 20)  # a tile of the user's original square


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TileServer]:
    tiles = TileServer(tmp_path_factory.mktemp("tileserver"))
    tiles.start()
    try:
        yield tiles
    finally:
        pid = tiles.proc.pid if tiles.proc else None
        tiles.stop()
        assert pid is None or not procs.Proc("tileserver", pid, Path()).alive()


@pytest.fixture
def fresh(server: TileServer) -> TileServer:
    """Every test starts from the startup config, with no counters and no bans."""
    server.reset(keep_config=False)
    return server


def get(server: TileServer, path: str, *, source: str = "127.0.0.1",
        headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request on a new connection from the given loopback source address."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10,
                                      source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def vt(x: int, y: int, z: int) -> str:
    return f"/vt?lyrs=s&x={x}&y={y}&z={z}"


def control(server: TileServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# --- the pictures, without a server ------------------------------------------------------------


@pytest.mark.parametrize("tile", [ZOOM20, (0, 0, 0), (5, 7, 3), (2**24 - 1, 2**24 - 1, 24)])
def test_tile_is_a_png_that_says_which_tile_it_is(tile: tuple[int, int, int]) -> None:
    png = tile_png(*tile)
    image = Image.open(io.BytesIO(png))
    image.load()  # decodes every IDAT: a wrong deflate join or adler32 fails here
    assert image.size == (256, 256)
    assert image.info[TEXT_KEY] == "{}/{}/{}".format(*tile)
    assert tile_identity(png) == tile
    assert 10_000 <= len(png) <= 20_000


def test_tiles_differ_in_label_and_colour() -> None:
    def rgb(tile: tuple[int, int, int]) -> Image.Image:
        return Image.open(io.BytesIO(tile_png(*tile))).convert("RGB")

    here, right, below = rgb((10, 20, 6)), rgb((11, 20, 6)), rgb((10, 21, 6))
    corner = (30, 30)  # background, away from the label
    assert here.getpixel(corner)[0] < right.getpixel(corner)[0]  # red grows with x
    assert here.getpixel(corner)[1] < below.getpixel(corner)[1]  # green grows with y
    label_area = (60, 118, 196, 138)
    assert here.crop(label_area).tobytes() != right.crop(label_area).tobytes()


def test_tile_identity_refuses_anything_but_a_whole_tile() -> None:
    png = tile_png(*ZOOM20)
    assert tile_identity(png[: len(png) // 2]) is None  # cut short: the tEXt survived, IEND not
    assert tile_identity(png[:-1]) is None
    assert tile_identity(b"<html>banned</html>") is None
    spoiled = bytearray(png)
    spoiled[len(png) // 2] ^= 0xFF
    assert tile_identity(bytes(spoiled)) is None  # a chunk's CRC no longer matches
    other = Image.new("RGB", (256, 256))
    buffer = io.BytesIO()
    other.save(buffer, format="PNG")
    assert tile_identity(buffer.getvalue()) is None  # a PNG, but not a bench tile


def test_adler32_combine_matches_zlib() -> None:
    first, second = b"a" * 70_000, bytes(range(256)) * 300
    combined = adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second))
    assert combined == zlib.adler32(first + second)
    png = tile_png(*ZOOM20)
    # The IDAT pieces joined make one zlib stream whose trailer is right.
    pos, idat = 8, b""
    while pos < len(png):
        (length,) = struct.unpack_from(">I", png, pos)
        if png[pos + 4 : pos + 8] == b"IDAT":
            idat += png[pos + 8 : pos + 8 + length]
        pos += 12 + length
    assert len(zlib.decompress(idat)) == 256 * 257


# --- the server ------------------------------------------------------------------------------

@pytest.mark.bench
def test_both_path_styles_serve_the_asked_tile(fresh: TileServer) -> None:
    x, y, z = ZOOM20
    for path in (vt(x, y, z), f"/{z}/{x}/{y}.png", f"/vt?x={x}&y={y}&z={z}&lyrs=s"):
        status, body = get(fresh, path)
        assert status == 200, path
        assert tile_identity(body) == ZOOM20
        assert Image.open(io.BytesIO(body)).size == (256, 256)
    status, body = get(fresh, vt(1, 2, 3))
    assert (status, tile_identity(body)) == (200, (1, 2, 3))


@pytest.mark.bench
def test_env_names_the_tile_url_template(fresh: TileServer) -> None:
    template = fresh.env["TILE_URL"]
    assert template.startswith(fresh.env["TILE_SERVER_URL"] + "/vt?")
    path = template.format(x=3, y=4, z=5)[len(fresh.url):]
    status, body = get(fresh, path)
    assert (status, tile_identity(body)) == (200, (3, 4, 5))


@pytest.mark.bench
@pytest.mark.parametrize(
    "path",
    [
        vt(8, 0, 3),  # x >= 2**z
        vt(0, 8, 3),  # y >= 2**z
        vt(0, 0, 25),  # beyond any zoom we serve
        "/vt?lyrs=s&x=a&y=0&z=3",
        "/vt?lyrs=s&x=-1&y=0&z=3",
        "/vt?lyrs=s&x=1&z=3",
        "/3/1/8.png",
        "/3/1/1.jpg",
        "/elsewhere",
    ],
)
def test_tiles_that_do_not_exist_answer_404(fresh: TileServer, path: str) -> None:
    assert get(fresh, path)[0] == 404


@pytest.mark.bench
def test_missing_tiles_answer_404_and_their_neighbours_200(fresh: TileServer) -> None:
    fresh.configure(missing=[[1, 2, 3], [0, 0, 0]])
    assert get(fresh, vt(1, 2, 3))[0] == 404
    assert get(fresh, "/3/1/2.png")[0] == 404
    assert get(fresh, vt(0, 0, 0))[0] == 404
    assert get(fresh, vt(2, 2, 3))[0] == 200


@pytest.mark.bench
def test_ban_after_n_requests_hits_only_that_source(fresh: TileServer) -> None:
    fresh.configure(ban_after_requests=3)
    for i in range(3):
        assert get(fresh, vt(i, 0, 2), source="127.0.0.2")[0] == 200
    assert get(fresh, vt(3, 0, 2), source="127.0.0.2")[0] == 403
    assert get(fresh, vt(0, 0, 2), source="127.0.0.3")[0] == 200
    assert get(fresh, "/nowhere", source="127.0.0.2")[0] == 403  # every answer, once banned
    stats = fresh.stats()["sources"]
    assert stats["127.0.0.2"]["banned"] is True
    assert stats["127.0.0.2"]["codes"] == {"200": 3, "403": 2}
    assert stats["127.0.0.3"]["banned"] is False
    assert stats["127.0.0.3"]["codes"] == {"200": 1}


@pytest.mark.bench
def test_ban_after_t_seconds_since_the_first_request(fresh: TileServer) -> None:
    fresh.configure(ban_after_seconds=1)
    assert get(fresh, vt(0, 0, 1), source="127.0.0.2")[0] == 200
    time.sleep(1.2)
    assert get(fresh, vt(0, 0, 1), source="127.0.0.2")[0] == 403
    # A source's clock starts at its own first request.
    assert get(fresh, vt(0, 0, 1), source="127.0.0.3")[0] == 200


@pytest.mark.bench
def test_zero_means_never_banned(fresh: TileServer) -> None:
    fresh.configure(ban_after_requests=0, ban_after_seconds=0)
    assert all(get(fresh, vt(0, 0, 0))[0] == 200 for _ in range(20))


@pytest.mark.bench
@pytest.mark.parametrize("code", [429, 500, 503])
def test_injected_error_answers(fresh: TileServer, code: int) -> None:
    fresh.configure(rates={str(code): 1.0})
    assert [get(fresh, vt(1, 1, 1))[0] for _ in range(3)] == [code] * 3
    assert fresh.stats()["sources"]["127.0.0.1"]["codes"] == {str(code): 3}


@pytest.mark.bench
def test_truncated_answer_promises_more_than_it_sends(fresh: TileServer) -> None:
    fresh.configure(rates={"truncated": 1.0})
    conn = http.client.HTTPConnection("127.0.0.1", fresh.port, timeout=10)
    try:
        conn.request("GET", vt(1, 1, 1))
        answer = conn.getresponse()
        assert answer.status == 200
        promised = int(answer.headers["Content-Length"])
        with pytest.raises(http.client.IncompleteRead) as cut:
            answer.read()
        assert 0 < len(cut.value.partial) < promised
        assert tile_identity(cut.value.partial) is None
    finally:
        conn.close()
    assert fresh.stats()["sources"]["127.0.0.1"]["codes"] == {"truncated": 1}


@pytest.mark.bench
def test_slow_answers_still_serve_the_tile(fresh: TileServer) -> None:
    fresh.configure(rates={"slow": 1.0}, slow_ms=50, latency_ms=10)
    status, body = get(fresh, vt(1, 0, 1))
    assert (status, tile_identity(body)) == (200, (1, 0, 1))


@pytest.mark.bench
def test_faults_follow_the_seed(fresh: TileServer) -> None:
    fresh.configure(rates={"500": 0.5}, seed=7)
    first = [get(fresh, vt(0, 0, 0))[0] for _ in range(30)]
    fresh.reset()
    again = [get(fresh, vt(0, 0, 0))[0] for _ in range(30)]
    assert first == again
    assert set(first) == {200, 500}


@pytest.mark.bench
def test_counters(fresh: TileServer) -> None:
    fresh.configure(missing=[[0, 0, 1]])
    get(fresh, vt(1, 1, 1), source="127.0.0.2")
    get(fresh, vt(1, 1, 1), source="127.0.0.2")
    get(fresh, vt(0, 0, 1), source="127.0.0.2")
    get(fresh, vt(1, 0, 1), source="127.0.0.3")
    before = time.time()
    fresh.stats()
    fresh.configure(latency_ms=0)  # control calls are not tile requests
    stats = fresh.stats()
    assert stats["total"] == 4
    assert set(stats["sources"]) == {"127.0.0.2", "127.0.0.3"}
    two = stats["sources"]["127.0.0.2"]
    assert two["requests"] == 3
    assert two["codes"] == {"200": 2, "404": 1}
    assert two["first_seen"] <= before
    assert stats["sources"]["127.0.0.3"]["requests"] == 1


@pytest.mark.bench
def test_headers_that_reveal_a_client_are_recorded(fresh: TileServer) -> None:
    get(fresh, vt(0, 0, 0), source="127.0.0.2")
    get(fresh, vt(0, 0, 0), source="127.0.0.3",
        headers={"X-Forwarded-For": "10.1.2.3", "Via": "1.1 someproxy"})
    stats = fresh.stats()
    assert stats["sources"]["127.0.0.2"]["headers_seen"] == []
    assert stats["sources"]["127.0.0.3"]["headers_seen"] == ["Via", "X-Forwarded-For"]
    assert stats["headers_seen"] == {"Via": 1, "X-Forwarded-For": 1}


@pytest.mark.bench
def test_reset_clears_counters_and_bans_and_keeps_config(fresh: TileServer) -> None:
    fresh.configure(ban_after_requests=1)
    get(fresh, vt(0, 0, 0), source="127.0.0.2")
    assert get(fresh, vt(0, 0, 0), source="127.0.0.2")[0] == 403
    fresh.reset()
    assert fresh.stats() == {"total": 0, "sources": {}, "headers_seen": {}}
    assert get(fresh, vt(0, 0, 0), source="127.0.0.2")[0] == 200  # ban lifted
    assert get(fresh, vt(0, 0, 0), source="127.0.0.2")[0] == 403  # config kept
    fresh.reset(keep_config=False)
    assert control(fresh, "GET", "/_bench/config")[1]["ban_after_requests"] == 0


@pytest.mark.bench
def test_control_api_refuses_bad_config(fresh: TileServer) -> None:
    for body in ({"ban_after_requests": -1}, {"rates": {"404": 1.0}}, {"rates": {"500": 2}},
                 {"colour": "red"}, {"missing": [[1, 2]]}, [1, 2]):
        status, answer = control(fresh, "POST", "/_bench/config", body)
        assert status == 400, body
        assert "error" in answer
    assert control(fresh, "GET", "/_bench/config")[1]["rates"] == {}
    assert control(fresh, "GET", "/_bench/nothing")[0] == 404
    with pytest.raises(ValueError, match="latency_ms"):
        fresh.configure(latency_ms="slow")


@pytest.mark.bench
def test_cli_flags_set_the_startup_config(tmp_path: Path) -> None:
    port = procs.free_port()
    proc = procs.start(
        "tileserver-cli",
        [sys.executable, "-m", "tilehopper_bench.tileserver", "--host", "127.0.0.1",
         "--port", str(port), "--ban-after-requests", "5", "--ban-after-seconds", "30",
         "--latency-ms", "50"],
        log_dir=tmp_path,
    )
    try:
        server = TileServer(tmp_path, port)
        procs.wait_for(lambda: server.stats() is not None, timeout=20, what="tile server",
                       proc=proc)
        config = control(server, "GET", "/_bench/config")[1]
        assert (config["ban_after_requests"], config["ban_after_seconds"],
                config["latency_ms"]) == (5, 30, 50)
        server.reset(keep_config=False)  # the startup config is what reset goes back to
        assert control(server, "GET", "/_bench/config")[1]["ban_after_requests"] == 5
    finally:
        proc.stop()
    assert not proc.alive()


def test_cli_refuses_addresses_off_loopback() -> None:
    from tilehopper_bench.tileserver import main

    with pytest.raises(SystemExit):
        main(["--host", "0.0.0.0", "--port", "1"])
