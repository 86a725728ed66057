"""The bench's AWS: moto with a loopback VPC, a boot delay, and a real tinyproxy per instance.

Each test tags its instances with its own name, so tests never see each other's instances.
"""

from __future__ import annotations

import base64
import ipaddress
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tilehopper.proxyconf import ProxySettings, render_user_data
from tilehopper_bench import procs
from tilehopper_bench.aws import BOOT_DELAY_TAG, AwsBench
from tilehopper_bench.tileserver import TileServer

pytestmark = [
    pytest.mark.bench,
    pytest.mark.skipif(shutil.which("tinyproxy") is None, reason="tinyproxy is not installed"),
]

IMAGE = "ami-12c6146b"  # any id: moto launches it without AMI validation
USER, PASSWORD = "bench-user", "bench-password-1"
TILE = "/vt?lyrs=s&x=1&y=2&z=3"


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsBench]:
    bench = AwsBench(tmp_path_factory.mktemp("aws"), boot_delay=1.0)
    bench.start()
    try:
        yield bench
    finally:
        bench.stop()


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TileServer]:
    server = TileServer(tmp_path_factory.mktemp("tiles"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def proxy_user_data(tile_port: int) -> str:
    return render_user_data(
        ProxySettings(
            USER, PASSWORD, allowed_cidrs=("127.0.0.0/8",), http_ports=(tile_port,),
            connect_ports=(tile_port,),
        )
    )


def launch(
    aws: AwsBench, *, user_data: str = "", boot_delay: float | None = None, **extra: Any
) -> dict[str, Any]:
    tags = [{"Key": "test", "Value": uuid.uuid4().hex}]
    if boot_delay is not None:
        tags.append({"Key": BOOT_DELAY_TAG, "Value": str(boot_delay)})
    answer = aws.ec2().run_instances(
        ImageId=IMAGE, MinCount=1, MaxCount=1, SubnetId=aws.info["subnet_id"],
        UserData=user_data, TagSpecifications=[{"ResourceType": "instance", "Tags": tags}], **extra,
    )
    return answer["Instances"][0]  # type: ignore[no-any-return]


def state(aws: AwsBench, instance_id: str) -> str:
    found = aws.ec2().describe_instances(InstanceIds=[instance_id])
    return found["Reservations"][0]["Instances"][0]["State"]["Name"]  # type: ignore[no-any-return]


def through_proxy(ip: str, port: int, url: str, *, auth: str | None = f"{USER}:{PASSWORD}") -> int:
    session = requests.Session()
    session.trust_env = False  # only our proxy, whatever the environment says
    creds = f"{auth}@" if auth else ""
    proxy = f"http://{creds}{ip}:{port}"
    return session.get(url, proxies={"http": proxy}, timeout=10).status_code


def wait_for_proxy(aws: AwsBench, instance: dict[str, Any]) -> int:
    instance_id, ip = instance["InstanceId"], instance["PrivateIpAddress"]
    procs.wait_for(lambda: instance_id in aws.proxies(), timeout=15, what=f"proxy of {instance_id}")
    port = int(aws.proxies()[instance_id]["port"])
    procs.wait_for(lambda: procs.port_open(ip, port), timeout=10, what=f"{ip}:{port}")
    return port


def test_network_is_on_loopback(aws: AwsBench) -> None:
    ec2 = aws.ec2()
    vpc = ec2.describe_vpcs(VpcIds=[aws.info["vpc_id"]])["Vpcs"][0]
    subnet = ec2.describe_subnets(SubnetIds=[aws.info["subnet_id"]])["Subnets"][0]
    cidr = aws.info["cidr"]  # 127.1.0.0/16 unless another bench holds it
    assert vpc["CidrBlock"] == subnet["CidrBlock"] == cidr
    assert ipaddress.ip_network(cidr).subnet_of(ipaddress.ip_network("127.0.0.0/8"))
    assert {"Key": "Name", "Value": "tilehopper-bench"} in vpc["Tags"]
    assert aws.env["TILEHOPPER_BENCH_SUBNET_ID"] == subnet["SubnetId"]
    assert aws.env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    ip = launch(aws, boot_delay=0)["PrivateIpAddress"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)


def test_new_instance_is_pending_until_its_boot_delay_passed(aws: AwsBench) -> None:
    slow = launch(aws, boot_delay=600)
    assert slow["State"]["Name"] == "pending"
    assert state(aws, slow["InstanceId"]) == "pending"
    quick = launch(aws, boot_delay=0)
    assert state(aws, quick["InstanceId"]) == "running"
    default = launch(aws)  # the daemon's 1 s
    procs.wait_for(lambda: state(aws, default["InstanceId"]) == "running", timeout=10, what="boot")
    aws.ec2().terminate_instances(InstanceIds=[slow["InstanceId"]])
    assert state(aws, slow["InstanceId"]) == "terminated"  # a transition ends the boot


def test_a_terminated_instance_address_is_never_reused(aws: AwsBench) -> None:
    # The tile server bans by source address: a new instance must not inherit an old one's.
    first = launch(aws, boot_delay=0)
    aws.ec2().terminate_instances(InstanceIds=[first["InstanceId"]])
    second = launch(aws, boot_delay=0)
    assert second["PrivateIpAddress"] != first["PrivateIpAddress"]
    aws.ec2().terminate_instances(InstanceIds=[second["InstanceId"]])


def test_boot_delay_can_change_while_running(aws: AwsBench) -> None:
    aws.set_boot_delay(600)
    try:
        instance = launch(aws)
        assert state(aws, instance["InstanceId"]) == "pending"
    finally:
        aws.set_boot_delay(1.0)
    aws.ec2().terminate_instances(InstanceIds=[instance["InstanceId"]])


def test_moto_keeps_what_the_operator_launches_with(aws: AwsBench) -> None:
    instance = launch(
        aws,
        boot_delay=0,
        InstanceInitiatedShutdownBehavior="terminate",
        MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 8, "Encrypted": True}}],
    )
    ec2, instance_id = aws.ec2(), instance["InstanceId"]
    behaviour = ec2.describe_instance_attribute(
        InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    described = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert described["MetadataOptions"]["HttpTokens"] == "required"
    volume_id = described["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    assert ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["Encrypted"] is True


def test_proxy_follows_the_instance(aws: AwsBench, tiles: TileServer) -> None:
    instance = launch(aws, user_data=proxy_user_data(tiles.port), boot_delay=2)
    instance_id, ip = instance["InstanceId"], instance["PrivateIpAddress"]
    assert state(aws, instance_id) == "pending"
    assert instance_id not in aws.proxies()
    assert not procs.port_open(ip, 8888)

    port = wait_for_proxy(aws, instance)
    assert state(aws, instance_id) == "running"
    assert port == 8888

    tiles.reset()
    assert through_proxy(ip, port, f"{tiles.url}{TILE}") == 200
    source = tiles.stats()["sources"]
    assert list(source) == [ip]  # the tile server sees the instance's address, not ours
    assert not source[ip]["headers_seen"]  # no Via / X-Forwarded-For gives the client away
    assert through_proxy(ip, port, f"{tiles.url}{TILE}", auth=None) == 407
    assert through_proxy(ip, port, f"{tiles.url}{TILE}", auth=f"{USER}:wrong-password") == 401
    # FilterDefaultDeny: plain HTTP only to the tile server's port.
    other = procs.free_port()
    assert through_proxy(ip, port, f"http://127.0.0.1:{other}/") == 403
    assert tiles.stats()["sources"][ip]["requests"] == 1

    aws.ec2().terminate_instances(InstanceIds=[instance_id])
    procs.wait_for(lambda: not procs.port_open(ip, port), timeout=10, what="proxy gone")
    assert instance_id not in aws.proxies()


def test_connect_reaches_an_allowed_port(aws: AwsBench, tiles: TileServer) -> None:
    instance = launch(aws, user_data=proxy_user_data(tiles.port), boot_delay=0)
    ip, port = instance["PrivateIpAddress"], wait_for_proxy(aws, instance)
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with socket.create_connection((ip, port), timeout=10) as sock:
        sock.sendall(
            f"CONNECT 127.0.0.1:{tiles.port} HTTP/1.1\r\nHost: 127.0.0.1:{tiles.port}\r\n"
            f"Proxy-Authorization: Basic {token}\r\n\r\n".encode()
        )
        assert sock.recv(4096).split(b"\r\n")[0].split()[1] == b"200"
        sock.sendall(f"GET {TILE} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    aws.ec2().terminate_instances(InstanceIds=[instance["InstanceId"]])


def test_stopped_instance_loses_its_proxy_and_gets_it_back(aws: AwsBench, tiles: TileServer) -> None:
    instance = launch(aws, user_data=proxy_user_data(tiles.port), boot_delay=0)
    instance_id, ip = instance["InstanceId"], instance["PrivateIpAddress"]
    port = wait_for_proxy(aws, instance)
    ec2 = aws.ec2()
    ec2.stop_instances(InstanceIds=[instance_id])
    procs.wait_for(lambda: not procs.port_open(ip, port), timeout=10, what="proxy stopped")
    ec2.start_instances(InstanceIds=[instance_id])
    assert wait_for_proxy(aws, instance) == port
    ec2.terminate_instances(InstanceIds=[instance_id])


def test_instance_without_proxy_user_data_gets_no_proxy(aws: AwsBench, tiles: TileServer) -> None:
    plain = launch(aws, user_data="#!/bin/bash\necho hello\n", boot_delay=0)
    marker = launch(aws, user_data=proxy_user_data(tiles.port), boot_delay=0)
    wait_for_proxy(aws, marker)  # the supervisor has looked at both by now
    assert plain["InstanceId"] not in aws.proxies()
    assert not procs.port_open(plain["PrivateIpAddress"], 8888)
    aws.ec2().terminate_instances(InstanceIds=[plain["InstanceId"], marker["InstanceId"]])


def test_stopping_the_daemon_stops_its_proxies(tmp_path: Path) -> None:
    bench = AwsBench(tmp_path, boot_delay=0)
    bench.start()
    try:
        instance = launch(bench, user_data=proxy_user_data(procs.free_port()))
        wait_for_proxy(bench, instance)
        pids = [bench._proc.pid, bench.proxies()[instance["InstanceId"]]["pid"]]  # type: ignore[union-attr]
    finally:
        bench.stop()
    assert [pid for pid in pids if psutil.pid_exists(pid)] == []
    assert not procs.port_open(instance["PrivateIpAddress"], 8888)
    assert not (tmp_path / "aws.json").exists()
