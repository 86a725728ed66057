"""The bench's RabbitMQ: Debian's rabbitmq-server with the management plugin, on 127.0.0.1 only.

Measured facts this follows: start the server script from its lib directory
(the /usr/sbin wrapper switches user and loses our environment), give it its own HOME and base
dirs, wait with `rabbitmqctl wait <pidfile>`, stop it with SIGTERM to beam's PID. We start epmd
ourselves, so the epmd RabbitMQ would otherwise leave behind is a process we own and stop by PID.
"""

from __future__ import annotations

from pathlib import Path

import requests

from tilehopper_bench import procs

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
EPMD = "epmd"
HOST = "127.0.0.1"
# Erlang's way of saying 127.0.0.1 in -kernel inet_dist_use_interface.
ERL_LOOPBACK = "{127,0,0,1}"


class RabbitMQ:
    def __init__(
        self,
        workdir: Path,
        *,
        amqp_port: int = 5672,
        mgmt_port: int = 15672,
        dist_port: int | None = None,
        epmd_port: int | None = None,
        start_timeout: float = 90.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.base = self.workdir / "rabbitmq"
        self.amqp_port = amqp_port
        self.mgmt_port = mgmt_port
        # Erlang's usual ports (distribution = AMQP + 20000, epmd 4369) when they are free, so
        # `make bench-up` looks familiar; any free port when they are not (a test beside a bench).
        self.dist_port = dist_port or _usual_or_free(amqp_port + 20000)
        self.epmd_port = epmd_port or _usual_or_free(4369)
        self.start_timeout = start_timeout
        self._epmd: procs.Proc | None = None
        self._server: procs.Proc | None = None
        self._wait: procs.Proc | None = None  # rabbitmqctl wait, while start() runs

    # --- what others read -----------------------------------------------------------------

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.amqp_port}/%2F"

    @property
    def api_url(self) -> str:
        return f"http://guest:guest@{HOST}:{self.mgmt_port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AMQP_URL": self.amqp_url, "RABBITMQ_API_URL": self.api_url}

    @property
    def pid_file(self) -> Path:
        return self.base / "rabbit.pid"

    # --- lifecycle ------------------------------------------------------------------------

    def server_env(self) -> dict[str, str]:
        """Everything that keeps the node's files under workdir and its ports on 127.0.0.1."""
        loopback_args = f"-kernel inet_dist_use_interface {ERL_LOOPBACK}"
        return {
            "HOME": str(self.base / "home"),  # the Erlang cookie lives here
            "RABBITMQ_NODENAME": "rabbit@localhost",
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),  # rabbitmq.conf, no extension
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback_args,
            # rabbitmqctl is a distributed Erlang node too: keep its listener on loopback.
            "RABBITMQ_CTL_ERL_ARGS": loopback_args,
            "ERL_EPMD_ADDRESS": HOST,
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_CRASH_DUMP": str(self.base / "log" / "erl_crash.dump"),  # never into the repo
        }

    def _write_config(self) -> None:
        for sub in ("home", "mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {HOST}:{self.amqp_port}\n"
            f"management.tcp.ip = {HOST}\n"
            f"management.tcp.port = {self.mgmt_port}\n"
        )
        (self.base / "enabled_plugins").write_text("[rabbitmq_management].\n")

    def start(self) -> None:
        for port in (self.amqp_port, self.mgmt_port, self.dist_port, self.epmd_port):
            if procs.port_open(HOST, port):
                raise RuntimeError(f"RabbitMQ: port {port} on {HOST} is already in use")
        self._write_config()
        self.pid_file.unlink(missing_ok=True)
        logs, pids = self.workdir / "logs", self.workdir / "pids"
        env = self.server_env()
        try:
            self._epmd = procs.start(
                "epmd",
                [EPMD, "-address", HOST, "-port", str(self.epmd_port)],
                log_dir=logs,
                pid_dir=pids,
                env=env,
            )
            procs.wait_for(
                lambda: procs.port_open(HOST, self.epmd_port), timeout=10, what="epmd", proc=self._epmd
            )
            self._server = procs.start(
                "rabbitmq", [str(SERVER)], log_dir=logs, pid_dir=pids, env=env
            )
            self._wait = wait = procs.start(
                "rabbitmq-wait",
                [str(CTL), "wait", "--timeout", str(int(self.start_timeout)), str(self.pid_file)],
                log_dir=logs,
                env=env,
            )
            procs.wait_for(
                lambda: not wait.alive(), timeout=self.start_timeout + 10, what="rabbitmqctl wait"
            )
            if wait.popen is not None and wait.popen.returncode != 0:
                raise RuntimeError(f"rabbitmqctl wait failed\n{wait.tail()}\n{self._server.tail()}")
            procs.wait_for(
                self._api_ready, timeout=self.start_timeout, what="RabbitMQ management API",
                proc=self._server,
            )
        except BaseException:
            self.stop()
            raise

    def _api_ready(self) -> bool:
        return requests.get(f"{self.api_url}/api/overview", timeout=2).status_code == 200

    def stop(self) -> None:
        if self._wait is not None and self._wait.alive():
            self._wait.stop(timeout=5)
        # beam.smp is a child of the server script; its own PID is in the pid file.
        beam_pid = _read_pid(self.pid_file)
        if beam_pid is not None:
            procs.stop_pid(beam_pid, timeout=30)
        if self._server is not None:
            self._server.stop(timeout=30)
            self._server = None
        if self._epmd is not None:
            self._epmd.stop(timeout=5)
            self._epmd = None
        self.pid_file.unlink(missing_ok=True)


def _usual_or_free(port: int) -> int:
    low, _ = procs.ephemeral_range()
    if port < low and procs.port_free(HOST, port):
        return port
    return procs.free_port(HOST)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def queue_counts(api_url: str, queue: str, *, timeout: float = 5.0) -> tuple[int, int, int]:
    """(ready, unacked, total) of one queue in vhost "/", without the ~5 s statistics lag.

    Only the list endpoint honours enable_queue_totals (measured: /api/queues/%2F/<name>
    ignores it and, with disable_stats, answers no counts at all), so we list and pick.
    """
    resp = requests.get(
        f"{api_url}/api/queues/%2F",
        params={
            "disable_stats": "true",
            "enable_queue_totals": "true",
            "columns": "name,messages,messages_ready,messages_unacknowledged",
        },
        timeout=timeout,
    )
    resp.raise_for_status()
    for doc in resp.json():
        if doc.get("name") == queue:
            ready = int(doc.get("messages_ready", 0))
            unacked = int(doc.get("messages_unacknowledged", 0))
            return ready, unacked, int(doc.get("messages", ready + unacked))
    raise LookupError(f"RabbitMQ has no queue {queue!r} in vhost /")
