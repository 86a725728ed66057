"""Two jobs' real proxies on the bench, launched the operator's way (JobAws + proxyconf).

Each job gets its own security group and one proxy instance in the bench subnet, allowed only from
127.0.0.1/32 (what the operator's default, its own egress address /32, is on the bench); the bench
runs a tinyproxy for each from the instance's own UserData. Everything is swept at the end.
"""

from __future__ import annotations

import secrets
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from tilehopper.proxyconf import ProxySettings, ports_for_source, render_user_data
from tilehopper_bench import procs
from tilehopper_bench.stack import Bench
from tilehopper_operator import aws
from tests.ami.helpers import clients

ALLOWED = "127.0.0.1/32"
PORT = 8888

needs_tinyproxy = pytest.mark.skipif(shutil.which("tinyproxy") is None, reason="tinyproxy is not installed")


@dataclass
class JobProxy:
    job: aws.JobAws
    settings: ProxySettings
    group_id: str
    instance: dict[str, Any]
    user_data: str

    @property
    def ip(self) -> str:
        return str(self.instance["PrivateIpAddress"])

    @property
    def instance_id(self) -> str:
        return str(self.instance["InstanceId"])

    def get(self, url: str, *, auth: tuple[str, str] | None) -> requests.Response:
        session = requests.Session()
        session.trust_env = False  # only this proxy, whatever the environment says
        creds = f"{auth[0]}:{auth[1]}@" if auth else ""
        return session.get(url, proxies={"http": f"http://{creds}{self.ip}:{PORT}"}, timeout=10)

    @property
    def credentials(self) -> tuple[str, str]:
        return self.settings.username, self.settings.password


def start_job_proxy(bench: Bench, ec2: Any, ssm: Any, name: str) -> JobProxy:
    env = bench.env
    job = aws.JobAws(aws.JobIdentity(f"sec-{uuid.uuid4().hex[:12]}", "security", name), ec2=ec2, ssm=ssm,
                     waiter_delay=0.2)
    group_id = job.ensure_security_group(vpc_id=env["TILEHOPPER_BENCH_VPC_ID"], allowed_cidrs=[ALLOWED], port=PORT)
    http_ports, connect_ports = ports_for_source(env["TILE_URL"])
    # Random per-job credentials, as the operator makes them.
    settings = ProxySettings(username=f"th-{secrets.token_hex(6)}", password=secrets.token_urlsafe(24),
                             allowed_cidrs=(ALLOWED,), http_ports=http_ports, connect_ports=connect_ports,
                             max_lifetime_minutes=30)
    user_data = render_user_data(settings)
    launched = job.launch(slot="a", generation=1, instance_types=["t3.micro"], image_id=None,
                          subnet_id=env["TILEHOPPER_BENCH_SUBNET_ID"], user_data=user_data,
                          security_group_id=group_id, public_ip=False)
    return JobProxy(job, settings, group_id, launched.instance, user_data)


@pytest.fixture(scope="session")
def job_proxies(bench: Bench) -> Iterator[tuple[JobProxy, JobProxy]]:
    ec2, ssm = clients(bench)
    started: list[JobProxy] = []
    try:
        for name in ("job-a", "job-b"):
            started.append(start_job_proxy(bench, ec2, ssm, name))
        for proxy in started:
            procs.wait_for(lambda p=proxy: p.instance_id in bench.aws.proxies(), timeout=20, what="job proxy")
            procs.wait_for(lambda p=proxy: procs.port_open(p.ip, PORT), timeout=10, what="job proxy port")
        yield started[0], started[1]
    finally:
        for proxy in started:
            proxy.job.sweep()
