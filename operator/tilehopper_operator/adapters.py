"""Binds the pool's driver to the world: AWS (aws.py) and the proxy health check (health.py).

Every call here blocks (boto3, requests), so each runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import os
from typing import Any

import requests

from tilehopper import proxyconf
from tilehopper.amqp import job_queue_names
from tilehopper.contracts import Tile
from tilehopper_operator import aws
from tilehopper_operator.aws import PermanentAwsError
from tilehopper_operator.config import OperatorConfig
from tilehopper_operator.health import check_proxy
from tilehopper_operator.runtime import PermanentLaunchError, ProxyPort
from tilehopper_operator.spec import JobSpec
from tilehopper_operator.workloads import JobRef

log = logging.getLogger(__name__)

__all__ = ["Ec2Proxies", "PermanentAwsError", "sweep_job", "sweep_uid", "owned_jobs", "extra_queues"]

# Only reached in public mode with no allowedCidrs and no TILEHOPPER_EGRESS_CIDR: the address the
# operator's traffic leaves from, so the proxy port opens to exactly that /32.
EGRESS_ECHO_URL = "https://checkip.amazonaws.com"


def clients(region: str) -> tuple[Any, Any]:
    # AWS_ENDPOINT_URL (the bench's moto) and the credentials come from boto3's own chain.
    # TILEHOPPER_AWS_CALL_LOG records every call's IAM action name (the IAM policy test uses it).
    return _clients(region, os.environ.get("AWS_ENDPOINT_URL") or None, os.environ.get("TILEHOPPER_AWS_CALL_LOG") or None)


@functools.lru_cache(maxsize=None)
def _clients(region: str, endpoint_url: str | None, log_path: str | None) -> tuple[Any, Any]:
    # One pair of clients per region for every job: each boto3 Session loads its own service
    # models (~27 MB measured), and clients, unlike Sessions, are safe to share between threads.
    recorder = aws.ApiCallRecorder(log_path) if log_path else None
    return aws.make_clients(region=region, endpoint_url=endpoint_url, recorder=recorder)


def _network(ec2: Any, subnet_id: str) -> tuple[str, str, str]:
    """(vpc id, its CIDR, subnet id); without a subnet, the region's default VPC."""
    vpc_id, subnet_id = aws.network_of(ec2, subnet_id or None)
    vpc = ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]
    return vpc_id, vpc["CidrBlock"], subnet_id


def _allowed_cidrs(spec: JobSpec, config: OperatorConfig, vpc_cidr: str) -> tuple[str, ...]:
    if spec.proxy.allowed_cidrs:
        return spec.proxy.allowed_cidrs
    if spec.proxy.address_mode == "private":
        return (vpc_cidr,)
    if config.egress_cidr:
        return (config.egress_cidr,)
    address = requests.get(EGRESS_ECHO_URL, timeout=10).text.strip()
    return (f"{ipaddress.ip_address(address)}/32",)


class Ec2Proxies(ProxyPort):
    """One job's proxies on EC2."""

    def __init__(self, job_aws: aws.JobAws, spec: JobSpec, *, user_data: str, subnet_id: str, sg_id: str,
                 credentials: tuple[str, str], probe_url: str) -> None:
        self.job_aws = job_aws
        self.spec = spec
        self.user_data = user_data
        self.subnet_id = subnet_id
        self.sg_id = sg_id
        self.credentials = credentials
        self.probe_url = probe_url
        self.mode = spec.proxy.address_mode

    @classmethod
    async def create(cls, job: JobRef, spec: JobSpec, config: OperatorConfig, credentials: tuple[str, str],
                     probe_tile: Tile) -> Ec2Proxies:
        def build() -> Ec2Proxies:
            ec2, ssm = clients(spec.proxy.region)
            job_aws = aws.JobAws(aws.JobIdentity(job.uid, job.namespace, job.name), ec2=ec2, ssm=ssm,
                                 waiter_delay=1.0)
            vpc_id, vpc_cidr, subnet_id = _network(ec2, spec.proxy.subnet_id)
            allowed = _allowed_cidrs(spec, config, vpc_cidr)
            sg_id = job_aws.ensure_security_group(vpc_id=vpc_id, allowed_cidrs=allowed, port=spec.proxy.port)
            http_ports, connect_ports = proxyconf.ports_for_source(spec.url_template)
            settings = proxyconf.ProxySettings(
                username=credentials[0], password=credentials[1], allowed_cidrs=allowed,
                http_ports=http_ports, connect_ports=connect_ports, port=spec.proxy.port,
                max_lifetime_minutes=max(1, math.ceil(spec.proxy.max_lifetime_s / 60)),
            )
            probe_url = spec.url_template.format(x=probe_tile.x, y=probe_tile.y, z=probe_tile.zoom)
            return cls(job_aws, spec, user_data=proxyconf.render_user_data(settings), subnet_id=subnet_id,
                       sg_id=sg_id, credentials=credentials, probe_url=probe_url)

        return await asyncio.to_thread(build)

    async def launch(self, slot: str, generation: int) -> tuple[str, str]:
        def run() -> tuple[str, str]:
            try:
                launched = self.job_aws.launch(
                    slot=slot, generation=generation, instance_types=self.spec.proxy.instance_types,
                    image_id=self.spec.proxy.image_id or None, subnet_id=self.subnet_id,
                    user_data=self.user_data, security_group_id=self.sg_id, public_ip=self.mode == "public",
                )
            except PermanentAwsError as exc:
                raise PermanentLaunchError(str(exc)) from None
            return launched.instance_id, launched.address(self.mode) or ""

        return await asyncio.to_thread(run)

    async def terminate(self, instance_id: str) -> None:
        await asyncio.to_thread(self.job_aws.terminate, [instance_id])

    async def states(self) -> dict[str, str]:
        def run() -> dict[str, str]:
            instances = self.job_aws.describe_job_instances(
                states=("pending", "running", "shutting-down", "terminated", "stopping", "stopped")
            )
            return {i["InstanceId"]: i["State"]["Name"] for i in instances}

        return await asyncio.to_thread(run)

    async def check(self, instance_id: str, address: str) -> tuple[bool, str, str]:
        def run() -> tuple[bool, str, str]:
            found = address
            if not found:
                instances = self.job_aws.describe_job_instances(
                    extra_filters=[{"Name": "instance-id", "Values": [instance_id]}]
                )
                found = (aws.instance_address(instances[0], self.mode) or "") if instances else ""
            if not found:
                return False, "no address yet", ""
            ok, detail = check_proxy(
                proxy_url=f"http://{found}:{self.spec.proxy.port}", username=self.credentials[0],
                password=self.credentials[1], probe_url=self.probe_url, timeout=5.0,
            )
            return ok, detail, found

        return await asyncio.to_thread(run)

    async def sweep(self) -> str:
        report = await asyncio.to_thread(self.job_aws.sweep)
        return report.summary()


def _sweep(uid: str, region: str) -> dict[str, Any]:
    ec2, _ = clients(region)
    report = aws.sweep(ec2, uid)
    remaining = {kind: n for kind, n in aws.leftovers(ec2, uid).items() if n}
    return {"removed": report.summary(), "errors": report.errors, "remaining": remaining}


async def sweep_job(job: JobRef, spec: JobSpec, config: OperatorConfig) -> dict[str, Any]:
    return await asyncio.to_thread(_sweep, job.uid, spec.proxy.region)


async def sweep_uid(uid: str, region: str, config: OperatorConfig) -> dict[str, Any]:
    return await asyncio.to_thread(_sweep, uid, region)


async def owned_jobs(config: OperatorConfig) -> dict[str, str]:
    """uid -> "<namespace>/<name>" of every job with resources left in the default region."""
    def run() -> dict[str, str]:
        ec2, _ = clients(config.default_region)
        return aws.list_owned_jobs(ec2)

    return await asyncio.to_thread(run)


def extra_queues(queue: str) -> list[str]:
    return [q for q in job_queue_names(queue) if q != queue]
