"""The data plane on real processes: RabbitMQ, tinyproxy, the bench's tile server."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pika
import pytest

from tests.dataplane.conftest import needs_rabbit
from tests.dataplane.helpers import check_tiles, dead_letters, remaining, run_generator, write_proxy_file
from tilehopper.amqp import dead_queue_name, declare_job_queue
from tilehopper_bench import procs

pytestmark = [pytest.mark.bench, needs_rabbit]


def no_direct_requests(tile_server: Any) -> None:
    sources = tile_server.stats()["sources"]
    assert "127.0.0.1" not in sources, f"a request went direct: {sources.keys()}"


def test_2000_tiles_through_two_consumers(job: dict, rabbit: Any, tile_server: Any, proxies: Any) -> None:
    proxy = proxies("127.0.0.5")
    write_proxy_file(job["proxy_file"], proxy.announcement(1))
    env = job["env"]
    square = "100,200,11,50,40"  # 50 x 40 = 2,000 tiles at zoom 11
    result = run_generator(env, "--square", square)
    assert (result["published"], result["total"]) == (2000, 2000)
    # A second run of the same job publishes nothing: the queue is not flooded twice.
    again = run_generator(env, "--square", square)
    assert again["published"] == 0 and "already published" in again["skipped"]
    assert remaining(rabbit, job["queue"]) == 2000

    a, b = job["consumers"].start("consumer-a"), job["consumers"].start("consumer-b")
    procs.wait_for(lambda: remaining(rabbit, job["queue"]) == 0, timeout=120, what="queue drained", proc=a)
    summaries = [job["consumers"].stop(a), job["consumers"].stop(b)]

    found = check_tiles(job["tiles_dir"])
    assert found == {(x, y, 11) for x in range(100, 150) for y in range(200, 240)}
    assert sum(s["done"] for s in summaries) == 2000, "each tile downloaded exactly once"
    assert all(s["done"] > 0 for s in summaries), "both consumers took part"
    assert tile_server.stats()["sources"]["127.0.0.5"]["codes"] == {"200": 2000}
    assert remaining(rabbit, dead_queue_name(job["queue"])) == 0
    no_direct_requests(tile_server)


def test_sigkill_mid_run_loses_nothing(job: dict, rabbit: Any, tile_server: Any, proxies: Any) -> None:
    proxy = proxies("127.0.0.6")
    write_proxy_file(job["proxy_file"], proxy.announcement(1))
    tile_server.configure(latency_ms=30)  # slow enough to kill the consumer mid-download
    run_generator(job["env"], "--square", "0,0,11,40,30")  # 1,200 tiles
    tiles_dir = job["tiles_dir"]
    first = job["consumers"].start("consumer-killed", TILEHOPPER_THREADS="16")
    procs.wait_for(lambda: len(list(tiles_dir.glob("*.png"))) >= 300, timeout=60, what="300 tiles", proc=first)
    first.stop(sig=signal.SIGKILL, timeout=5)
    assert remaining(rabbit, job["queue"]) > 0, "killed before the end"

    second = job["consumers"].start("consumer-after")
    procs.wait_for(lambda: remaining(rabbit, job["queue"]) == 0, timeout=120, what="queue drained", proc=second)
    job["consumers"].stop(second)
    assert check_tiles(tiles_dir) == {(x, y, 11) for x in range(40) for y in range(30)}
    assert remaining(rabbit, dead_queue_name(job["queue"])) == 0
    no_direct_requests(tile_server)


def test_ban_requeues_pauses_and_resumes_on_the_next_generation(
    job: dict, rabbit: Any, tile_server: Any, proxies: Any
) -> None:
    old, new = proxies("127.0.0.7"), proxies("127.0.0.8")
    proxy_file = job["proxy_file"]
    write_proxy_file(proxy_file, old.announcement(1))
    tile_server.configure(ban_after_requests=150)
    run_generator(job["env"], "--square", "300,300,12,30,20")  # 600 tiles
    bans_file = proxy_file.with_name(proxy_file.name + ".bans")
    a, b = job["consumers"].start("consumer-a"), job["consumers"].start("consumer-b")

    procs.wait_for(bans_file.exists, timeout=60, what="a ban report", proc=a)
    assert list(json.loads(bans_file.read_text())) == ["generation-1"]
    time.sleep(1.0)  # requests already in flight at the ban have landed by now
    stats = tile_server.stats()["sources"]
    requests_at_pause = stats["127.0.0.7"]["requests"]
    assert stats["127.0.0.7"]["codes"].get("403", 0) >= 1
    time.sleep(1.5)
    assert tile_server.stats()["sources"]["127.0.0.7"]["requests"] == requests_at_pause, "paused consumers fetch nothing"
    assert "127.0.0.8" not in tile_server.stats()["sources"], "nothing goes to the next proxy before it is announced"
    assert len(list(job["tiles_dir"].glob("*.png"))) < 600

    tile_server.configure(ban_after_requests=0)  # the next proxy is not banned (the old one stays banned)
    write_proxy_file(proxy_file, new.announcement(2))
    procs.wait_for(lambda: remaining(rabbit, job["queue"]) == 0, timeout=120, what="queue drained", proc=a)
    summaries = [job["consumers"].stop(a), job["consumers"].stop(b)]
    assert check_tiles(job["tiles_dir"]) == {(x, y, 12) for x in range(300, 330) for y in range(300, 320)}, (
        "the tiles that got 403 were requeued and downloaded through the next proxy"
    )
    assert sum(s["bans"] for s in summaries) >= 1
    assert remaining(rabbit, dead_queue_name(job["queue"])) == 0
    assert tile_server.stats()["sources"]["127.0.0.8"]["codes"].get("200", 0) >= 1
    no_direct_requests(tile_server)


def publish_raw(amqp_url: str, queue: str, bodies: list[bytes]) -> None:
    """The original producer: plain basic_publish of the JSON, no properties at all."""
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        declare_job_queue(channel, queue)
        for body in bodies:
            channel.basic_publish(exchange="", routing_key=queue, body=body)


def test_messages_of_the_original_producer_are_consumed(job: dict, rabbit: Any, tile_server: Any, proxies: Any) -> None:
    proxy = proxies("127.0.0.9")
    write_proxy_file(job["proxy_file"], proxy.announcement(1))
    bodies = [json.dumps({"x": x, "y": 7, "zoom": 5}).encode() for x in range(10)]
    bodies.append(json.dumps({"x": 20, "y": 7, "zoom": 5, "source": "legacy"}).encode())  # extra fields are ignored
    publish_raw(rabbit.amqp_url, job["queue"], bodies)
    consumer = job["consumers"].start("consumer")
    procs.wait_for(lambda: remaining(rabbit, job["queue"]) == 0, timeout=60, what="queue drained", proc=consumer)
    job["consumers"].stop(consumer)
    assert check_tiles(job["tiles_dir"]) == {(x, 7, 5) for x in [*range(10), 20]}


def test_404_5xx_truncated_and_malformed_end_in_the_dead_letter_queue(
    job: dict, rabbit: Any, tile_server: Any, proxies: Any
) -> None:
    proxy = proxies("127.0.0.10")
    write_proxy_file(job["proxy_file"], proxy.announcement(1))
    queue, amqp_url = job["queue"], rabbit.amqp_url
    dead = dead_queue_name(queue)
    consumer = job["consumers"].start("consumer", TILEHOPPER_MAX_RETRIES="2", TILEHOPPER_RETRY_BASE_S="0.05")

    def expect_dead(count: int) -> None:
        procs.wait_for(lambda: remaining(rabbit, dead) == count and remaining(rabbit, queue) == 0,
                       timeout=60, what=f"{count} dead letters", proc=consumer)

    tile_server.configure(missing=[[1, 1, 4]])
    publish_raw(amqp_url, queue, [b'{"x": 1, "y": 1, "zoom": 4}', b'{"x": 2, "y": 1, "zoom": 4}',
                                  b"not json at all", b'{"x": 99, "y": 1, "zoom": 4}'])
    expect_dead(3)
    tile_server.configure(rates={"500": 1.0})
    publish_raw(amqp_url, queue, [b'{"x": 3, "y": 1, "zoom": 4}'])
    expect_dead(4)
    tile_server.configure(rates={"truncated": 1.0})
    publish_raw(amqp_url, queue, [b'{"x": 4, "y": 1, "zoom": 4}'])
    expect_dead(5)
    summary = job["consumers"].stop(consumer)

    reasons = dict(dead_letters(amqp_url, queue))
    assert reasons[b'{"x": 1, "y": 1, "zoom": 4}'].startswith("404")
    assert reasons[b"not json at all"].startswith("malformed: not JSON")
    assert reasons[b'{"x": 99, "y": 1, "zoom": 4}'].startswith("malformed: x must be within 0..15")
    assert reasons[b'{"x": 3, "y": 1, "zoom": 4}'] == "500 from server or proxy (after 3 attempts)"
    assert reasons[b'{"x": 4, "y": 1, "zoom": 4}'].startswith("truncated:")
    assert check_tiles(job["tiles_dir"]) == {(2, 1, 4)}
    assert summary["dead_lettered"] == 5
    no_direct_requests(tile_server)


def test_generator_rerun_skips_tiles_on_disk(job: dict, rabbit: Any) -> None:
    tiles_dir = job["tiles_dir"]
    tiles_dir.mkdir(parents=True)
    for x in range(5):
        (tiles_dir / f"{x}_0_3.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tiles_dir / "5_0_3.png").write_bytes(b"")  # empty: what a power cut leaves; published again
    env = job["env"]
    first = run_generator(env, "--square", "0,0,3,8,2", "--tiles-dir", str(tiles_dir))
    assert (first["published"], first["on_disk"], first["total"]) == (11, 5, 16)
    assert remaining(rabbit, job["queue"]) == 11
    forced = run_generator(env, "--square", "0,0,3,8,2", "--tiles-dir", str(tiles_dir), "--force")
    assert forced["published"] == 11
    assert remaining(rabbit, job["queue"]) == 22


def test_sigterm_mid_run_hands_back_what_is_in_flight(job: dict, rabbit: Any, tile_server: Any, proxies: Any) -> None:
    from tilehopper_bench.rabbit import queue_counts

    proxy = proxies("127.0.0.11")
    write_proxy_file(job["proxy_file"], proxy.announcement(1))
    tile_server.configure(latency_ms=300)
    run_generator(job["env"], "--square", "0,0,10,20,15")  # 300 tiles
    tiles_dir = job["tiles_dir"]
    consumer = job["consumers"].start("consumer", TILEHOPPER_THREADS="16", TILEHOPPER_DRAIN_S="0.1")
    procs.wait_for(lambda: len(list(tiles_dir.glob("*.png"))) >= 20, timeout=60, what="20 tiles", proc=consumer)
    summary = job["consumers"].stop(consumer)  # SIGTERM; asserts exit code 0
    ready, unacked, _ = queue_counts(rabbit.api_url, job["queue"])
    on_disk = len(check_tiles(tiles_dir))
    assert unacked == 0
    assert summary["requeued"] >= 1, "the downloads cut short by the drain were handed back"
    assert ready + on_disk >= 300, "nothing lost: every tile is on disk or back in the queue"
    assert ready + summary["done"] == 300, "and none taken twice"
