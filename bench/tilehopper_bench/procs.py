"""Processes the bench starts: each one's PID is recorded, and only those PIDs are ever stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """Built binaries live outside the repo and survive `git clean` and fresh clones."""
    base = os.environ.get("TILEHOPPER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tilehopper"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Proc:
    name: str
    pid: int
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie of ours still answers kill(0); reap it if it is our child.
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return False
        return True

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
        stop_pid(self.pid, timeout=timeout, sig=sig, popen=self.popen)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start(
    name: str,
    argv: Sequence[str],
    *,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    pid_dir: Path | None = None,
) -> Proc:
    """Start argv in its own session (so a terminal's ^C reaches only us), logging to a file."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
    if pid_dir is not None:
        pid_dir.mkdir(parents=True, exist_ok=True)
        (pid_dir / f"{name}.pid").write_text(str(popen.pid))
    return Proc(name=name, pid=popen.pid, log=log, popen=popen)


def stop_pid(
    pid: int,
    *,
    timeout: float = 15.0,
    sig: int = signal.SIGTERM,
    popen: subprocess.Popen[bytes] | None = None,
) -> None:
    """Signal one PID (never a name or pattern), wait, then SIGKILL it if it is still there."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            if popen.poll() is not None:
                return
        else:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    return
            except ChildProcessError:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if popen is not None:
        popen.wait(5)


def wait_for(
    check: Callable[[], bool], *, timeout: float, what: str, proc: Proc | None = None
) -> None:
    """Poll check() until it is true; fail with the process's log tail when it never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not ready yet, whatever the reason
            pass
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{what}: {proc.name} exited early\n{proc.tail()}")
        time.sleep(0.1)
    tail = f"\n{proc.tail()}" if proc else ""
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s{tail}")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def port_free(host: str, port: int) -> bool:
    """True when a listener could bind host:port now (not merely: nobody listens there)."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct free ports below the kernel's ephemeral range.

    A port from bind(0) lies inside that range, where any outgoing connection may take it as its
    local port between our pick and the server's own bind (seen with RabbitMQ's distribution
    port); below the range only listeners compete.
    """
    import random

    low, _ = ephemeral_range()
    rng = random.Random()
    picked: list[int] = []
    while len(picked) < count:
        port = rng.randrange(20000, max(20001, low))
        if port not in picked and port_free(host, port):
            picked.append(port)
    return picked
