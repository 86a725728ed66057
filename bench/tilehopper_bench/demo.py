"""`make demo`: the main job on the bench, the way a user runs it on a real cluster.

helm install → the operator under the chart's ServiceAccount → kubectl apply of a TileJob of about
2,400 tiles → proxies booted in (moto) EC2 with real tinyproxies, switched every 20 s and on every
ban → tiles in ./tiles → a mosaic, a timeline and a summary in out/demo/ → the AWS leftovers (none)
→ kubectl delete → the leftovers again.

The bench has no kubelet: the podrunner plays it, running each Pod the controllers create (the
chart's operator, the generator Job's, the consumers') as a local process with the Pod's own
command, env and ServiceAccount token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from tilehopper import contracts
from tilehopper_bench import procs, scenario
from tilehopper_bench.stack import Bench

NAME = "riga-harbour"
# 60 x 40 tiles at zoom 13: 2,400 tiles.
SQUARE = {"x": 4650, "y": 2440, "zoom": 13, "width": 60, "height": 40}
ROTATE_EVERY = "20s"
LATENCY_MS = 100  # what a remote tile server looks like from a proxy
BAN_AFTER = 300  # act two: the server bans an address after this many requests

console = Console()


def _status(job: dict[str, Any]) -> dict[str, Any]:
    return job.get("status") or {}


def _progress_panel(job: dict[str, Any], act: str, started: float) -> Panel:
    s = _status(job)
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column()
    active = s.get("active") or {}
    table.add_row("phase", f"{s.get('phase', 'Pending')}  ({act})")
    table.add_row("tiles", f"{s.get('tilesSummary', '-')}  {s.get('progress', '')}")
    table.add_row("rate", f"{s.get('ratePerSecond', 0)} tiles/s   ETA {s.get('eta') or '-'}")
    table.add_row("active proxy", f"{active.get('instanceId', '-')} at {active.get('address', '-')}")
    table.add_row("generation", str(s.get("generation", 0)))
    by = s.get("rotationsByReason") or {}
    table.add_row("rotations", f"{s.get('rotations', 0)}  (timer {by.get('timer', 0)}, ban {by.get('ban', 0)})")
    for r in (s.get("rotationHistory") or [])[-4:]:
        table.add_row("", f"[dim]{r['at']}[/]  {r['reason']:<6} -> generation {r['generation']} ({r['to']})")
    return Panel(table, title=f"TileJob {NAME}  ·  {time.monotonic() - started:.0f}s", border_style="green")


def _mosaic(tiles_dir: Path, out: Path) -> Path:
    from PIL import Image

    cell = 32
    w, h, z = SQUARE["width"], SQUARE["height"], SQUARE["zoom"]
    mosaic = Image.new("RGB", (w * cell, h * cell), "black")
    for dx in range(w):
        for dy in range(h):
            path = tiles_dir / contracts.tile_filename(SQUARE["x"] + dx, SQUARE["y"] + dy, z)
            if path.exists():
                with Image.open(path) as tile:
                    mosaic.paste(tile.convert("RGB").resize((cell, cell)), (dx * cell, dy * cell))
    mosaic.save(out)
    return out


def _timeline(samples: list[tuple[float, int]], rotations: list[dict[str, Any]], t0: float, out: Path) -> Path:
    import datetime as dt

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The status moves about once a second and is sampled twice as often: a rate over a 3 s
    # window shows the throughput instead of the sampling.
    times, rates = [], []
    start = 0
    for tb, db in samples:
        while samples[start][0] < tb - 3.0:
            start += 1
        ta, da = samples[start]
        if tb > ta:
            times.append(tb - t0)
            rates.append((db - da) / (tb - ta))
    fig, ax = plt.subplots(figsize=(11, 4.2))
    ax.plot(times, rates, color="#2b7bba", lw=1.6, label="tiles/s")
    colours = {"timer": "#2ca02c", "ban": "#d62728"}
    for r in rotations:
        at = dt.datetime.strptime(r["at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp() - t0
        ax.axvline(at, color=colours.get(r["reason"], "grey"), ls="--", lw=1)
        ax.text(at, max(rates or [1]) * 0.97, f"{r['reason']} → g{r['generation']}", rotation=90,
                va="top", ha="right", fontsize=8, color=colours.get(r["reason"], "grey"))
    ax.set_xlabel("seconds since kubectl apply")
    ax.set_ylabel("tiles/s")
    ax.set_title(f"TileJob {NAME}: throughput and proxy rotations (green: timer, red: ban)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _leftover_table(title: str, aws_left: dict[str, int], kube_left: dict[str, int] | None = None) -> Table:
    table = Table(title=title)
    table.add_column("where")
    table.add_column("kind")
    table.add_column("left", justify="right")
    for kind, n in aws_left.items():
        table.add_row("AWS (moto)", kind, f"[{'red' if n else 'green'}]{n}[/]")
    for kind, n in (kube_left or {}).items():
        table.add_row("Kubernetes", kind, f"[{'red' if n else 'green'}]{n}[/]")
    return table


def run(out_dir: Path, tiles_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles_dir.mkdir(parents=True, exist_ok=True)
    for dx in range(SQUARE["width"]):  # a re-run downloads again: consumers skip tiles on disk
        for dy in range(SQUARE["height"]):
            (tiles_dir / contracts.tile_filename(SQUARE["x"] + dx, SQUARE["y"] + dy, SQUARE["zoom"])).unlink(missing_ok=True)
    t_setup = time.monotonic()
    console.rule("[bold]tilehopper demo: the bench")
    bench = Bench(out_dir / "bench", boot_delay=3.0)
    with console.status("starting kube-apiserver, controller-manager, RabbitMQ, moto, the tile server…"):
        bench.start()
    console.print(f"bench up: {bench.timings}")
    dep = scenario.Deployment(bench, "tilehopper", tiles_dir, out_dir / "deploy")
    failed = False
    try:
        with console.status("helm install tilehopper deploy/helm/tilehopper …"):
            dep.install()
            dep.start_runner()
        console.print(f"helm release installed; podrunner plays the kubelet ({time.monotonic() - t_setup:.0f}s so far)")
        bench.tiles.configure(latency_ms=LATENCY_MS, ban_after_requests=0)
        manifest = scenario.tilejob(NAME, url_template=bench.env["TILE_URL"], tiles={"square": SQUARE},
                                    rotate_every=ROTATE_EVERY, replicas=2, threads=2)
        (out_dir / "tilejob.json").write_text(json.dumps(manifest, indent=2))
        console.print(f"kubectl apply -f {out_dir / 'tilejob.json'}   (2,400 tiles, rotateEvery {ROTATE_EVERY})")
        dep.apply(manifest)
        t0, started = time.time(), time.monotonic()
        samples: list[tuple[float, int]] = []
        act = f"act 1: a patient server, {LATENCY_MS} ms per tile"
        job: dict[str, Any] = {}
        with Live(console=console, refresh_per_second=4) as live:
            while time.monotonic() - started < 600:
                job = dep.get_job(NAME) or {}
                s = _status(job)
                samples.append((time.time(), int(s.get("done", 0) or 0) + int(s.get("failed", 0) or 0)))
                by = s.get("rotationsByReason") or {}
                if by.get("timer", 0) >= 2 and "act 1" in act:
                    bench.tiles.configure(latency_ms=LATENCY_MS, ban_after_requests=BAN_AFTER)
                    act = f"act 2: the server bans an address after {BAN_AFTER} requests"
                live.update(_progress_panel(job, act, started))
                if s.get("phase") in ("Completed", "Failed"):
                    break
                time.sleep(0.5)
        s = _status(job)
        failed = s.get("phase") != "Completed"
        uid = job.get("metadata", {}).get("uid", "")
        mosaic = _mosaic(tiles_dir, out_dir / "mosaic.png")
        timeline = _timeline(samples, s.get("rotationHistory") or [], t0, out_dir / "timeline.png")
        summary = Table(title=f"TileJob {NAME}: {s.get('phase')}")
        summary.add_column("")
        summary.add_column("", justify="right")
        wall = max(1.0, samples[-1][0] - t0) if samples else 1.0
        by = s.get("rotationsByReason") or {}
        for key, value in (
            ("tiles downloaded", f"{s.get('done', 0)} of {s.get('total', 0)}"),
            ("failed", s.get("failed", 0)),
            ("on disk", len(list(tiles_dir.glob(f"*_{SQUARE['zoom']}.png")))),
            ("wall time", f"{wall:.0f}s ({s.get('done', 0) / wall:.0f} tiles/s)"),
            ("rotations by timer", by.get("timer", 0)),
            ("rotations by ban", by.get("ban", 0)),
            ("proxy instances used", (s.get("generation") or 0)),
            ("mosaic", str(mosaic)),
            ("timeline", str(timeline)),
        ):
            summary.add_row(key, str(value))
        console.print(summary)
        console.print(_leftover_table("AWS leftovers after completion (must be none)", scenario.aws_leftovers(bench, uid)))
        console.print(f"kubectl delete tilejob {NAME}")
        dep.delete_job(NAME)
        time.sleep(3)  # the garbage collector removes the job's objects
        after = scenario.aws_leftovers(bench, uid)
        kube_after = scenario.kube_leftovers(dep, NAME)
        console.print(_leftover_table("Leftovers after kubectl delete (must be none)", after, kube_after))
        failed = failed or any(after.values())
        console.print(f"[bold]{'FAILED' if failed else 'done'}[/] in {time.monotonic() - t_setup:.0f}s. "
                      f"Tiles in {tiles_dir}/, pictures in {out_dir}/")
    finally:
        dep.stop()
        bench.stop()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tilehopper-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=procs.repo_root() / "out" / "demo")
    parser.add_argument("--tiles", type=Path, default=procs.repo_root() / "tiles")
    args = parser.parse_args(argv)
    return run(args.out.resolve(), args.tiles.resolve())


if __name__ == "__main__":
    sys.exit(main())
