"""The whole bench at once: every stand-in of design.md ("The bench"), started in order.

`make bench-up` and the test suite's session fixture both go through Bench, so a developer's shell
and the tests see the same pieces. Every process binds 127.0.0.0/8 only and is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from tilehopper_bench import procs


class Component(Protocol):
    env: dict[str, str]

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Bench:
    """Control plane, RabbitMQ, moto (+ a tinyproxy per instance) and the tile server."""

    def __init__(
        self,
        workdir: Path,
        *,
        fixed_ports: bool = False,
        boot_delay: float = 2.0,
        tile_config: dict[str, Any] | None = None,
    ) -> None:
        from tilehopper_bench.aws import AwsBench
        from tilehopper_bench.kube import ControlPlane
        from tilehopper_bench.rabbit import RabbitMQ
        from tilehopper_bench.tileserver import TileServer

        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        # `make bench-up` uses the well-known ports a person expects; tests take free ones so a
        # developer's running bench and the suite never collide.
        amqp, mgmt = (5672, 15672) if fixed_ports else procs.free_ports(2)
        self.kube = ControlPlane(workdir / "kube")
        self.rabbit = RabbitMQ(workdir / "rabbitmq", amqp_port=amqp, mgmt_port=mgmt)
        self.aws = AwsBench(workdir / "aws", boot_delay=boot_delay)
        self.tiles = TileServer(workdir / "tileserver", **(tile_config or {}))
        self.components: list[Component] = [self.kube, self.rabbit, self.aws, self.tiles]
        self.timings: dict[str, float] = {}

    @property
    def env(self) -> dict[str, str]:
        env: dict[str, str] = {"TILEHOPPER_BENCH_DIR": str(self.workdir)}
        for component in self.components:
            env.update(component.env)
        return env

    def start(self) -> None:
        started: list[Component] = []
        try:
            for component in self.components:
                t0 = time.monotonic()
                component.start()
                started.append(component)
                self.timings[type(component).__name__] = round(time.monotonic() - t0, 2)
        except BaseException:
            for component in reversed(started):
                component.stop()
            raise
        self.write_env()

    def stop(self) -> None:
        errors = []
        for component in reversed(self.components):
            try:
                component.stop()
            except Exception as exc:  # noqa: BLE001 - stop the rest, then report
                errors.append(f"{type(component).__name__}: {exc}")
        (self.workdir / "env").unlink(missing_ok=True)
        if errors:
            raise RuntimeError("bench stop: " + "; ".join(errors))

    def write_env(self) -> Path:
        env = self.env
        bin_dir = env.get("TILEHOPPER_BENCH_BIN")
        lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
        if bin_dir:
            # kubectl and helm built from the pinned Go modules come first on PATH.
            lines.append(f'export PATH={shlex.quote(bin_dir)}:"$PATH"')
        path = self.workdir / "env"
        path.write_text("\n".join(lines) + "\n")
        (self.workdir / "env.json").write_text(json.dumps(env, indent=2, sort_keys=True))
        return path


def process_env(env: dict[str, str]) -> dict[str, str]:
    """os.environ plus the bench's variables, with the built kubectl/helm first on PATH."""
    merged = dict(os.environ)
    merged.update(env)
    if env.get("TILEHOPPER_BENCH_BIN"):
        merged["PATH"] = env["TILEHOPPER_BENCH_BIN"] + os.pathsep + merged.get("PATH", "")
    return merged


@contextmanager
def running_bench(workdir: Path, **kwargs: Any) -> Iterator[Bench]:
    bench = Bench(workdir, **kwargs)
    bench.start()
    try:
        yield bench
    finally:
        bench.stop()
