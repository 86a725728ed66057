"""The bench's AWS: moto in server mode on 127.0.0.1, a VPC on loopback, a real proxy per instance.

`python -m tilehopper_bench.aws --workdir D --port P --boot-delay S` is the daemon: it serves
moto, creates the VPC 127.1.0.0/16 (so every instance's private IP is a loopback address), writes
D/aws.json and runs the proxy supervisor until SIGTERM. `AwsBench` starts and stops that daemon.

Two daemons on one machine (a developer's `make bench-up` and `make test`) would hand out the same
addresses, and their proxies would fight over 127.1.0.4:8888. So each daemon holds a lock on its
/16 for its lifetime; the next one takes 127.2.0.0/16, and so on. aws.json says which one.

Tests isolate by tags (each test tags its own instances); there is no reset, because a reset
would change the VPC and subnet ids that .bench/env already handed out.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import requests
from botocore.config import Config

from tilehopper_bench import procs
from tilehopper_bench.proxies import ProxySupervisor, relax_time_wait, stop_leftovers

HOST = "127.0.0.1"
REGION = "eu-central-1"
VPC_CIDR = "127.1.0.0/16"  # the first choice; the subnet is the whole VPC
NAME_TAG = {"Key": "Name", "Value": "tilehopper-bench"}
# An instance tagged with this (seconds) boots that long instead of the daemon's delay.
BOOT_DELAY_TAG = "tilehopper-bench/boot-delay"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
CONTROL_PREFIX = "/_bench/"

log = logging.getLogger("tilehopper_bench.aws")


def ec2_client(endpoint: str, *, region: str = REGION) -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"max_attempts": 2, "mode": "standard"}),
    )


# --- boot delay: moto's instances run at once; real ones take a while --------------------------


class BootDelay:
    """The delay new instances get; changed at run time through PUT /_bench/boot-delay."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def for_instance(self, instance: Any) -> float:
        for tag in instance.get_tags():
            if tag["key"] == BOOT_DELAY_TAG:
                try:
                    return float(tag["value"])
                except ValueError:
                    break
        return self.seconds


def install_boot_delay(delay: BootDelay) -> None:
    """Patch moto 5.2.5 so an instance reports pending until its boot delay has passed.

    moto creates every Instance with InstanceState("running", 16). We swap that state object,
    right after run_instances (once tags are on) and after starting a stopped instance, for one
    whose name/code read "pending"/0 until ready_at. Everything in moto reads the state through
    _state.name/_state.code (describe, filters, status checks), and every transition
    (stop/terminate/start/reboot) assigns them, which ends the boot.
    """
    from moto.ec2.models import instances as moto_instances

    class BootingState(moto_instances.InstanceState):
        def __init__(self, ready_at: float) -> None:  # noqa: D107 - no super(): it sets name
            self._name, self._code, self.ready_at = "running", 16, ready_at

        def _booting(self) -> bool:
            return self._name == "running" and time.time() < self.ready_at

        @property  # type: ignore[override]
        def name(self) -> str:
            return "pending" if self._booting() else self._name

        @name.setter
        def name(self, value: str) -> None:
            self._name, self.ready_at = value, 0.0

        @property  # type: ignore[override]
        def code(self) -> int:
            return 0 if self._booting() else self._code

        @code.setter
        def code(self, value: int) -> None:
            self._code, self.ready_at = value, 0.0

    def boot(instance: Any) -> None:
        seconds = delay.for_instance(instance)
        if seconds > 0:
            instance._state = BootingState(time.time() + seconds)
        else:  # a tag of 0 overrides the delay it was born with
            instance._state = moto_instances.InstanceState("running", 16)

    original_run = moto_instances.InstanceBackend.run_instances
    original_start = moto_instances.Instance.start
    original_init = moto_instances.Instance.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        # Booting from birth: moto makes the instance visible to describe (the proxy supervisor
        # polls from another thread) before run_instances returns, so setting the state only
        # afterwards let it be seen "running" for a moment.
        original_init(self, *args, **kwargs)
        if delay.seconds > 0:
            self._state = BootingState(time.time() + delay.seconds)

    def run_instances(self: Any, *args: Any, **kwargs: Any) -> Any:
        reservation = original_run(self, *args, **kwargs)
        for instance in reservation.instances:
            boot(instance)
        return reservation

    def start(self: Any) -> Any:
        previous = original_start(self)
        if previous.name == "stopped":  # starting a running instance changes nothing
            boot(self)
        return previous

    moto_instances.Instance.__init__ = init  # type: ignore[method-assign]
    moto_instances.InstanceBackend.run_instances = run_instances  # type: ignore[method-assign]
    moto_instances.Instance.start = start  # type: ignore[method-assign]


# --- the daemon ---------------------------------------------------------------------------


def claim_network(wanted: str | None) -> tuple[str, Any]:
    """(cidr, lock file) of a loopback /16 no other bench daemon on this machine uses.

    The lock is an flock: it goes away with the process, however the process ends.
    """
    if wanted:
        candidates = [wanted]
    else:
        candidates = [f"127.{n}.0.0/16" for n in range(1, 255)]
    for cidr in candidates:
        net = ipaddress.ip_network(cidr)
        if not net.subnet_of(ipaddress.ip_network("127.0.0.0/8")):
            raise ValueError(f"{cidr} is not inside 127.0.0.0/8")
        path = Path(tempfile.gettempdir()) / f"tilehopper-bench-{net.network_address}.lock"
        lock = open(path, "a")  # noqa: SIM115 - held open for the daemon's lifetime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        return cidr, lock
    raise RuntimeError(f"every network of {candidates[0]}..{candidates[-1]} is in use by a bench")


def ensure_network(ec2: Any, cidr: str = VPC_CIDR) -> tuple[str, str]:
    """(vpc_id, subnet_id) of the bench VPC, created when it is not there yet."""
    name_filter = [{"Name": f"tag:{NAME_TAG['Key']}", "Values": [NAME_TAG["Value"]]}]
    vpcs = ec2.describe_vpcs(Filters=name_filter + [{"Name": "cidr", "Values": [cidr]}])["Vpcs"]
    if vpcs:
        vpc_id = vpcs[0]["VpcId"]
    else:
        vpc_id = ec2.create_vpc(
            CidrBlock=cidr,
            TagSpecifications=[{"ResourceType": "vpc", "Tags": [NAME_TAG]}],
        )["Vpc"]["VpcId"]
    subnets = ec2.describe_subnets(
        Filters=name_filter + [{"Name": "vpc-id", "Values": [vpc_id]}]
    )["Subnets"]
    if subnets:
        return vpc_id, subnets[0]["SubnetId"]
    subnet_id = ec2.create_subnet(
        VpcId=vpc_id,
        CidrBlock=cidr,
        TagSpecifications=[{"ResourceType": "subnet", "Tags": [NAME_TAG]}],
    )["Subnet"]["SubnetId"]
    return vpc_id, subnet_id


def control_app(app: Any, *, delay: BootDelay, supervisor: ProxySupervisor) -> Any:
    """WSGI wrapper: /_bench/boot-delay (GET, PUT {"boot_delay": s}) and /_bench/proxies (GET)."""

    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(CONTROL_PREFIX):
            return app(environ, start_response)
        method = environ["REQUEST_METHOD"]
        status, doc = "404 Not Found", {"error": f"no {method} {path}"}
        if path == f"{CONTROL_PREFIX}boot-delay" and method in ("PUT", "POST"):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            delay.seconds = float(json.loads(environ["wsgi.input"].read(length))["boot_delay"])
            log.info("boot delay is now %.2fs", delay.seconds)
        if path == f"{CONTROL_PREFIX}boot-delay":
            status, doc = "200 OK", {"boot_delay": delay.seconds}
        elif path == f"{CONTROL_PREFIX}proxies" and method == "GET":
            status, doc = "200 OK", supervisor.snapshot()
        body = json.dumps(doc).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return wrapped


def install_fresh_addresses() -> None:
    """Patch moto 5.2.5 so a terminated instance's private IP is never handed out again.

    The tile server bans by source address, and on the bench an instance's private IP is its
    source address: a reused IP would inherit the ban counters of an earlier instance. Real EC2
    gives each new instance a fresh public address; never reusing the loopback one models that.
    """
    from moto.ec2.models.subnets import Subnet

    def del_subnet_ip(self: Subnet, ip: str) -> None:
        self._subnet_ips.pop(ip, None)  # and, unlike moto, not back into _unused_ips

    Subnet.del_subnet_ip = del_subnet_ip  # type: ignore[method-assign]


def serve(*, workdir: Path, port: int, boot_delay: float, network: str | None) -> None:
    # Imported here: moto is a dev dependency and slow to import; AwsBench users never need it.
    from moto.moto_server import threaded_moto_server as tms
    from werkzeug.serving import make_server

    cidr, _lock = claim_network(network)
    delay = BootDelay(boot_delay)
    install_boot_delay(delay)
    install_fresh_addresses()
    endpoint = f"http://{HOST}:{port}"
    ec2 = ec2_client(endpoint)
    proxies_dir = workdir / "proxies"
    left = stop_leftovers(proxies_dir)
    if left:
        log.warning("stopped proxies a previous daemon left: %s", left)
    supervisor = ProxySupervisor(ec2, proxies_dir)

    class Server(tms.ThreadedMotoServer):
        # ThreadedMotoServer._server_entry, with our control paths in front of moto's app.
        def _server_entry(self) -> None:
            app = control_app(
                tms.DomainDispatcherApplication(tms.create_backend_app),
                delay=delay,
                supervisor=supervisor,
            )
            self._server = make_server(
                self._ip_address, self._port, app, True, request_handler=tms.MotoRequestHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = Server(ip_address=HOST, port=port, verbose=False)
    server.start()
    try:
        vpc_id, subnet_id = ensure_network(ec2, cidr)
        info = {
            "endpoint": endpoint,
            "region": REGION,
            "vpc_id": vpc_id,
            "subnet_id": subnet_id,
            "cidr": cidr,
            "tcp_tw_reuse": relax_time_wait(),
        }
        tmp = workdir / "aws.json.tmp"
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(workdir / "aws.json")
        log.info("moto on %s, vpc %s, subnet %s, boot delay %.1fs", endpoint, vpc_id, subnet_id, boot_delay)
        supervisor.run(stop)
    finally:
        supervisor.stop_all()
        (workdir / "aws.json").unlink(missing_ok=True)
        server.stop()
        log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="moto + per-instance tinyproxy for the bench")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--boot-delay", type=float, default=2.0)
    parser.add_argument("--network", help="a /16 in 127.0.0.0/8; default: the first free from 127.1.0.0/16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # moto's werkzeug would log every request; the supervisor alone polls five times a second.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    args.workdir.mkdir(parents=True, exist_ok=True)
    serve(workdir=args.workdir, port=args.port, boot_delay=args.boot_delay, network=args.network)
    # Everything is stopped and written; tearing down an interpreter with moto loaded takes ~2 s
    # more (measured), which every bench-down and test would wait for.
    logging.shutdown()
    os._exit(0)


# --- what the rest of the bench uses ------------------------------------------------------


class AwsBench:
    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        boot_delay: float = 2.0,
        network: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.port = port
        self.boot_delay = boot_delay
        self.network = network  # None: 127.1.0.0/16, or the next one free (see the module doc)
        self.info: dict[str, str] = {}
        self._proc: procs.Proc | None = None

    @property
    def info_file(self) -> Path:
        return self.workdir / "aws.json"

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            **CREDENTIALS,
            "AWS_DEFAULT_REGION": REGION,
            "TILEHOPPER_BENCH_VPC_ID": self.info.get("vpc_id", ""),
            "TILEHOPPER_BENCH_SUBNET_ID": self.info.get("subnet_id", ""),
        }

    def start(self, *, timeout: float = 30.0) -> None:
        if self.port is None:
            self.port = procs.free_port()
        self.info_file.unlink(missing_ok=True)
        self._proc = procs.start(
            "aws",
            [
                sys.executable, "-m", "tilehopper_bench.aws",
                "--workdir", str(self.workdir),
                "--port", str(self.port),
                "--boot-delay", str(self.boot_delay),
                *(["--network", self.network] if self.network else []),
            ],
            log_dir=self.workdir / "logs",
            pid_dir=self.workdir / "pids",
        )
        try:
            procs.wait_for(self.info_file.exists, timeout=timeout, what="moto", proc=self._proc)
        except BaseException:
            self.stop()
            raise
        self.info = json.loads(self.info_file.read_text())

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop(timeout=15)
            self._proc = None
        # Only if the daemon died without cleaning up: its proxies must not outlive it.
        stop_leftovers(self.workdir / "proxies")

    def ec2(self) -> Any:
        return ec2_client(self.endpoint)

    def set_boot_delay(self, seconds: float) -> None:
        resp = requests.put(f"{self.endpoint}{CONTROL_PREFIX}boot-delay", json={"boot_delay": seconds}, timeout=5)
        resp.raise_for_status()
        self.boot_delay = seconds

    def proxies(self) -> dict[str, dict[str, Any]]:
        """The proxies the daemon runs now: instance id -> {private_ip, port, pid}."""
        resp = requests.get(f"{self.endpoint}{CONTROL_PREFIX}proxies", timeout=5)
        resp.raise_for_status()
        return resp.json()  # type: ignore[no-any-return]


if __name__ == "__main__":
    main()
