"""One real tinyproxy per running moto instance, configured from that instance's own UserData.

The product puts its proxy config into the instance's user-data (tilehopper.proxyconf); the bench
reads it back from EC2, so the proxy the consumers talk to is exactly the one the product asked
for. The bench adds one thing: a `Bind <private ip>` line, so the tile server sees each
instance's own address as the source, the way a real server sees each instance's public IP.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilehopper.proxyconf import parse_user_data
from tilehopper_bench import procs

log = logging.getLogger("tilehopper_bench.proxies")

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
CONF_NAME = "tinyproxy.conf"
FILTER_NAME = "filter"
PID_NAME = "tinyproxy.pid"
# A proxy that died (bad config, port taken) is tried again only after this long.
RETRY_AFTER = 5.0


@dataclass
class RunningProxy:
    instance_id: str
    private_ip: str
    port: int
    proc: procs.Proc

    def describe(self) -> dict[str, Any]:
        return {"private_ip": self.private_ip, "port": self.port, "pid": self.proc.pid}


def proxy_config(user_data: str, *, private_ip: str, filter_path: Path) -> tuple[str, str, int] | None:
    """(config, filter, port) for one instance, or None when its user-data is no tilehopper proxy."""
    try:
        parsed = parse_user_data(user_data, private_ip, str(filter_path))
    except ValueError:
        return None
    config = parsed.config
    if not re.search(r"^Bind\s", config, re.M):
        config += f"Bind {private_ip}\n"
    return config, parsed.filter, parsed.port


class ProxySupervisor:
    """Keeps the set of tinyproxies equal to the set of running proxy instances."""

    def __init__(self, ec2: Any, proxies_dir: Path) -> None:
        self.ec2 = ec2
        self.dir = proxies_dir
        self.binary = shutil.which("tinyproxy") or "tinyproxy"
        self._running: dict[str, RunningProxy] = {}
        # instance id -> its user-data ("" when it has none); user-data never changes while an
        # instance runs, so each instance costs one describe_instance_attribute.
        self._user_data: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}
        self._lock = threading.Lock()

    # --- one pass -------------------------------------------------------------------------

    def tick(self) -> None:
        instances = self._instances()
        with self._lock:
            for instance_id, proxy in list(self._running.items()):
                state = instances.get(instance_id, {}).get("State", {}).get("Name")
                if state != "running":
                    log.info("instance %s is %s: stopping its proxy", instance_id, state or "gone")
                    self._stop(instance_id)
                elif not proxy.proc.alive():
                    log.warning("proxy of %s exited:\n%s", instance_id, proxy.proc.tail(10))
                    self._stop(instance_id)
                    self._retry_at[instance_id] = time.monotonic() + RETRY_AFTER
            for instance_id, instance in instances.items():
                if instance["State"]["Name"] == "running" and instance_id not in self._running:
                    if time.monotonic() >= self._retry_at.get(instance_id, 0.0):
                        self._maybe_start(instance)

    def run(self, stop: threading.Event, *, interval: float = 0.2) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - one bad pass must not end the bench
                log.exception("proxy supervisor pass failed")
            stop.wait(interval)

    def stop_all(self) -> None:
        with self._lock:
            for instance_id in list(self._running):
                self._stop(instance_id)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {iid: p.describe() for iid, p in self._running.items()}

    # --- the parts ------------------------------------------------------------------------

    def _instances(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for page in self.ec2.get_paginator("describe_instances").paginate():
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    found[instance["InstanceId"]] = instance
        return found

    def _user_data_of(self, instance_id: str) -> str:
        if instance_id not in self._user_data:
            attr = self.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
            value = attr.get("UserData", {}).get("Value", "")
            self._user_data[instance_id] = base64.b64decode(value).decode(errors="replace") if value else ""
        return self._user_data[instance_id]

    def _maybe_start(self, instance: dict[str, Any]) -> None:
        instance_id = instance["InstanceId"]
        private_ip = instance.get("PrivateIpAddress", "")
        workdir = self.dir / instance_id
        made = proxy_config(
            self._user_data_of(instance_id), private_ip=private_ip, filter_path=workdir / FILTER_NAME
        )
        if made is None:  # not a proxy instance: look at it no more
            self._retry_at[instance_id] = float("inf")
            return
        if not private_ip or ipaddress.ip_address(private_ip) not in LOOPBACK:
            # Only loopback addresses exist on this machine; never listen anywhere else.
            log.warning("instance %s has address %r outside 127.0.0.0/8: no proxy", instance_id, private_ip)
            self._retry_at[instance_id] = float("inf")
            return
        config, url_filter, port = made
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / FILTER_NAME).write_text(url_filter)
        (workdir / CONF_NAME).write_text(config)
        (workdir / CONF_NAME).chmod(0o600)  # it holds the proxy password
        proc = procs.start(
            "tinyproxy",
            [self.binary, "-d", "-c", str(workdir / CONF_NAME)],
            log_dir=workdir,
            pid_dir=workdir,
        )
        self._running[instance_id] = RunningProxy(instance_id, private_ip, port, proc)
        log.info("instance %s runs: proxy on %s:%d (pid %d)", instance_id, private_ip, port, proc.pid)

    def _stop(self, instance_id: str) -> None:
        proxy = self._running.pop(instance_id)
        proxy.proc.stop(timeout=5)
        (self.dir / instance_id / PID_NAME).unlink(missing_ok=True)


def stop_leftovers(proxies_dir: Path) -> list[int]:
    """Stop tinyproxies a killed daemon left behind; only PIDs whose command line names our config."""
    stopped = []
    for pid_file in proxies_dir.glob(f"*/{PID_NAME}"):
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
            continue
        if str(pid_file.parent / CONF_NAME).encode() in cmdline:
            procs.stop_pid(pid, timeout=5)
            stopped.append(pid)
        pid_file.unlink(missing_ok=True)
    return stopped


def relax_time_wait() -> str:
    """Let loopback connections reuse TIME_WAIT ports (with Bind, TIME_WAIT sockets exhaust them within seconds).

    Linux's default 2 already means "reuse for loopback", which is all bench traffic; only a 0
    is raised to 1. Returns the value in force, or why it could not be read or changed.
    """
    path = Path("/proc/sys/net/ipv4/tcp_tw_reuse")
    try:
        value = path.read_text().strip()
        if value == "0":
            path.write_text("1\n")
            value = path.read_text().strip()
        return value
    except OSError as exc:
        return f"unchanged ({exc.strerror})"
