"""`make benchmark`: throughput, switch latency and footprint on the bench, in one run.

Prints a table per part and ends with one JSON line of every figure (docs/benchmarks.md explains
each one and holds the figures of a run). Parts, in order:

1. ceiling: wrk against the tile server directly, and through one tinyproxy (a Lua script writes
   the absolute-URI request line and Proxy-Authorization, since wrk has no proxy support);
2. consumers: ours against the original design's (tilehopper_consumer.naive), 1 and 2 processes,
   with the tile server adding 50 ms to every answer and on plain loopback; tiles/s and CPU s per
   tile of the consumer processes (psutil on the PIDs started here);
3. switch latency: first 403 to first 200 through the next proxy, 8 threads, a ban after N
   requests; this script plays the operator through the FILE proxy source;
4. generator: 810,000 tiles with publisher confirms beside a naive publisher without them;
5. operator (needs the control plane): RSS/CPU with 1 and 10 TileJobs, kubectl apply to the first
   ConfigMap generation, ban report to ConfigMap switch.

Everything runs on 127.0.0.0/8; every process started here is stopped by its PID.
Run: python -m tilehopper_bench.benchmark [--quick] [--parts ceiling,consumers,switch,generator,operator]
[--skip-operator] [--skip-generator]; the last line on stdout is the JSON object.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import psutil
import requests
from rich.console import Console
from rich.table import Table

from tilehopper import contracts
from tilehopper.amqp import PERSISTENT, declare_job_queue, job_queue_names
from tilehopper.contracts import Tile
from tilehopper.proxyconf import PRIVATE_IP, ProxySettings, render_config, render_filter
from tilehopper_bench import procs

console = Console(stderr=True)  # stdout carries only the table and the final JSON line
out = Console(width=150)

PROXY_USER = "benchuser"
PROXY_PASSWORD = "bench-pass-8471"
LATENCY_MS = 50  # what a remote tile server looks like from a proxy
# The tiles every consumer round fetches: one set, small enough for the tile server's cache
# (4,096 tiles), so no round pays for drawing tiles another did not.
SET_X, SET_Y, SET_ZOOM, SET_WIDTH = 30000, 20000, 16, 60
SET_SIZE = 3600
ORIGINAL_SQUARE = (268396, 390159, 20, 900, 900)  # the original default: 810,000 tiles


def tile_set(count: int) -> list[Tile]:
    return [Tile(SET_X + i % SET_WIDTH, SET_Y + i // SET_WIDTH, SET_ZOOM) for i in range(count)]


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index], 3)


# --- pieces ------------------------------------------------------------------------------------


class LoopbackAddresses:
    """A fresh 127.0.x.y per proxy: TIME_WAIT sockets of one run never slow the next one."""

    def __init__(self, third_octet: int) -> None:
        self.third = third_octet
        self.next = 10

    def take(self) -> str:
        ip = f"127.0.{self.third}.{self.next}"
        self.next += 1
        if self.next > 250:
            self.third, self.next = self.third + 1, 10
        return ip


class Proxy:
    """One tinyproxy from the product's template, listening on and binding to its own address."""

    def __init__(self, workdir: Path, ip: str, tile_port: int) -> None:
        self.ip = ip
        self.port = contracts.PROXY_PORT if not procs.port_open(ip, contracts.PROXY_PORT) else procs.free_port(ip)
        self.workdir = workdir / f"proxy-{ip}"
        settings = ProxySettings(username=PROXY_USER, password=PROXY_PASSWORD, allowed_cidrs=("127.0.0.0/8",),
                                 http_ports=(tile_port,), port=self.port, bind_outgoing=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "filter").write_text(render_filter(settings))
        conf = render_config(settings, str(self.workdir / "filter")).replace(PRIVATE_IP, ip)
        (self.workdir / "tinyproxy.conf").write_text(conf)
        self.proc: procs.Proc | None = None

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    @property
    def url_with_credentials(self) -> str:
        return f"http://{PROXY_USER}:{PROXY_PASSWORD}@{self.ip}:{self.port}"

    def announcement(self, generation: int) -> dict[str, str]:
        """The operator's ConfigMap data plus the Secret's keys: what the file proxy source reads."""
        return {"url": self.url, "generation": str(generation), "instanceId": f"i-{self.ip}",
                "state": "active", "banStatusCodes": "403", "username": PROXY_USER, "password": PROXY_PASSWORD}

    def start(self) -> Proxy:
        self.proc = procs.start(f"tinyproxy-{self.ip}", [shutil.which("tinyproxy") or "tinyproxy", "-d", "-c",
                                str(self.workdir / "tinyproxy.conf")], log_dir=self.workdir)
        procs.wait_for(lambda: procs.port_open(self.ip, self.port), timeout=10, what="tinyproxy", proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=5)
            self.proc = None


@dataclass
class Ctx:
    """What every part shares: the workdir, the broker, the tile server, what to stop at the end."""

    workdir: Path
    rabbit: Any
    tiles: Any
    quick: bool
    addresses: LoopbackAddresses = field(default_factory=lambda: LoopbackAddresses(40))
    proxies: list[Proxy] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)

    def proxy(self) -> Proxy:
        proxy = Proxy(self.workdir / "proxies", self.addresses.take(), int(self.tiles.port)).start()
        self.proxies.append(proxy)
        return proxy

    def queue(self, what: str) -> str:
        name = f"tilehopper.benchmark.{what}.{uuid.uuid4().hex[:8]}"
        self.queues.append(name)
        return name

    def stop_proxies(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        self.proxies.clear()

    def delete_queues(self) -> None:
        with contextlib.suppress(Exception), pika.BlockingConnection(pika.URLParameters(self.rabbit.amqp_url)) as c:
            channel = c.channel()
            for queue in self.queues:
                for name in job_queue_names(queue):
                    channel.queue_delete(name)
        self.queues.clear()


def publish(amqp_url: str, queue: str, tiles: list[Tile]) -> None:
    from tilehopper_generator.publish import ConfirmedPublisher

    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        declare_job_queue(connection.channel(), queue)
    ConfirmedPublisher(amqp_url=amqp_url, queue=queue, tiles=iter(tiles)).run()


def delete_queue(amqp_url: str, queue: str) -> None:
    with contextlib.suppress(Exception), pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        for name in job_queue_names(queue):
            channel.queue_delete(name)


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


# --- 1. the ceiling ----------------------------------------------------------------------------

WRK_SCRIPT = """-- Requests through an HTTP proxy: wrk connects to the proxy and sends an absolute URI.
local target = "%(target)s"
local auth = "%(auth)s"
local x0, y0, z, width, count = %(x0)d, %(y0)d, %(zoom)d, %(width)d, %(count)d
local i = 0
request = function()
  i = (i + 1) %% count
  local x = x0 + i %% width
  local y = y0 + math.floor(i / width)
  local path = target .. "/vt?lyrs=s&x=" .. x .. "&y=" .. y .. "&z=" .. z
  return wrk.format("GET", path, {["Host"] = "%(host)s", ["Proxy-Authorization"] = auth})
end
"""


def wrk(url: str, script: Path, *, seconds: int, connections: int = 64) -> dict[str, float]:
    answer = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
                            capture_output=True, text=True, timeout=seconds + 60)
    text = answer.stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors:(.*)", text)
    if rate is None:
        raise RuntimeError(f"wrk printed no rate:\n{text}\n{answer.stderr}")
    return {"req_per_s": float(rate.group(1)), "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(1).strip() if errors else ""}


def part_ceiling(ctx: Ctx, rounds: int) -> dict[str, Any]:
    host = f"{ctx.tiles.host}:{ctx.tiles.port}"
    auth = "Basic " + base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()

    def script(name: str, target: str) -> Path:
        path = ctx.workdir / name
        path.write_text(WRK_SCRIPT % {"target": target, "auth": auth, "host": host, "x0": SET_X, "y0": SET_Y,
                                      "zoom": SET_ZOOM, "width": SET_WIDTH, "count": SET_SIZE})
        return path

    direct = wrk(ctx.tiles.url, script("wrk-direct.lua", ""), seconds=3)
    through = []
    for _ in range(rounds):
        proxy = ctx.proxy()
        result = wrk(proxy.url, script("wrk-proxy.lua", ctx.tiles.url), seconds=5)
        if result["non_2xx"]:
            console.print(f"[yellow]wrk through the proxy: {result['non_2xx']} answers were not 200[/]")
        through.append(result["req_per_s"])
        proxy.stop()
    table = Table(title="1. Ceiling: the tile server, wrk -t2 -c64 (tiles cached in the server)")
    table.add_column("path")
    table.add_column("req/s", justify="right")
    table.add_row("direct, keep-alive (3 s, 1 run)", f"{direct['req_per_s']:,.0f}")
    table.add_row(f"through one tinyproxy (5 s, median of {rounds})", f"{median(through):,.0f}")
    out.print(table)
    return {"ceiling_tiles_per_s": round(median(through)), "ceiling_direct_req_per_s": round(direct["req_per_s"]),
            "ceiling_runs": [round(r) for r in through]}


# --- 2. consumers ------------------------------------------------------------------------------


@dataclass
class RoundResult:
    tiles_per_s: float
    cpu_ms_per_tile: float
    seconds: float


def consumer_round(ctx: Ctx, *, kind: str, processes: int, count: int, extra_env: dict[str, str] | None = None,
                   timeout: float = 180) -> RoundResult:
    """One measured run: `count` tiles queued, `processes` consumers of one kind, one fresh proxy.

    Rate: tiles between the first and the last file written, over the time between their
    mtimes (start-up and the idle tail are left out for both kinds). CPU: the consumer
    processes' user+system seconds over the same stretch, sampled by PID.
    """
    proxy = ctx.proxy()
    queue = ctx.queue(f"{kind}{processes}")
    tiles_dir = ctx.workdir / "tiles" / queue
    publish(ctx.rabbit.amqp_url, queue, tile_set(count))
    env = {"AMQP_URL": ctx.rabbit.amqp_url, "TILEHOPPER_QUEUE": queue, "TILEHOPPER_TILES_DIR": str(tiles_dir),
           "TILEHOPPER_URL_TEMPLATE": ctx.tiles.env["TILE_URL"], "TILEHOPPER_PROXY_URL": proxy.url_with_credentials,
           "TILEHOPPER_LOG_LEVEL": "WARNING", "TILEHOPPER_NAIVE_IDLE_EXITS": "1000", **(extra_env or {})}
    module = "tilehopper_consumer" if kind == "ours" else "tilehopper_consumer.naive"
    started: list[procs.Proc] = []
    try:
        for n in range(processes):
            started.append(procs.start(f"{queue}-{n}", [sys.executable, "-m", module], env=env,
                                       log_dir=ctx.workdir / "logs"))
        pids = [p.pid for p in started]
        cpu_first = cpu_last = None
        deadline = time.monotonic() + timeout
        done = 0
        while time.monotonic() < deadline:
            done = _count_tiles(tiles_dir)
            if done and cpu_first is None:
                cpu_first = cpu_seconds(pids)
            if done >= count:
                cpu_last = cpu_seconds(pids)
                break
            if not any(p.alive() for p in started):
                break
            time.sleep(0.05)
        if cpu_last is None:
            raise RuntimeError(f"{kind} x{processes}: {done}/{count} tiles before the deadline\n{started[0].tail()}")
    finally:
        for proc in started:
            proc.stop(timeout=20)
        proxy.stop()
        ctx.proxies.remove(proxy)
        delete_queue(ctx.rabbit.amqp_url, queue)
        ctx.queues.remove(queue)
    mtimes = sorted(entry.stat().st_mtime for entry in os.scandir(tiles_dir) if _is_tile(entry.name))
    span = max(mtimes[-1] - mtimes[0], 1e-3)
    shutil.rmtree(tiles_dir, ignore_errors=True)
    rate = (len(mtimes) - 1) / span
    cpu_ms = 1000 * (cpu_last - (cpu_first or 0.0)) / max(1, count - 1)
    return RoundResult(tiles_per_s=round(rate, 1), cpu_ms_per_tile=round(cpu_ms, 3), seconds=round(span, 2))


def _is_tile(name: str) -> bool:
    return not name.startswith(".") and name.endswith(".png")


def _count_tiles(tiles_dir: Path) -> int:
    try:
        return sum(1 for entry in os.scandir(tiles_dir) if _is_tile(entry.name))
    except FileNotFoundError:
        return 0


def warm_tile_cache(ctx: Ctx) -> None:
    """Fetch the tile set once, directly, so no measured round pays for drawing tiles."""
    session = requests.Session()
    session.trust_env = False  # never a proxy from the environment
    template = ctx.tiles.env["TILE_URL"]
    for tile in tile_set(SET_SIZE):
        session.get(template.format(x=tile.x, y=tile.y, z=tile.zoom), timeout=10).raise_for_status()
    ctx.tiles.reset()


def part_consumers(ctx: Ctx, rounds: int) -> dict[str, Any]:
    # (setting, latency, kind, processes, tiles per round, rounds)
    few = 1 if ctx.quick else 2  # the naive consumer at 50 ms is slow: fewer rounds of it
    plan = [
        ("latency", LATENCY_MS, "ours", 1, 3000, rounds),
        ("latency", LATENCY_MS, "naive", 1, 150, few),
        ("latency", LATENCY_MS, "ours", 2, 3000, rounds),
        ("latency", LATENCY_MS, "naive", 2, 300, few),
        ("loopback", 0, "ours", 1, 2500, rounds),
        ("loopback", 0, "naive", 1, 1500, rounds),
        ("loopback", 0, "ours", 2, 3000, rounds),
        ("loopback", 0, "naive", 2, 2000, rounds),
    ]
    results: dict[tuple[str, str, int], list[RoundResult]] = {}
    for setting, latency, kind, processes, count, n in plan:
        ctx.tiles.configure(latency_ms=latency, ban_after_requests=0, ban_after_seconds=0, rates={})
        for _ in range(n):
            result = consumer_round(ctx, kind=kind, processes=processes, count=count)
            results.setdefault((setting, kind, processes), []).append(result)
            console.print(f"  {setting:8} {kind:5} x{processes}: {result.tiles_per_s:8.1f} tiles/s, "
                          f"{result.cpu_ms_per_tile:.2f} ms CPU/tile ({count} tiles in {result.seconds}s)")
    # Ours with fsync off, once: what durability costs on this disk.
    ctx.tiles.configure(latency_ms=0)
    nofsync = consumer_round(ctx, kind="ours", processes=1, count=2500, extra_env={"TILEHOPPER_FSYNC": "0"})
    ctx.tiles.configure(latency_ms=0)

    def rate(setting: str, kind: str, processes: int) -> float:
        return median([r.tiles_per_s for r in results[(setting, kind, processes)]])

    def cpu(setting: str, kind: str, processes: int) -> float:
        return median([r.cpu_ms_per_tile for r in results[(setting, kind, processes)]])

    table = Table(title="2. Consumers through one tinyproxy: tiles/s (median) and CPU ms per tile")
    for column in ("setting", "processes", "ours tiles/s", "naive tiles/s", "ours/naive", "ours CPU ms/tile",
                   "naive CPU ms/tile", "runs (ours, naive)"):
        table.add_column(column, justify="right" if column != "setting" else "left")
    figures: dict[str, Any] = {}
    for setting, label in (("latency", f"+{LATENCY_MS} ms per answer"), ("loopback", "loopback")):
        for processes in (1, 2):
            ours, naive = rate(setting, "ours", processes), rate(setting, "naive", processes)
            ratio = round(ours / naive, 2) if naive else 0.0
            table.add_row(label, str(processes), f"{ours:,.0f}", f"{naive:,.1f}", f"{ratio:.2f}x",
                          f"{cpu(setting, 'ours', processes):.2f}", f"{cpu(setting, 'naive', processes):.2f}",
                          f"{len(results[(setting, 'ours', processes)])}, {len(results[(setting, 'naive', processes)])}")
            figures[f"{setting}_{processes}p_ours_tiles_per_s"] = ours
            figures[f"{setting}_{processes}p_naive_tiles_per_s"] = naive
            figures[f"{setting}_{processes}p_ours_cpu_ms_per_tile"] = cpu(setting, "ours", processes)
            figures[f"{setting}_{processes}p_naive_cpu_ms_per_tile"] = cpu(setting, "naive", processes)
    table.add_row("loopback, fsync off", "1", f"{nofsync.tiles_per_s:,.0f}", "", "",
                  f"{nofsync.cpu_ms_per_tile:.2f}", "", "1, -")
    out.print(table)
    figures.update({
        "ours_vs_naive_ratio": round(rate("latency", "ours", 1) / rate("latency", "naive", 1), 1),
        "ours_vs_naive_ratio_2p": round(rate("latency", "ours", 2) / rate("latency", "naive", 2), 1),
        "ours_vs_naive_ratio_loopback": round(rate("loopback", "ours", 1) / rate("loopback", "naive", 1), 2),
        "ours_vs_naive_ratio_loopback_2p": round(rate("loopback", "ours", 2) / rate("loopback", "naive", 2), 2),
        "cpu_per_tile_ratio": round(cpu("loopback", "ours", 1) / cpu("loopback", "naive", 1), 2),
        "cpu_per_tile_ratio_2p": round(cpu("loopback", "ours", 2) / cpu("loopback", "naive", 2), 2),
        # Like for like: the naive consumer never fsyncs either.
        "cpu_per_tile_ratio_nofsync": round(nofsync.cpu_ms_per_tile / cpu("loopback", "naive", 1), 2),
        "loopback_1p_ours_nofsync_tiles_per_s": nofsync.tiles_per_s,
        "loopback_1p_ours_nofsync_cpu_ms_per_tile": nofsync.cpu_ms_per_tile,
    })
    return figures


# --- 3. switch latency -------------------------------------------------------------------------


def write_proxy_file(path: Path, doc: dict[str, str]) -> None:
    temp = path.with_suffix(".new")
    temp.write_text(json.dumps(doc))
    os.replace(temp, path)  # a switch arrives whole, like a ConfigMap update


def part_switch(ctx: Ctx) -> dict[str, Any]:
    """8 threads, a ban after N requests per proxy address; this loop plays the operator."""
    switches = 15 if ctx.quick else 30
    ban_after = 30
    chain = [ctx.proxy() for _ in range(switches + 1)]
    queue = ctx.queue("switch")
    workdir = ctx.workdir / "switch"
    workdir.mkdir(parents=True, exist_ok=True)
    proxy_file, bans_file = workdir / "proxy.json", workdir / "proxy.json.bans"
    bans_file.unlink(missing_ok=True)
    tiles_dir = workdir / "tiles"
    ctx.tiles.reset()
    ctx.tiles.configure(latency_ms=LATENCY_MS, ban_after_requests=ban_after)
    publish(ctx.rabbit.amqp_url, queue, tile_set(min(SET_SIZE, (switches + 4) * ban_after)))
    write_proxy_file(proxy_file, chain[0].announcement(1))
    env = {"AMQP_URL": ctx.rabbit.amqp_url, "TILEHOPPER_QUEUE": queue, "TILEHOPPER_TILES_DIR": str(tiles_dir),
           "TILEHOPPER_URL_TEMPLATE": ctx.tiles.env["TILE_URL"], "TILEHOPPER_PROXY_FILE": str(proxy_file),
           "TILEHOPPER_THREADS": "8", "TILEHOPPER_LOG_LEVEL": "WARNING", "TILEHOPPER_REPORTER": "benchmark"}
    consumer = procs.start("switch-consumer", [sys.executable, "-m", "tilehopper_consumer"], env=env,
                           log_dir=ctx.workdir / "logs")
    ban_at: dict[int, float] = {}  # generation -> when its ban report was written (file mtime)
    generation = 1
    deadline = time.monotonic() + 120
    try:
        while generation <= switches and time.monotonic() < deadline and consumer.alive():
            try:
                with open(bans_file) as handle:
                    reported = contracts.banned_generations(json.loads(handle.read() or "{}"))
                written = os.stat(bans_file).st_mtime
            except (OSError, ValueError):
                reported, written = set(), 0.0
            if generation in reported:
                ban_at[generation] = written
                write_proxy_file(proxy_file, chain[generation].announcement(generation + 1))
                generation += 1
            time.sleep(0.002)
        time.sleep(1.0)  # the last switch's first answers land
    finally:
        consumer.stop(timeout=20)
    sources = ctx.tiles.stats()["sources"]
    ctx.tiles.configure(latency_ms=0, ban_after_requests=0)
    latencies = []
    for gen, at in sorted(ban_at.items()):
        # generation gen+1 is served by chain[gen]: its first request is a 200 (not banned yet),
        # which reaches the consumer one server latency after the server saw it.
        first = sources.get(chain[gen].ip, {}).get("first_seen")
        if first:
            latencies.append(first + LATENCY_MS / 1000 - at)
    for proxy in chain:
        proxy.stop()
    delete_queue(ctx.rabbit.amqp_url, queue)
    table = Table(title=f"3. Switch: first 403 to first 200 through the next proxy "
                        f"(1 consumer, 8 threads, ban after {ban_after} requests, +{LATENCY_MS} ms, file source)")
    for column in ("switches", "p50 s", "p99 s", "max s", "min s"):
        table.add_column(column, justify="right")
    table.add_row(str(len(latencies)), f"{percentile(latencies, 50):.3f}", f"{percentile(latencies, 99):.3f}",
                  f"{max(latencies, default=0):.3f}", f"{min(latencies, default=0):.3f}")
    out.print(table)
    return {"switch_p50_s": percentile(latencies, 50), "switch_p99_s": percentile(latencies, 99),
            "switch_samples": len(latencies), "switch_source": "file (this script plays the operator)"}


# --- 4. generator ------------------------------------------------------------------------------


def naive_publisher(amqp_url: str, queue: str, square: tuple[int, int, int, int, int]) -> None:
    """The baseline: one blocking basic_publish per tile, persistent, no confirms."""
    x0, y0, zoom, width, height = square
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        declare_job_queue(channel, queue)
        properties = pika.BasicProperties(delivery_mode=PERSISTENT)
        for x in range(x0, x0 + width):
            for y in range(y0, y0 + height):
                channel.basic_publish(exchange="", routing_key=queue, properties=properties,
                                      body=json.dumps({"x": x, "y": y, "zoom": zoom}).encode())


def run_measured(argv: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MB) of a child, from wait4's rusage."""
    started = time.monotonic()
    with open(log, "ab") as handle:
        child = subprocess.Popen(argv, env={**os.environ, **env}, stdout=handle, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = started + timeout
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            procs.stop_pid(child.pid, timeout=5)
            raise RuntimeError(f"{argv[2:4]} did not finish in {timeout:.0f}s")
        time.sleep(0.05)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{argv} exited {child.returncode}; see {log}")
    return time.monotonic() - started, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def part_generator(ctx: Ctx) -> dict[str, Any]:
    square = ORIGINAL_SQUARE if not ctx.quick else (*ORIGINAL_SQUARE[:3], 300, 300)
    # The naive publisher is 2-3x slower: a third of the square gives its rate in a third of the time.
    naive_square = (*square[:3], square[3] // 3, square[4])
    env = {"AMQP_URL": ctx.rabbit.amqp_url}
    rows = []
    figures: dict[str, Any] = {}
    for kind, square in (("ours", square), ("naive", naive_square)):
        total = square[3] * square[4]
        queue = ctx.queue(f"generator-{kind}")
        if kind == "ours":
            argv = [sys.executable, "-m", "tilehopper_generator", "--square", ",".join(map(str, square)),
                    "--queue", queue]
        else:
            argv = [sys.executable, "-m", "tilehopper_bench.benchmark", "naive-publisher", "--queue", queue,
                    "--square", ",".join(map(str, square))]
        seconds, cpu, rss = run_measured(argv, env, ctx.workdir / "logs" / f"generator-{kind}.log", timeout=600)
        from tilehopper_bench.rabbit import queue_counts

        queued = queue_counts(ctx.rabbit.api_url, queue)[0]
        rows.append((kind, total, seconds, cpu, rss, queued))
        delete_queue(ctx.rabbit.amqp_url, queue)
        ctx.queues.remove(queue)
        figures[f"generator_{kind}_seconds"] = round(seconds, 1)
        figures[f"generator_{kind}_msgs_per_s"] = round(total / seconds)
        figures[f"generator_{kind}_rss_mb"] = round(rss, 1)
        figures[f"generator_{kind}_queued"] = queued
    table = Table(title="4. Generator: the original square (900 x 900 at z20) into one durable queue, 1 run each")
    for column in ("publisher", "tiles", "seconds", "msgs/s", "CPU s", "peak RSS MB", "in the queue after"):
        table.add_column(column, justify="right" if column != "publisher" else "left")
    for kind, total, seconds, cpu, rss, queued in rows:
        label = "ours: streaming, confirms (window 4000)" if kind == "ours" else "naive: blocking, no confirms"
        table.add_row(label, f"{total:,}", f"{seconds:.1f}", f"{total / seconds:,.0f}", f"{cpu:.1f}", f"{rss:.0f}",
                      f"{queued:,}")
    out.print(table)
    figures["generator_msgs_per_s"] = figures.pop("generator_ours_msgs_per_s")
    figures["generator_rss_mb"] = figures.pop("generator_ours_rss_mb")
    figures["generator_tiles"] = rows[0][1]
    figures["generator_naive_tiles"] = rows[1][1]
    return figures


# --- 5. operator -------------------------------------------------------------------------------


class ProcessSampler:
    """RSS and CPU of one PID (and its children), sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _family(self) -> list[psutil.Process]:
        return [self.process, *self.process.children(recursive=True)]

    def rss_mb(self) -> float:
        return sum(p.memory_info().rss for p in self._family()) / 2**20

    def cpu_s(self) -> float:
        total = 0.0
        for p in self._family():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, int(self.rss_mb() * 2**20))
            self._stop.wait(0.2)

    def window(self, seconds: float) -> tuple[float, float]:
        """(RSS MB at the end, CPU as a fraction of one core) over `seconds`."""
        c0, t0 = self.cpu_s(), time.monotonic()
        time.sleep(seconds)
        return self.rss_mb(), (self.cpu_s() - c0) / (time.monotonic() - t0)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def part_operator(ctx: Ctx, bench: Any, started: list[Any]) -> dict[str, Any]:
    from kubernetes import client, config

    from tilehopper_bench import scenario

    t0 = time.monotonic()
    for component in (bench.kube, bench.aws):
        component.start()
        started.append(component)
    bench.write_env()
    namespace = "tilehopper-benchmark"
    dep = scenario.Deployment(bench, namespace, ctx.workdir / "operator-tiles", ctx.workdir / "deploy")
    figures: dict[str, Any] = {}
    try:
        dep.install()
        dep.start_runner()
        procs.wait_for(lambda: dep.operator_pid() is not None, timeout=60, what="the operator's pod")
        time.sleep(3)  # kopf's start-up: its first list/watch calls
        console.print(f"  control plane, moto and the chart up in {time.monotonic() - t0:.0f}s")
        api = client.CoreV1Api(config.new_client_from_config(config_file=bench.env["KUBECONFIG"]))
        boot_delay = float(bench.aws.boot_delay)
        # A slow server keeps every job running while we measure (1 thread, 1 replica each).
        ctx.tiles.configure(latency_ms=300, ban_after_requests=0)
        pid = dep.operator_pid()
        assert pid is not None
        with ProcessSampler(pid) as sampler:
            idle_rss, idle_cpu = sampler.window(5)
            first = apply_and_wait(dep, api, "bench-1")
            rss1, cpu1 = sampler.window(10)
            bans = ban_to_switch(dep, api, "bench-1", samples=3 if ctx.quick else 6)
            others = []
            names = [f"bench-{i}" for i in range(2, 11)]
            starts = {name: apply_only(dep, name) for name in names}
            for name in names:
                others.append(wait_first_generation(api, namespace, name, starts[name]))
            rss10, cpu10 = sampler.window(10)
            peak = sampler.peak_rss / 2**20
        table = Table(title="5. Operator on the bench (kopf, one process; jobs kept running by a slow server)")
        table.add_column("figure")
        table.add_column("value", justify="right")
        table.add_row("RSS / CPU, no TileJob", f"{idle_rss:.0f} MB / {100 * idle_cpu:.1f} % of a core")
        table.add_row("RSS / CPU, 1 TileJob (10 s window)", f"{rss1:.0f} MB / {100 * cpu1:.1f} % of a core")
        table.add_row("RSS / CPU, 10 TileJobs (10 s window)", f"{rss10:.0f} MB / {100 * cpu10:.1f} % of a core")
        table.add_row("peak RSS seen", f"{peak:.0f} MB")
        table.add_row(f"apply -> first ConfigMap generation, 1st job (boot delay {boot_delay:.1f} s taken out)",
                      f"{first - boot_delay:.2f} s")
        table.add_row("same, 9 jobs applied at once (median / max)",
                      f"{median(others) - boot_delay:.2f} / {max(others) - boot_delay:.2f} s")
        table.add_row(f"ban report -> ConfigMap switch (p50 / max of {len(bans)})",
                      f"{percentile(bans, 50) * 1000:.0f} / {max(bans, default=0) * 1000:.0f} ms")
        out.print(table)
        figures = {
            "operator_rss_mb_idle": round(idle_rss, 1), "operator_cpu_idle": round(idle_cpu, 3),
            "operator_rss_mb_1_job": round(rss1, 1), "operator_cpu_1_job": round(cpu1, 3),
            "operator_rss_mb_10_jobs": round(rss10, 1), "operator_cpu_10_jobs": round(cpu10, 3),
            "operator_peak_rss_mb": round(peak, 1),
            "apply_to_first_generation_s": round(first - boot_delay, 2),
            "apply_to_first_generation_9_at_once_median_s": round(median(others) - boot_delay, 2),
            "boot_delay_s": boot_delay,
            "ban_to_switch_p50_ms": round(percentile(bans, 50) * 1000),
            "ban_to_switch_max_ms": round(max(bans, default=0) * 1000),
            "ban_to_switch_samples": len(bans),
        }
    finally:
        ctx.tiles.configure(latency_ms=0)
        with contextlib.suppress(Exception):
            dep.kubectl("delete", "tilejob", "--all", "-n", namespace, "--wait=true", "--timeout=180s")
        dep.stop()
    return figures


def _proxy_generation(api: Any, namespace: str, job: str) -> int:
    try:
        cm = api.read_namespaced_config_map(contracts.proxy_configmap_name(job), namespace)
    except Exception:  # noqa: BLE001 - not created yet
        return 0
    ann = contracts.ProxyAnnouncement.from_data(cm.data)
    return ann.generation if ann.usable else 0


def apply_only(dep: Any, name: str) -> float:
    from tilehopper_bench import scenario

    manifest = scenario.tilejob(name, url_template=dep.bench.env["TILE_URL"], rotate_every="10m",
                                replicas=1, threads=1,
                                tiles={"square": {"x": 100, "y": 100, "zoom": 12, "width": 40, "height": 50}})
    started = time.monotonic()
    dep.apply(manifest)
    return started


def wait_first_generation(api: Any, namespace: str, name: str, started: float, timeout: float = 180) -> float:
    deadline = started + timeout
    while time.monotonic() < deadline:
        if _proxy_generation(api, namespace, name) >= 1:
            return time.monotonic() - started
        time.sleep(0.02)
    raise TimeoutError(f"TileJob {name}: no proxy generation after {timeout:.0f}s")


def apply_and_wait(dep: Any, api: Any, name: str) -> float:
    return wait_first_generation(api, dep.namespace, name, apply_only(dep, name))


def _standby_ready(dep: Any, name: str) -> bool:
    job = dep.get_job(name) or {}
    return any(s.get("phase") == "ready" for s in (job.get("status") or {}).get("standby") or [])


def ban_to_switch(dep: Any, api: Any, name: str, *, samples: int) -> list[float]:
    """Write the ban key for the current generation ourselves; time until the generation moves."""
    namespace = dep.namespace
    latencies = []
    for _ in range(samples):
        procs.wait_for(lambda: _standby_ready(dep, name), timeout=90, what=f"{name}: a ready standby")
        generation = _proxy_generation(api, namespace, name)
        at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = contracts.ban_patch(generation, "benchmark", 403, at)
        started = time.monotonic()
        api.patch_namespaced_config_map(contracts.ban_configmap_name(name), namespace, body)
        while _proxy_generation(api, namespace, name) <= generation:
            if time.monotonic() - started > 60:
                raise TimeoutError(f"{name}: generation {generation} never switched after a ban report")
            time.sleep(0.005)
        latencies.append(time.monotonic() - started)
    return latencies


# --- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tilehopper_bench.proxies import relax_time_wait
    from tilehopper_bench.stack import Bench

    workdir = Path(args.workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    (workdir / "logs").mkdir()
    bench = Bench(workdir / "bench", boot_delay=1.0)
    started: list[Any] = []
    figures: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "load_avg_at_start": os.getloadavg()[0]},
                               "tcp_tw_reuse": relax_time_wait()}
    began = time.monotonic()
    rounds = 1 if args.quick else 3
    ctx = Ctx(workdir=workdir, rabbit=bench.rabbit, tiles=bench.tiles, quick=args.quick)
    try:
        # The data plane needs only RabbitMQ and the tile server; the control plane starts later,
        # so its idle CPU is not in the throughput figures.
        with console.status("starting RabbitMQ and the tile server"):
            for component in (bench.rabbit, bench.tiles):
                component.start()
                started.append(component)
            warm_tile_cache(ctx)
        parts: dict[str, Callable[[], dict[str, Any]]] = {
            "ceiling": lambda: part_ceiling(ctx, rounds),
            "consumers": lambda: part_consumers(ctx, rounds),
            "switch": lambda: part_switch(ctx),
            "generator": lambda: part_generator(ctx),
            "operator": lambda: part_operator(ctx, bench, started),
        }
        chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
        if args.skip_generator:
            chosen = [p for p in chosen if p != "generator"]
        if args.skip_operator:
            chosen = [p for p in chosen if p != "operator"]
        for name in chosen:
            part = parts[name]
            t0 = time.monotonic()
            console.rule(f"[bold]{name}")
            try:
                figures.update(part())
            except Exception as exc:  # noqa: BLE001 - report the other parts all the same
                console.print_exception()
                figures.setdefault("failed_parts", []).append(f"{name}: {exc}"[:300])
            finally:
                ctx.stop_proxies()
            figures.setdefault("part_seconds", {})[name] = round(time.monotonic() - t0, 1)
    finally:
        ctx.stop_proxies()
        ctx.delete_queues()
        for component in reversed(started):
            try:
                component.stop()
            except Exception as exc:  # noqa: BLE001 - stop the rest
                console.print(f"[red]stopping {type(component).__name__}: {exc}[/]")
    figures["machine"]["load_avg_at_end"] = os.getloadavg()[0]
    figures["total_seconds"] = round(time.monotonic() - began, 1)
    summary(figures)
    return figures


PARTS = ("ceiling", "consumers", "switch", "generator", "operator")

TARGETS = [  # (figure, comparison, target, what)
    ("ours_vs_naive_ratio", ">=", 20, "per process, +50 ms"),
    ("ours_vs_naive_ratio_loopback", ">=", 1.5, "equal processes, loopback"),
    ("cpu_per_tile_ratio", "<=", 0.5, "CPU per tile, ours/naive"),
    ("switch_p50_s", "<", 1.0, "first 403 to first 200"),
    ("generator_rss_mb", "<", 150, "810k tiles"),
    ("operator_rss_mb_10_jobs", "<", 150, "10 TileJobs"),
    ("ban_to_switch_p50_ms", "<", 200, "ban report to ConfigMap switch"),
]


def summary(figures: dict[str, Any]) -> None:
    table = Table(title="Targets (issues 3 and 4)")
    for column in ("figure", "what", "target", "measured", "met"):
        table.add_column(column)
    for name, op, target, what in TARGETS:
        value = figures.get(name)
        ok = None if value is None else {">=": value >= target, "<=": value <= target, "<": value < target}[op]
        table.add_row(name, what, f"{op} {target}", "-" if value is None else str(value),
                      "-" if ok is None else ("[green]yes[/]" if ok else "[red]no[/]"))
    if "generator_msgs_per_s" in figures:
        ours, naive = figures["generator_msgs_per_s"], figures.get("generator_naive_msgs_per_s", 0)
        table.add_row("generator_msgs_per_s", "confirms vs naive without", f">= {naive}", str(ours),
                      "[green]yes[/]" if ours >= naive else "[red]no[/]")
    out.print(table)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["naive-publisher"]:
        p = argparse.ArgumentParser(prog="benchmark naive-publisher")
        p.add_argument("--queue", required=True)
        p.add_argument("--square", required=True)
        a = p.parse_args(argv[1:])
        square = tuple(int(v) for v in a.square.split(","))
        naive_publisher(os.environ["AMQP_URL"], a.queue, square)  # type: ignore[arg-type]
        return 0
    parser = argparse.ArgumentParser(prog="python -m tilehopper_bench.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=str(procs.repo_root() / "out" / "benchmark"))
    parser.add_argument("--quick", action="store_true", help="1 round each and smaller sizes (a smoke run)")
    parser.add_argument("--skip-operator", action="store_true", help="no control plane (issue 3 figures only)")
    parser.add_argument("--skip-generator", action="store_true", help="leave out the 810k-tile publish")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    if shutil.which("wrk") is None or shutil.which("tinyproxy") is None:
        print("benchmark: needs wrk and tinyproxy (tools/install-system-deps.sh)", file=sys.stderr)
        return 2
    # A ^C still stops everything through the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    figures = run(args)
    print(json.dumps(figures, sort_keys=True), flush=True)
    return 1 if figures.get("failed_parts") else 0


if __name__ == "__main__":
    sys.exit(main())
