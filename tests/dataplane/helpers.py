"""Small helpers shared by the data-plane integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pika

from tilehopper.amqp import dead_queue_name
from tilehopper.contracts import DEAD_LETTER_REASON_HEADER, parse_tile_filename
from tilehopper_bench.rabbit import queue_counts
from tilehopper_bench.tileimage import tile_identity


def write_proxy_file(path: Path, doc: dict[str, Any]) -> None:
    """Replace the file at once, the way a ConfigMap update arrives: never half-written."""
    temp = path.with_suffix(".new")
    temp.write_text(json.dumps(doc))
    os.replace(temp, path)


def run_generator(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "tilehopper_generator", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def remaining(rabbit: Any, queue: str) -> int:
    return queue_counts(rabbit.api_url, queue)[2]


def check_tiles(tiles_dir: Path) -> set[tuple[int, int, int]]:
    """Every *.png is a whole image of the tile its name says; returns the tiles found."""
    found = set()
    for path in tiles_dir.iterdir():
        if path.name.endswith(".tmp"):
            continue  # a killed consumer's temp file: never taken for a tile
        tile = parse_tile_filename(path.name)
        assert tile is not None, f"unexpected file {path.name}"
        assert tile_identity(path.read_bytes()) == (tile.x, tile.y, tile.zoom), f"{path.name} is not its tile"
        found.add((tile.x, tile.y, tile.zoom))
    return found


def dead_letters(amqp_url: str, queue: str) -> list[tuple[bytes, str]]:
    """(body, reason) of every message in the dead queue (taken out of it)."""
    out = []
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        while True:
            method, props, body = channel.basic_get(dead_queue_name(queue), auto_ack=True)
            if method is None:
                return out
            out.append((body, str((props.headers or {}).get(DEAD_LETTER_REASON_HEADER, ""))))
