"""The original design's consumer, kept only as the benchmark's baseline. Never use it for a job.

What it does, as the original did: take one message with auto-ack basic_get (the tile is gone
from the queue before it is downloaded, so a failure loses it), download it with one plain
requests.get (no Session: a new connection and a new pool every time), write the file in place,
only log a 403, and sleep 5 s whenever the queue is empty. It exits after `idle_exits` empty polls
so a benchmark can time it; the original ran forever. One deliberate difference: it declares the
queue through tilehopper.amqp like every component, so both consumers can share the same queue.

Run: python -m tilehopper_consumer.naive (reads AMQP_URL, TILEHOPPER_QUEUE, TILEHOPPER_TILES_DIR,
TILEHOPPER_URL_TEMPLATE, TILEHOPPER_PROXY_URL, TILEHOPPER_NAIVE_IDLE_EXITS). Prints one JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import pika
import requests

from tilehopper.amqp import declare_job_queue

log = logging.getLogger("tilehopper_consumer.naive")


def run_naive(*, amqp_url: str, queue: str, tiles_dir: Path, url_template: str, proxy_url: str,
              idle_exits: int = 1, empty_sleep_s: float = 5.0) -> dict[str, float]:
    tiles_dir.mkdir(parents=True, exist_ok=True)
    proxies = {"http": proxy_url, "https": proxy_url}
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    declare_job_queue(channel, queue)
    done = failed = empty = 0
    started = time.monotonic()
    while True:
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            empty += 1
            if empty >= idle_exits:
                break
            time.sleep(empty_sleep_s)
            continue
        empty = 0
        tile = json.loads(body)
        x, y, z = tile["x"], tile["y"], tile["zoom"]
        try:
            answer = requests.get(url_template.format(x=x, y=y, z=z), proxies=proxies, timeout=20)
        except requests.RequestException as exc:
            log.warning("tile %s/%s/%s failed: %s", z, x, y, exc)  # and it is lost
            failed += 1
            continue
        if answer.status_code == 403:
            log.warning("403 for tile %s/%s/%s", z, x, y)
            failed += 1
            continue
        if answer.status_code != 200:
            failed += 1
            continue
        with open(tiles_dir / f"{x}_{y}_{z}.png", "wb") as handle:
            handle.write(answer.content)
        done += 1
    seconds = time.monotonic() - started
    connection.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"done": done, "failed": failed, "seconds": round(seconds, 3),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3)}


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    env = os.environ
    result = run_naive(
        amqp_url=env.get("AMQP_URL") or env["TILEHOPPER_AMQP_URL"],
        queue=env["TILEHOPPER_QUEUE"],
        tiles_dir=Path(env.get("TILEHOPPER_TILES_DIR", "tiles")),
        url_template=env["TILEHOPPER_URL_TEMPLATE"],
        proxy_url=env["TILEHOPPER_PROXY_URL"],
        idle_exits=int(env.get("TILEHOPPER_NAIVE_IDLE_EXITS", "1")),
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
