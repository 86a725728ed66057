"""tilehopper-generator: publish a job's tiles to its queue (the operator's Job, also a CLI).

Exit codes: 0 done (or already published), 1 the broker failed us, 2 bad input (nothing published).
The last line on stdout is one JSON object: {"published": n, "total": n, ...}.

A re-run for the same job is safe and does not flood the queue twice:
- after every tile is confirmed, the generator leaves a marker (one message in the durable queue
  `<queue>.published`); a run that finds it publishes nothing and says so, unless --force;
- with --tiles-dir, tiles already on disk (non-empty files) are not published again;
- a run that crashed halfway left no marker, so the next run publishes everything that is not on
  disk; tiles still queued from the first run are then queued twice, and a consumer acks the
  second copy at once because the file is there by then.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from tilehopper.amqp import PERSISTENT, check_queue_name, declare_job_queue, published_marker_name, redact_url
from tilehopper.contracts import Tile
from tilehopper_generator.publish import ConfirmedPublisher, PublishError, PublishProgress
from tilehopper_generator.spec import DEFAULT_MAX_TILES, SpecError, TileSpec, count_tiles, iter_tiles, parse_spec

log = logging.getLogger("tilehopper_generator")

EXIT_BROKER = 1
EXIT_INPUT = 2


class InputError(ValueError):
    pass


def _ints(text: str, option: str, names: Sequence[str]) -> list[int]:
    parts = text.split(",")
    if len(parts) != len(names):
        raise InputError(f"{option} needs {','.join(names)} ({len(names)} integers), got {text!r}")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise InputError(f"{option} needs integers {','.join(names)}, got {text!r}") from None


def tiles_doc_from_args(args: argparse.Namespace, environ: dict[str, str]) -> Any:
    """The spec.tiles object the command line (or TILEHOPPER_TILES) describes."""
    given = [o for o in ("bbox", "square", "list", "tiles_json") if getattr(args, o) is not None]
    if not given and environ.get("TILEHOPPER_TILES"):
        args.tiles_json = environ["TILEHOPPER_TILES"]
        given = ["tiles_json"]
    if len(given) != 1:
        raise InputError("give exactly one of --bbox (with --zooms), --square, --list, --tiles-json / TILEHOPPER_TILES")
    if args.zooms is not None and args.bbox is None:
        raise InputError("--zooms goes only with --bbox")
    if args.bbox is not None:
        try:
            west, south, east, north = (float(p) for p in args.bbox.split(","))
        except ValueError:
            raise InputError(f"--bbox needs W,S,E,N (4 numbers), got {args.bbox!r}") from None
        if args.zooms is None:
            raise InputError("--bbox needs --zooms MIN-MAX (or one ZOOM)")
        low, _, high = args.zooms.partition("-")
        try:
            zooms = {"min": int(low), "max": int(high or low)}
        except ValueError:
            raise InputError(f"--zooms needs MIN-MAX or ZOOM, got {args.zooms!r}") from None
        return {"bbox": {"west": west, "south": south, "east": east, "north": north}, "zooms": zooms}
    if args.square is not None:
        names = ("x", "y", "zoom", "width", "height")
        return {"square": dict(zip(names, _ints(args.square, "--square", names), strict=True))}
    if args.list is not None:
        try:
            return {"list": json.loads(Path(args.list).read_text())}
        except (OSError, ValueError) as exc:
            raise InputError(f"--list {args.list}: {exc}") from None
    try:
        return json.loads(args.tiles_json)
    except ValueError as exc:
        raise InputError(f"--tiles-json / TILEHOPPER_TILES is not JSON: {exc}") from None


def _not_on_disk(tiles: Iterator[Tile], tiles_dir: Path, counter: list[int]) -> Iterator[Tile]:
    # One stat per tile instead of a set of 810k names: memory stays flat.
    for tile in tiles:
        try:
            if os.stat(tiles_dir / tile.filename).st_size > 0:
                counter[0] += 1
                continue
        except FileNotFoundError:
            pass
        yield tile


def _parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tilehopper-generator", description=__doc__.split("\n")[0])
    p.add_argument("--bbox", help="W,S,E,N in degrees (with --zooms)")
    p.add_argument("--zooms", help="MIN-MAX or one ZOOM (with --bbox)")
    p.add_argument("--square", help="X,Y,ZOOM,WIDTH,HEIGHT (the original shape)")
    p.add_argument("--list", help="a JSON file: a list of {x, y, zoom}")
    p.add_argument("--tiles-json", help="the TileJob spec.tiles object as JSON (also TILEHOPPER_TILES)")
    p.add_argument("--amqp-url", default=environ.get("AMQP_URL") or environ.get("TILEHOPPER_AMQP_URL"))
    p.add_argument("--queue", default=environ.get("TILEHOPPER_QUEUE"))
    p.add_argument("--max-tiles", type=int, default=int(environ.get("TILEHOPPER_MAX_TILES") or DEFAULT_MAX_TILES))
    p.add_argument("--tiles-dir", default=environ.get("TILEHOPPER_TILES_DIR") or None,
                   help="skip tiles already saved here")
    p.add_argument("--force", action="store_true", help="publish even if this job's queue was published before")
    p.add_argument("--dry-run", action="store_true", help="validate and count only")
    p.add_argument("--window", type=int, default=4000, help="unconfirmed messages in flight")
    return p


def _emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def _already_published(channel: Any, queue: str) -> bool:
    try:
        ok = channel.queue_declare(queue=published_marker_name(queue), passive=True)
    except pika.exceptions.ChannelClosedByBroker:
        return False  # 404: the marker queue does not exist
    return int(ok.method.message_count) > 0


def _write_marker(amqp_url: str, queue: str, summary: dict[str, Any]) -> None:
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        marker = published_marker_name(queue)
        channel.queue_declare(queue=marker, durable=True)
        channel.queue_purge(marker)  # one marker, the latest run's
        channel.basic_publish(
            exchange="", routing_key=marker, body=json.dumps(summary).encode(),
            properties=pika.BasicProperties(delivery_mode=PERSISTENT, content_type="application/json"),
        )


def publish(spec: TileSpec, *, amqp_url: str, queue: str, tiles_dir: Path | None, force: bool,
            window: int = 4000) -> dict[str, Any]:
    """Publish a validated spec; the dict is the final JSON line."""
    total = count_tiles(spec)
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        declare_job_queue(channel, queue)
        if not force and _already_published(channel, queue):
            return {"published": 0, "total": total, "queue": queue, "skipped": "already published (use --force)"}
    on_disk = [0]
    tiles = iter_tiles(spec)
    if tiles_dir is not None:
        tiles = _not_on_disk(tiles, tiles_dir, on_disk)

    def progress(p: PublishProgress) -> None:
        rate = p.published / p.seconds if p.seconds else 0.0
        print(f"published {p.published}/{total} ({rate:,.0f}/s)", file=sys.stderr, flush=True)

    result = ConfirmedPublisher(amqp_url=amqp_url, queue=queue, tiles=tiles, window=window,
                                on_progress=progress).run()
    summary = {
        "published": result.published, "total": total, "on_disk": on_disk[0], "queue": queue,
        "republished": result.republished, "seconds": round(result.seconds, 3),
        "per_second": round(result.published / result.seconds, 1) if result.seconds else None,
    }
    _write_marker(amqp_url, queue, {**summary, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    environ = dict(os.environ)
    args = _parser(environ).parse_args(argv)
    try:
        spec = parse_spec(tiles_doc_from_args(args, environ), max_tiles=args.max_tiles)
        if not args.dry_run:
            if not args.amqp_url:
                raise InputError("--amqp-url (or AMQP_URL / TILEHOPPER_AMQP_URL) is required")
            if not args.queue:
                raise InputError("--queue (or TILEHOPPER_QUEUE) is required")
            check_queue_name(args.queue)
    except (InputError, SpecError, ValueError) as exc:
        print(f"tilehopper-generator: {exc}", file=sys.stderr)
        return EXIT_INPUT
    total = count_tiles(spec)
    if args.dry_run:
        _emit({"published": 0, "total": total, "dry_run": True})
        return 0
    log.info("publishing %d tiles to %s on %s", total, args.queue, redact_url(args.amqp_url))
    try:
        summary = publish(spec, amqp_url=args.amqp_url, queue=args.queue,
                          tiles_dir=Path(args.tiles_dir) if args.tiles_dir else None,
                          force=args.force, window=args.window)
    except (PublishError, pika.exceptions.AMQPError) as exc:
        print(f"tilehopper-generator: {exc!r}", file=sys.stderr)
        return EXIT_BROKER
    _emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
