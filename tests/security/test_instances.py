"""Every instance tilehopper launches is hardened, and a job's security group opens one port to one CIDR."""

from __future__ import annotations

from typing import Any

import pytest

from tilehopper.contracts import TAG_ROLE, Role
from tilehopper_bench.stack import Bench
from tilehopper_operator import aws
from tests.ami.helpers import builder_guest, clients, group_ids
from tests.security.conftest import ALLOWED, PORT, JobProxy, needs_tinyproxy

pytestmark = [pytest.mark.bench, needs_tinyproxy]


def ingress(ec2: Any, group_id: str) -> list[dict[str, Any]]:
    return list(ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]["IpPermissions"])


def assert_one_rule(rules: list[dict[str, Any]]) -> None:
    (rule,) = rules
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", PORT, PORT)
    assert [r["CidrIp"] for r in rule["IpRanges"]] == [ALLOWED]
    assert not rule.get("Ipv6Ranges") and not rule.get("UserIdGroupPairs") and not rule.get("PrefixListIds")


def test_a_jobs_security_group_has_exactly_one_ingress_rule(
    bench: Bench, job_proxies: tuple[JobProxy, JobProxy]
) -> None:
    ec2, _ = clients(bench)
    a, b = job_proxies
    assert a.group_id != b.group_id
    for proxy in job_proxies:
        assert_one_rule(ingress(ec2, proxy.group_id))
        (instance,) = proxy.job.describe_job_instances()
        assert group_ids(instance) == [proxy.group_id]


def test_the_security_group_converges_back_when_someone_opens_it(
    bench: Bench, job_proxies: tuple[JobProxy, JobProxy]
) -> None:
    ec2, _ = clients(bench)
    a, _ = job_proxies
    ec2.authorize_security_group_ingress(GroupId=a.group_id, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": PORT, "ToPort": PORT, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
    ])
    assert len(ingress(ec2, a.group_id)) > 1 or len(ingress(ec2, a.group_id)[0]["IpRanges"]) > 1
    again = a.job.ensure_security_group(vpc_id=bench.env["TILEHOPPER_BENCH_VPC_ID"], allowed_cidrs=[ALLOWED], port=PORT)
    assert again == a.group_id
    assert_one_rule(ingress(ec2, a.group_id))


def assert_hardened(ec2: Any, instance: dict[str, Any], *, shutdown: str,
                    volumes: list[dict[str, Any]] | None = None) -> None:
    instance_id = instance["InstanceId"]
    assert "KeyName" not in instance, f"{instance_id} has a key pair"
    options = instance["MetadataOptions"]
    assert options["HttpTokens"] == "required" and options["HttpPutResponseHopLimit"] == 1, options
    if volumes is None:
        volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}])["Volumes"]
    assert volumes and all(v["Encrypted"] for v in volumes), volumes
    behaviour = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == shutdown


def test_every_proxy_instance_is_hardened(bench: Bench, job_proxies: tuple[JobProxy, JobProxy]) -> None:
    ec2, _ = clients(bench)
    for proxy in job_proxies:
        (instance,) = proxy.job.describe_job_instances()
        assert aws.tags_of(instance)[TAG_ROLE] == Role.PROXY
        assert_hardened(ec2, instance, shutdown="terminate")
        # The dead-man halt, which "terminate" turns into the instance's end after maxLifetime.
        assert f"shutdown -h +{proxy.settings.max_lifetime_minutes} " in proxy.user_data
        # No public address in private mode: the proxy port never faces the internet.
        assert not instance.get("PublicIpAddress")


def test_the_image_builder_is_hardened_too(bench: Bench, unique: str) -> None:
    from tilehopper_ami import images

    ec2, ssm = clients(bench)
    version = f"sec-{unique}"
    with builder_guest(bench, version) as seen:
        image = images.bake(ec2=ec2, ssm=ssm, version=version, subnet_id=bench.env["TILEHOPPER_BENCH_SUBNET_ID"],
                            poll_seconds=0.2, timeout_s=60.0, sleep=lambda _s: None)
    try:
        (builder,) = seen
        # Stop, not terminate: the builder's own poweroff is bake's "installed" signal.
        assert_hardened(ec2, builder, shutdown="stop", volumes=builder["VolumesWhileRunning"])
        (group_id,) = group_ids(builder)
        assert builder["IngressWhileRunning"] == []  # nobody connects to a builder, not even SSH
        assert aws.tags_of(ec2.describe_instances(InstanceIds=[builder["InstanceId"]])["Reservations"][0]
                           ["Instances"][0])[TAG_ROLE] == Role.BUILDER
    finally:
        images.delete_image(ec2, image.image_id)
    # Its temporary group is gone with it.
    assert aws.leftovers(ec2, images.image_uid(version))["security_groups"] == 0
    assert group_id not in {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
