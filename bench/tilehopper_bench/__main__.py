"""`tilehopper-bench up|down|status`: the bench for a developer's shell (make bench-up / bench-down).

`up` starts a small supervisor process that owns every stand-in; `down` asks it to stop them all, by
PID. The supervisor writes .bench/env (shell-sourceable) once everything answers.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from tilehopper_bench import procs

DEFAULT_DIR = procs.repo_root() / ".bench"


def _serve(workdir: Path) -> int:
    from tilehopper_bench.stack import Bench

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    t0 = time.monotonic()
    bench = Bench(workdir, fixed_ports=True)
    bench.start()
    print(f"bench up in {time.monotonic() - t0:.1f}s: {bench.timings}", flush=True)
    (workdir / "ready").write_text(f"{time.monotonic() - t0:.1f}\n")
    stop.wait()
    bench.stop()
    (workdir / "ready").unlink(missing_ok=True)
    return 0


def _up(workdir: Path, timeout: float) -> int:
    pid_file = workdir / "bench.pid"
    if pid_file.exists() and procs.Proc("bench", int(pid_file.read_text()), workdir / "bench.log").alive():
        print(f"bench already up; source {workdir / 'env'}")
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "ready").unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = procs.start(
        "bench", [sys.executable, "-m", "tilehopper_bench", "serve", "--dir", str(workdir)], log_dir=workdir
    )
    pid_file.write_text(str(proc.pid))
    procs.wait_for(lambda: (workdir / "ready").exists(), timeout=timeout, what="bench up", proc=proc)
    print(proc.tail(5))
    print(f"bench up in {time.monotonic() - t0:.1f}s. Next:  source {workdir / 'env'} && kubectl get --raw /version")
    return 0


def _down(workdir: Path) -> int:
    pid_file = workdir / "bench.pid"
    if not pid_file.exists():
        print("bench is not up")
        return 0
    procs.stop_pid(int(pid_file.read_text()), timeout=60)
    pid_file.unlink(missing_ok=True)
    # A supervisor that was SIGKILLed leaves its children: each recorded PID is ours to stop.
    for pid_path in sorted(workdir.rglob("pids/*.pid")):
        try:
            procs.stop_pid(int(pid_path.read_text()), timeout=10)
        except ValueError:
            pass
        pid_path.unlink(missing_ok=True)
    print("bench down")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tilehopper-bench", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "serve", "status"])
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("TILEHOPPER_BENCH_DIR", DEFAULT_DIR)))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for a cold bench")
    args = parser.parse_args(argv)
    workdir = args.dir.resolve()
    if args.command == "up":
        return _up(workdir, args.timeout)
    if args.command == "down":
        return _down(workdir)
    if args.command == "serve":
        return _serve(workdir)
    ready = (workdir / "ready").exists()
    print(f"bench {'up' if ready else 'down'} ({workdir})")
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
