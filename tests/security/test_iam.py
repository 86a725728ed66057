"""deploy/iam-policy.json allows exactly what the code calls in EC2/SSM: nothing missing, nothing extra.

Two views: every call recorded (ApiCallRecorder on the clients) while a job's whole AWS lifecycle
and an image's bake and delete run on the bench; and every call the source can make at all.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore import xform_name

from tests.ami.helpers import builder_guest, clients
from tests.deploy.test_iam_policy import load_policy_actions, uncovered
from tests.security.conftest import ALLOWED, PORT, needs_tinyproxy
from tilehopper.proxyconf import ProxySettings, render_user_data
from tilehopper_ami import images
from tilehopper_bench.stack import Bench
from tilehopper_operator import aws

REPO = Path(__file__).resolve().parents[2]
# Where the product calls AWS: the operator's AWS module and its callers, and the image baker.
SOURCES = [*sorted((REPO / "operator" / "tilehopper_operator").glob("*.py")),
           *sorted((REPO / "ami" / "tilehopper_ami").glob("*.py"))]

# Policy actions no recorded call names, each with the reason it is still needed.
NEEDED_WITHOUT_A_RECORDED_CALL = {
    # TagSpecifications on RunInstances, CreateSecurityGroup and CreateImage are authorised as
    # ec2:CreateTags (conditioned on ec2:CreateAction); the request itself is the other action.
    "ec2:CreateTags",
}


def plant_tagged_leftovers(ec2: Any, job: aws.JobAws, instance_id: str) -> None:
    """Things the product never makes but its sweep removes when they carry a job's tags (made by
    hand, or by an older version): a key pair, an Elastic IP on the instance, a loose volume."""
    tags = [{"Key": k, "Value": v} for k, v in job.tags("leftover").items()]
    ec2.create_key_pair(KeyName=f"{job.job.uid}-key", TagSpecifications=[{"ResourceType": "key-pair", "Tags": tags}])
    address = ec2.allocate_address(Domain="vpc", TagSpecifications=[{"ResourceType": "elastic-ip", "Tags": tags}])
    ec2.associate_address(AllocationId=address["AllocationId"], InstanceId=instance_id)
    zone = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["Placement"]
    ec2.create_volume(AvailabilityZone=zone["AvailabilityZone"], Size=1, Encrypted=True,
                      TagSpecifications=[{"ResourceType": "volume", "Tags": tags}])


def record_everything(bench: Bench, unique: str) -> set[str]:
    """Drive what the operator and ami/ do in AWS, on recorded clients; return the IAM actions."""
    from tilehopper_operator.adapters import _network  # the operator's own subnet/VPC lookup

    env = bench.env
    recorder = aws.ApiCallRecorder()
    ec2, ssm = clients(bench, recorder)
    plain_ec2, _ = clients(bench)  # for what a person would do by hand: not recorded
    vpc_id, _cidr, subnet_id = _network(ec2, env["TILEHOPPER_BENCH_SUBNET_ID"])
    _network(ec2, "")  # no subnet given: the default VPC

    job = aws.JobAws(aws.JobIdentity(f"iam-{unique}", "security", "iam"), ec2=ec2, ssm=ssm, waiter_delay=0.2)
    group = job.ensure_security_group(vpc_id=vpc_id, allowed_cidrs=[ALLOWED], port=PORT)
    plain_ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    job.ensure_security_group(vpc_id=vpc_id, allowed_cidrs=[ALLOWED], port=PORT)  # converges: revokes
    settings = ProxySettings(username=f"iam-{unique}", password=f"iam-{unique}-password", allowed_cidrs=(ALLOWED,))
    launch: dict[str, Any] = dict(slot="a", generation=1, instance_types=["t3.micro"], image_id=None,
                                  subnet_id=subnet_id, user_data=render_user_data(settings),
                                  security_group_id=group, public_ip=False)
    launched = job.launch(**launch)
    assert job.launch(**launch).reused  # a repeated launch finds the slot's instance
    job.describe_job_instances()
    job.wait_terminated(job.terminate([launched.instance_id]))
    second = job.launch(**{**launch, "slot": "b", "generation": 2})
    plant_tagged_leftovers(plain_ec2, job, second.instance_id)
    report = job.sweep()
    assert report.clean and not any(job.leftovers().values())
    assert {"key_pairs", "addresses", "volumes"} <= set(report.removed)
    aws.list_owned_jobs(ec2)  # the orphan sweep's listing

    version = f"iam-{unique}"
    with builder_guest(bench, version):
        image = images.bake(ec2=ec2, ssm=ssm, version=version, subnet_id=subnet_id, poll_seconds=0.2,
                            timeout_s=60.0, sleep=lambda _s: None)
        images.bake(ec2=ec2, ssm=ssm, version=version, subnet_id=subnet_id, poll_seconds=0.2, timeout_s=60.0)
    images.list_images(ec2)
    images.delete_image(ec2, image.image_id)
    with builder_guest(bench, version):
        images.bake(ec2=ec2, ssm=ssm, version=version, subnet_id=subnet_id, poll_seconds=0.2,
                    timeout_s=60.0, sleep=lambda _s: None)
    assert images.delete_version(ec2, version, poll_seconds=0.2).clean
    return recorder.actions


@pytest.mark.bench
@needs_tinyproxy
def test_recorded_calls_are_exactly_what_the_policy_allows(bench: Bench, unique: str) -> None:
    recorded = record_everything(bench, unique)
    assert {"ec2:RunInstances", "ec2:CreateImage", "ec2:TerminateInstances", "ssm:GetParameter"} <= recorded
    assert uncovered(recorded) == set(), "calls the policy does not allow"
    assert load_policy_actions() - recorded - NEEDED_WITHOUT_A_RECORDED_CALL == set(), "allowed, never called"


def callable_actions() -> dict[str, set[str]]:
    """IAM action -> source files, for every EC2/SSM operation the product's source can call:
    client methods, paginated operations by name, and the operations behind waiters."""
    session = boto3.session.Session(region_name="eu-central-1")
    models = {service: session.client(service, aws_access_key_id="x", aws_secret_access_key="x")
              for service in ("ec2", "ssm")}
    by_method = {
        (service, xform_name(op)): f"{service}:{op}"
        for service, client in models.items() for op in client.meta.service_model.operation_names
    }
    found: dict[str, set[str]] = {}
    for path in SOURCES:
        text = path.read_text()
        names = [("ec2", m) for m in re.findall(r"\bec2\.([a-z_]+)\b", text)]
        names += [("ssm", m) for m in re.findall(r"\bssm\.([a-z_]+)\b", text)]
        names += [("ec2", m) for m in re.findall(r'_pages\(\s*[\w.]+,\s*"([a-z_]+)"', text)]
        for waiter in re.findall(r'ec2\.get_waiter\(\s*"([a-z_]+)"', text):
            names.append(("ec2", xform_name(models["ec2"].get_waiter(waiter).config.operation)))
        for key in names:
            if key in by_method:
                found.setdefault(by_method[key], set()).add(path.relative_to(REPO).as_posix())
    return found


def test_every_call_the_source_can_make_is_allowed() -> None:
    found = callable_actions()
    assert "ec2:RunInstances" in found and "ec2:CreateImage" in found and "ssm:GetParameter" in found
    missing = {action: sorted(files) for action, files in found.items() if uncovered({action})}
    assert missing == {}, "the code can call these, the policy denies them"


def test_the_policy_allows_nothing_the_source_never_calls() -> None:
    extra = load_policy_actions() - set(callable_actions()) - NEEDED_WITHOUT_A_RECORDED_CALL
    assert extra == set(), "allowed, but nothing in the code calls it"
