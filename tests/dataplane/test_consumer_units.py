"""The consumer's pure parts: answers, messages, files, configuration, the file proxy source."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import pytest

from tilehopper.contracts import MalformedMessage, Tile, decode_tile
from tilehopper_consumer.config import ConfigError, ConsumerConfig
from tilehopper_consumer.fetch import Answer, FetchError, fetch, parse_answer
from tilehopper_consumer.proxy import FileProxySource, ProxyView, StaticProxySource
from tilehopper_consumer.store import TileStore
from tilehopper_consumer.verdict import Kind, judge

PNG = b"\x89PNG\r\n\x1a\n" + b"rest of a png"
JPEG = b"\xff\xd8\xff\xe0" + b"jfif"


def answer(status: int = 200, body: bytes = PNG, content_type: str = "image/png", complete: bool | None = True) -> Answer:
    return Answer(status=status, headers={"content-type": content_type, "content-length": "99"}, body=body,
                  complete=complete)


@pytest.mark.parametrize(
    ("given", "kind", "reason"),
    [
        (answer(), Kind.OK, ""),
        (answer(body=JPEG, content_type="image/jpeg"), Kind.OK, ""),
        (answer(status=403), Kind.BAN, "403"),
        (answer(status=404), Kind.MISSING, "404"),
        (answer(status=500), Kind.RETRY, "500"),
        (answer(status=503), Kind.RETRY, "503"),
        (answer(status=429), Kind.RETRY, "429"),
        (answer(complete=False), Kind.RETRY, "truncated"),
        (answer(body=b""), Kind.RETRY, "empty"),
        (answer(content_type="text/html"), Kind.RETRY, "not an image: content-type"),
        (answer(body=b"<html>captcha</html>"), Kind.RETRY, "signature"),
        (answer(status=400), Kind.REJECT, "400"),
    ],
)
def test_judge(given: Answer, kind: Kind, reason: str) -> None:
    verdict = judge(given, {403})
    assert verdict.kind is kind
    assert reason in verdict.reason


def test_judge_uses_the_jobs_ban_codes() -> None:
    assert judge(answer(status=429), {403, 429}).kind is Kind.BAN
    assert judge(answer(status=403), {429}).kind is Kind.REJECT


def test_parse_answer_content_length_and_truncation() -> None:
    head = b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: 21\r\n\r\n"
    whole = parse_answer(head + PNG, len(head), 21)
    assert (whole.status, whole.body, whole.complete) == (200, PNG, True)
    cut = parse_answer(head + PNG[:10], len(head), 21)
    assert cut.complete is False
    with pytest.raises(FetchError):
        parse_answer(b"", -1, None)
    with pytest.raises(FetchError, match="not an HTTP answer"):
        raw = b"SSH-2.0\r\n\r\n"
        parse_answer(raw, len(raw), None)


def test_parse_answer_chunked() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: image/png\r\n\r\n"
    body = b"5\r\n" + PNG[:5] + b"\r\n10\r\n" + PNG[5:21] + b"\r\n0\r\n\r\n"
    got = parse_answer(head + body, len(head), None)
    assert got.body == PNG and got.complete is True
    assert parse_answer(head + body[:12], len(head), None).complete is False


@pytest.mark.parametrize(
    "body",
    [b'{"x":1,"y":2,"zoom":3}', b'{"zoom": 3, "y": 2, "x": 1}', json.dumps({"x": 1, "y": 2, "zoom": 3, "extra": "ok"}).encode()],
)
def test_original_messages_decode(body: bytes) -> None:
    assert decode_tile(body) == Tile(1, 2, 3)


@pytest.mark.parametrize("body", [b"not json", b"[1,2,3]", b'{"x":1,"y":2}', b'{"x":1.5,"y":2,"zoom":3}',
                                  b'{"x":true,"y":2,"zoom":3}', b'{"x":9,"y":2,"zoom":3}', b"\xff\xfe"])
def test_malformed_messages(body: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_tile(body)


def test_store_writes_whole_files_only(tmp_path: Path) -> None:
    store = TileStore(tmp_path, fsync=True)
    tile = Tile(1, 2, 3)
    assert not store.has(tile)
    store.save(tile, PNG)
    assert store.has(tile)
    assert (tmp_path / "1_2_3.png").read_bytes() == PNG
    assert [p.name for p in tmp_path.iterdir()] == ["1_2_3.png"]  # no temp file left
    (tmp_path / "4_5_6.png").write_bytes(b"")
    assert not store.has(Tile(4, 5, 6)), "an empty file is not a tile"


def test_store_sweeps_only_old_temp_files(tmp_path: Path) -> None:
    store = TileStore(tmp_path)
    old, new = tmp_path / ".1_2_3.png.h.1.0.tmp", tmp_path / ".1_2_3.png.h.1.1.tmp"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert store.sweep_temp(older_than_s=600) == 1
    assert not old.exists() and new.exists()


def base_env(**extra: str) -> dict[str, str]:
    return {"AMQP_URL": "amqp://guest:secretpw@127.0.0.1:5672/%2F", "TILEHOPPER_QUEUE": "q",
            "TILEHOPPER_PROXY_URL": "http://user:hunter22@127.0.0.5:8888",
            "TILEHOPPER_URL_TEMPLATE": "http://127.0.0.1:1/vt?x={x}&y={y}&z={z}", **extra}


def test_config_from_env() -> None:
    config = ConsumerConfig.from_env(base_env(TILEHOPPER_THREADS="8", TILEHOPPER_BAN_STATUS_CODES="403,429"))
    assert config.threads == 8 and config.effective_prefetch == 16
    assert ConsumerConfig.from_env(base_env()).threads == 64
    assert config.ban_status_codes == {403, 429}
    assert "secretpw" not in repr(config) and "hunter22" not in repr(config)
    k8s = ConsumerConfig.from_env({"AMQP_URL": "amqp://x", "TILEHOPPER_NAMESPACE": "ns", "TILEHOPPER_JOB": "riga"})
    assert k8s.queue == "tilehopper.ns.riga"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TILEHOPPER_PROXY_URL": ""}, "no proxy source"),
        ({"TILEHOPPER_THREADS": "many"}, "TILEHOPPER_THREADS must be a int"),
        ({"TILEHOPPER_URL_TEMPLATE": "https://x/{x}/{y}/{z}"}, "plain http"),
        ({"TILEHOPPER_QUEUE": "bad queue"}, "TILEHOPPER_QUEUE"),
        ({"TILEHOPPER_BAN_STATUS_CODES": "403,x"}, "TILEHOPPER_BAN_STATUS_CODES"),
    ],
)
def test_config_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ConsumerConfig.from_env(base_env(**env))


def test_proxy_view_hides_password() -> None:
    view = StaticProxySource("http://user:hunter22@127.0.0.5:8888").view
    assert view.host == "127.0.0.5" and view.port == 8888 and view.usable
    assert "hunter22" not in repr(view)
    assert view.authorization == "Basic dXNlcjpodW50ZXIyMg=="


def test_file_proxy_source_follows_changes_and_records_bans(tmp_path: Path) -> None:
    path = tmp_path / "proxy.json"
    source = FileProxySource(path, poll_s=0.02)
    seen: list[ProxyView] = []
    changed = threading.Event()

    def on_change(view: ProxyView) -> None:
        seen.append(view)
        changed.set()

    path.write_text(json.dumps({"url": "http://127.0.0.5:8888", "generation": "1", "state": "active",
                                "username": "u", "password": "p"}))
    source.start(on_change)
    try:
        assert changed.wait(2)
        assert (seen[-1].generation, seen[-1].usable, seen[-1].username) == (1, True, "u")
        changed.clear()
        path.write_text(json.dumps({"url": "", "generation": 2, "state": "paused"}))
        assert changed.wait(2)
        assert (seen[-1].generation, seen[-1].usable) == (2, False)
        source.report_ban(generation=1, status=403, reporter="a")
        source.report_ban(generation=1, status=403, reporter="b")
        bans = json.loads(source.bans_path.read_text())
        assert list(bans) == ["generation-1"]
    finally:
        source.stop()


def test_fetch_goes_through_the_proxy_with_credentials() -> None:
    """A stand-in proxy on loopback sees the absolute URL and Proxy-Authorization."""
    seen: list[bytes] = []

    async def scenario() -> Answer:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(PNG) + PNG)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        proxy = ProxyView(url=f"http://127.0.0.1:{port}", generation=1, state="active", username="u", password="p")
        async with server:
            return await fetch("http://tiles.invalid/vt?x=1&y=2&z=3", proxy, timeout=5)

    got = asyncio.run(scenario())
    assert got.status == 200 and got.body == PNG and got.complete
    assert seen[0].startswith(b"GET http://tiles.invalid/vt?x=1&y=2&z=3 HTTP/1.1\r\n")
    assert b"Proxy-Authorization: Basic dTpw\r\n" in seen[0]


def test_fetch_reports_a_dead_proxy() -> None:
    proxy = ProxyView(url="http://127.0.0.1:1", generation=1, state="active")
    with pytest.raises(FetchError, match="connection to proxy failed"):
        asyncio.run(fetch("http://tiles.invalid/", proxy, timeout=5))


def test_store_concurrent_saves_share_folder_syncs(tmp_path: Path) -> None:
    store = TileStore(tmp_path, fsync=True)
    threads = [threading.Thread(target=store.save, args=(Tile(i, 0, 10), PNG)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}_0_10.png" for i in range(40))
    sync = store._folder_sync
    assert sync._synced >= sync._requested == 40 and not sync._running
