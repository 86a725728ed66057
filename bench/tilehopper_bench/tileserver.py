"""The bench's stand-in for the tile server: Google-style paths, bans by source address, faults.

Run: ``python -m tilehopper_bench.tileserver --host 127.0.0.1 --port P [--ban-after-requests N]
[--ban-after-seconds T] [--latency-ms L]``, or from Python with ``TileServer(workdir).start()``.

Tiles: ``/vt?lyrs=s&x=X&y=Y&z=Z`` and ``/Z/X/Y.png`` (see tileimage for what they look like).
Tiles that do not exist, and the configured "missing" ones, answer 404.

Bans: a source address (the TCP peer, i.e. the proxy's address) is banned for good (403 to every
tile request) once it made more than ``ban_after_requests`` requests, or once
``ban_after_seconds`` passed since its first request; 0 turns either off. Only /_bench/reset lifts
a ban.

Control API (never counted, never banned, never delayed):
- ``POST /_bench/config``  JSON with any of ban_after_requests, ban_after_seconds, latency_ms,
  slow_ms, rates {"429", "500", "503", "slow", "truncated": probability}, missing [[x, y, z], ...],
  seed. Fields left out keep their value. Answers the whole config.
- ``GET /_bench/config``.
- ``POST /_bench/reset``  clears counters and bans; ``{"keep_config": false}`` also puts back the
  config the server was started with. The random faults restart from the seed.
- ``GET /_bench/stats``  {"total", "sources": {ip: {"requests", "codes", "banned", "first_seen",
  "headers_seen"}}, "headers_seen": {name: count}}. ``codes`` counts answers by status;
  truncated answers are counted as "truncated", not "200". ``headers_seen`` are the request
  headers that would reveal a client behind a proxy (Via, X-Forwarded-For, ...): a proxy that
  hides its clients leaves them empty.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import random
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from aiohttp import web

from tilehopper.contracts import Tile, tile_problem
from tilehopper_bench import procs
from tilehopper_bench.tileimage import tile_png

# Request headers through which a proxy would give away the address of its client.
REVEALING_HEADERS = ("Via", "X-Forwarded-For", "Forwarded", "X-Real-IP")
FAULTS = ("429", "500", "503", "truncated")  # mutually exclusive, drawn in this order
RATE_KEYS = (*FAULTS, "slow")  # "slow" is drawn on its own and can delay any answer
TILE_CACHE_SIZE = 4096  # ~16 KB each (64 MB at most): a repeated URL never renders twice
_PATH_RE = re.compile(r"^/(\d{1,3})/(\d{1,9})/(\d{1,9})\.png$", re.ASCII)


@dataclass
class Config:
    ban_after_requests: int = 0
    ban_after_seconds: float = 0.0
    latency_ms: float = 0.0  # every tile answer waits this long: a server far away
    slow_ms: float = 2000.0  # how long a "slow" answer waits on top of latency_ms
    rates: dict[str, float] = field(default_factory=dict)
    missing: frozenset[tuple[int, int, int]] = frozenset()
    seed: int = 0

    def updated(self, doc: Mapping[str, Any]) -> Config:
        """A copy with the fields of a /_bench/config body; ValueError for anything off."""
        unknown = set(doc) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        changes: dict[str, Any] = {}
        for name in ("ban_after_requests", "seed"):
            if name in doc:
                changes[name] = _number(doc[name], name, kind=int)
        for name in ("ban_after_seconds", "latency_ms", "slow_ms"):
            if name in doc:
                changes[name] = _number(doc[name], name, kind=float)
        if "rates" in doc:
            rates = doc["rates"]
            if not isinstance(rates, dict) or set(rates) - set(RATE_KEYS):
                raise ValueError(f"rates must be an object with keys from {RATE_KEYS}")
            changes["rates"] = {k: _number(v, f"rates.{k}", kind=float, top=1.0)
                                for k, v in rates.items()}
        if "missing" in doc:
            try:
                changes["missing"] = frozenset((int(x), int(y), int(z)) for x, y, z in doc["missing"])
            except (TypeError, ValueError) as exc:
                raise ValueError("missing must be a list of [x, y, z]") from exc
        return replace(self, **changes)

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["missing"] = sorted([list(t) for t in self.missing])
        return doc


def _number(value: Any, name: str, *, kind: type, top: float | None = None) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if top is not None and value > top:
        raise ValueError(f"{name} must be <= {top}, got {value!r}")
    return kind(value)


@dataclass
class Source:
    """What one source address did since the last reset."""

    first_seen: float
    requests: int = 0
    banned: bool = False
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    headers_seen: set[str] = field(default_factory=set)

    def banned_now(self, config: Config, now: float) -> bool:
        """Whether the limits ban this source by now; a ban, once earned, stays until a reset."""
        if not self.banned:
            too_many = config.ban_after_requests and self.requests > config.ban_after_requests
            too_long = config.ban_after_seconds and now - self.first_seen >= config.ban_after_seconds
            self.banned = bool(too_many or too_long)
        return self.banned

    def to_doc(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "codes": dict(self.codes),
            "banned": self.banned,
            "first_seen": self.first_seen,
            "headers_seen": sorted(self.headers_seen),
        }


def parse_tile(path: str, query_string: str) -> Tile | None:
    """The tile a request asks for, or None when the path names no existing tile."""
    if path == "/vt":
        # By hand: urllib's parse_qsl costs as much as making the tile (this is the hot path).
        query = dict(part.partition("=")[::2] for part in query_string.split("&"))
        values = [query.get(k, "") for k in ("x", "y", "z")]
        if not all(v.isascii() and v.isdigit() and len(v) < 10 for v in values):
            return None
        x, y, z = (int(v) for v in values)
    else:
        match = _PATH_RE.match(path)
        if match is None:
            return None
        z, x, y = (int(g) for g in match.groups())
    tile = Tile(x, y, z)
    return None if tile_problem(tile) else tile


@lru_cache(maxsize=TILE_CACHE_SIZE)
def cached_png(x: int, y: int, zoom: int) -> bytes:
    return tile_png(x, y, zoom)


class TileApp:
    """The server's state and its one request handler (aiohttp's low-level server: no router)."""

    def __init__(self, config: Config) -> None:
        self.startup_config = config
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.total = 0
        self.sources: dict[str, Source] = {}
        self.headers_seen: collections.Counter[str] = collections.Counter()
        self.random = random.Random(self.config.seed)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path.startswith("/_bench/"):
            return await self.control(request)
        return await self.tile(request)

    async def tile(self, request: web.BaseRequest) -> web.StreamResponse:
        config = self.config
        now = time.time()
        address = request.remote or "?"
        source = self.sources.get(address)
        if source is None:
            source = self.sources[address] = Source(first_seen=now)
        source.requests += 1
        self.total += 1
        headers = request.headers
        for name in REVEALING_HEADERS:
            if name in headers:
                source.headers_seen.add(name)
                self.headers_seen[name] += 1

        fault = None
        tile = None
        if source.banned_now(config, now):
            status = 403
        else:
            tile = parse_tile(request.path, request.query_string)
            if tile is None or (tile.x, tile.y, tile.zoom) in config.missing:
                status = 404
            else:
                fault = self._draw_fault(config.rates)
                status = int(fault) if fault and fault != "truncated" else 200

        delay = config.latency_ms
        if config.rates.get("slow") and self.random.random() < config.rates["slow"]:
            delay += config.slow_ms
        if delay:
            await asyncio.sleep(delay / 1000)

        if status != 200:
            source.codes[str(status)] += 1
            return web.Response(status=status, text=f"{status}\n")
        assert tile is not None
        png = cached_png(tile.x, tile.y, tile.zoom)
        if fault == "truncated":
            source.codes["truncated"] += 1
            return await self._truncated(request, png)
        source.codes["200"] += 1
        return web.Response(body=png, content_type="image/png")

    def _draw_fault(self, rates: Mapping[str, float]) -> str | None:
        if not rates:
            return None
        draw = self.random.random()
        threshold = 0.0
        for name in FAULTS:
            threshold += rates.get(name, 0.0)
            if draw < threshold:
                return name
        return None

    @staticmethod
    async def _truncated(request: web.BaseRequest, png: bytes) -> web.StreamResponse:
        """Promise the whole tile in Content-Length, send half of it, close the connection."""
        response = web.StreamResponse(status=200, headers={"Content-Type": "image/png"})
        response.content_length = len(png)
        response.force_close()
        await response.prepare(request)
        await response.write(png[: len(png) // 2])
        return response

    async def control(self, request: web.BaseRequest) -> web.StreamResponse:
        route = (request.method, request.path)
        try:
            body = await self._json_body(request)
            if route == ("GET", "/_bench/stats"):
                return web.json_response(self.stats())
            if route == ("GET", "/_bench/config"):
                return web.json_response(self.config.to_doc())
            if route == ("POST", "/_bench/config"):
                self.config = self.config.updated(body)
                if "seed" in body:
                    self.random = random.Random(self.config.seed)
                return web.json_response(self.config.to_doc())
            if route == ("POST", "/_bench/reset"):
                if body.get("keep_config", True) is False:
                    self.config = self.startup_config
                self.reset()
                return web.json_response(self.config.to_doc())
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"error": f"no {request.method} {request.path}"}, status=404)

    @staticmethod
    async def _json_body(request: web.BaseRequest) -> dict[str, Any]:
        if not request.body_exists:
            return {}
        text = await request.text()
        if not text.strip():
            return {}
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"body is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ValueError("body must be a JSON object")
        return doc

    def stats(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "sources": {ip: s.to_doc() for ip, s in self.sources.items()},
            "headers_seen": dict(self.headers_seen),
        }


async def serve(host: str, port: int, config: Config) -> None:
    app = TileApp(config)
    cached_png(0, 0, 0)  # build the tile maker before the first request, not during it
    server = web.Server(app.handle, access_log=None)
    # A stop waits for answers in flight, not for idle keep-alive connections to go away.
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    print(f"tile server on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tilehopper_bench.tileserver",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ban-after-requests", type=int, help="403 after N requests (0: never)")
    parser.add_argument("--ban-after-seconds", type=float, help="403 after T s (0: never)")
    parser.add_argument("--latency-ms", type=float, help="delay added to every tile answer")
    parser.add_argument("--config-json", default="{}", help="any /_bench/config fields, as JSON")
    args = parser.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        parser.error("the bench binds loopback addresses only")
    doc = json.loads(args.config_json)
    for name in ("ban_after_requests", "ban_after_seconds", "latency_ms"):
        if getattr(args, name) is not None:
            doc[name] = getattr(args, name)
    try:
        config = Config().updated(doc)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(serve(args.host, args.port, config))


class TileServer:
    """The tile server as a bench component: its own process, stopped by its PID."""

    def __init__(self, workdir: Path, port: int | None = None, *, host: str = "127.0.0.1",
                 **config: Any) -> None:
        self.config = Config().updated(config)  # a bad field fails here, not in the child
        self.workdir = workdir
        self.host = host
        # Chosen now, so env is right before start() (the bench writes it out after starting all).
        self.port = port or procs.free_port(host)
        self.proc: procs.Proc | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "TILE_URL": f"{self.url}/vt?lyrs=s&x={{x}}&y={{y}}&z={{z}}",
            "TILE_SERVER_URL": self.url,
        }

    def start(self) -> None:
        argv = [sys.executable, "-m", "tilehopper_bench.tileserver", "--host", self.host,
                "--port", str(self.port), "--config-json", json.dumps(self.config.to_doc())]
        self.proc = procs.start("tileserver", argv, log_dir=self.workdir / "logs",
                                pid_dir=self.workdir / "pids")
        procs.wait_for(lambda: self.stats() is not None, timeout=20, what="tile server",
                       proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def configure(self, **config: Any) -> dict[str, Any]:
        return self._call("POST", "/_bench/config", config)

    def reset(self, *, keep_config: bool = True) -> dict[str, Any]:
        return self._call("POST", "/_bench/reset", {"keep_config": keep_config})

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_bench/stats")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        # The control API is on loopback: never let a proxy from the environment see it.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=10) as answer:
                result: dict[str, Any] = json.loads(answer.read())
                return result
        except urllib.error.HTTPError as err:
            if err.code == 400:  # the server's word on a bad config, not a broken server
                raise ValueError(json.loads(err.read())["error"]) from None
            raise


if __name__ == "__main__":
    main()
