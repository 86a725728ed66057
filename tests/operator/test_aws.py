"""aws.py against moto in server mode on 127.0.0.1 (real boto3 clients, real HTTP)."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from botocore.parsers import ResponseParserError
from moto.server import ThreadedMotoServer

from tilehopper.contracts import (
    MANAGED_BY,
    TAG_GENERATION,
    TAG_JOB,
    TAG_JOB_UID,
    TAG_MANAGED_BY,
    TAG_ROLE,
    TAG_SLOT,
    Role,
    aws_tag_list,
    ownership_tags,
)
from tilehopper_operator import aws
from tilehopper_operator.aws import (
    ApiCallRecorder,
    JobAws,
    JobIdentity,
    NoCapacityError,
    PermanentAwsError,
    TransientAwsError,
)

pytestmark = pytest.mark.bench

REGION = "eu-central-1"
PORT = 8888
USER_DATA = "#!/bin/bash\necho tilehopper test\n"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    before = os.environ.get("MOTO_ENABLE_AMI_VALIDATION")
    os.environ["MOTO_ENABLE_AMI_VALIDATION"] = "true"  # a bad image id fails like on AWS
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    if before is None:
        os.environ.pop("MOTO_ENABLE_AMI_VALIDATION", None)
    else:
        os.environ["MOTO_ENABLE_AMI_VALIDATION"] = before


def clients(url: str, recorder: ApiCallRecorder | None = None) -> tuple[Any, Any]:
    return aws.make_clients(
        region=REGION,
        endpoint_url=url,
        access_key_id="testing",
        secret_access_key="testing",
        recorder=recorder,
        max_attempts=2,
    )


@pytest.fixture(scope="module")
def network(moto_url: str) -> dict[str, str]:
    ec2, _ = clients(moto_url)
    vpc = ec2.create_vpc(CidrBlock="127.1.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="127.1.0.0/16")["Subnet"]["SubnetId"]
    return {"vpc": vpc, "subnet": subnet}


@pytest.fixture
def recorder() -> ApiCallRecorder:
    return ApiCallRecorder()


def new_job(url: str, recorder: ApiCallRecorder | None = None, name: str = "tiles") -> JobAws:
    ec2, ssm = clients(url, recorder)
    identity = JobIdentity(uid=str(uuid.uuid4()), namespace="default", name=name)
    return JobAws(identity, ec2=ec2, ssm=ssm, waiter_delay=1, waiter_max_attempts=5, sleep=lambda _: None)


@pytest.fixture
def job(moto_url: str, recorder: ApiCallRecorder) -> Iterator[JobAws]:
    j = new_job(moto_url, recorder)
    yield j
    j.sweep()


def launch(job: JobAws, network: dict[str, str], slot: str = "proxy-1", **kw: Any) -> aws.Launched:
    sg = job.ensure_security_group(vpc_id=network["vpc"], allowed_cidrs=["127.0.0.0/8"], port=PORT)
    args: dict[str, Any] = dict(
        slot=slot,
        generation=1,
        instance_types=["t3.micro", "t2.micro"],
        image_id=None,
        subnet_id=network["subnet"],
        user_data=USER_DATA,
        security_group_id=sg,
        public_ip=False,
    )
    return job.launch(**(args | kw))


def fail_run_instances_for(client: Any, types: set[str], code: str) -> list[str]:
    """A hook on the real client: RunInstances for these types fails like EC2 would answer."""
    seen: list[str] = []

    def refuse(params: dict[str, Any], **_: Any) -> None:
        seen.append(params["InstanceType"])
        if params["InstanceType"] in types:
            raise ClientError(
                {"Error": {"Code": code, "Message": f"{code} for {params['InstanceType']}"}}, "RunInstances"
            )

    client.meta.events.register("provide-client-params.ec2.RunInstances", refuse)
    return seen


# --- Security group -------------------------------------------------------------------------


def test_security_group_has_exactly_one_ingress_rule_and_converges(job: JobAws, network: dict[str, str]):
    sg = job.ensure_security_group(vpc_id=network["vpc"], allowed_cidrs=["203.0.113.7/32"], port=PORT)
    again = job.ensure_security_group(vpc_id=network["vpc"], allowed_cidrs=["203.0.113.7/32"], port=PORT)
    assert again == sg

    def rules() -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
        group = job.ec2.describe_security_groups(GroupIds=[sg])["SecurityGroups"][0]
        return group["IpPermissions"], group["IpPermissionsEgress"], aws.tags_of(group)

    ingress, egress, tags = rules()
    assert [(p["IpProtocol"], p["FromPort"], p["ToPort"], [r["CidrIp"] for r in p["IpRanges"]]) for p in ingress] == [
        ("tcp", PORT, PORT, ["203.0.113.7/32"])
    ]
    assert egress and egress[0]["IpProtocol"] == "-1"  # the default egress stays
    assert tags[TAG_JOB_UID] == job.job.uid and tags[TAG_ROLE] == Role.SECURITY_GROUP
    assert tags[TAG_MANAGED_BY] == MANAGED_BY

    # Someone opens SSH by hand and the allowed CIDR changes: the next ensure converges.
    job.ec2.authorize_security_group_ingress(
        GroupId=sg,
        IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
    )
    job.ensure_security_group(vpc_id=network["vpc"], allowed_cidrs=["198.51.100.0/24"], port=PORT)
    ingress, _, _ = rules()
    flat = [(p["FromPort"], r["CidrIp"]) for p in ingress for r in p["IpRanges"]]
    assert flat == [(PORT, "198.51.100.0/24")]


def test_security_group_is_never_open_without_cidrs(job: JobAws, network: dict[str, str]):
    with pytest.raises(ValueError, match="never open"):
        job.ensure_security_group(vpc_id=network["vpc"], allowed_cidrs=[], port=PORT)


# --- Launch ---------------------------------------------------------------------------------


def test_launched_instance_is_hardened_and_tagged(job: JobAws, network: dict[str, str]):
    launched = launch(job, network, slot="proxy-7", generation=3)
    assert not launched.reused and launched.instance_type == "t3.micro"
    ec2 = job.ec2
    inst = ec2.describe_instances(InstanceIds=[launched.instance_id])["Reservations"][0]["Instances"][0]
    assert inst["MetadataOptions"]["HttpTokens"] == "required"
    assert inst["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert "KeyName" not in inst or not inst["KeyName"]
    attr = ec2.describe_instance_attribute(InstanceId=launched.instance_id, Attribute="instanceInitiatedShutdownBehavior")
    assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    user_data = ec2.describe_instance_attribute(InstanceId=launched.instance_id, Attribute="userData")
    assert base64.b64decode(user_data["UserData"]["Value"]).decode() == USER_DATA
    assert inst["SubnetId"] == network["subnet"]
    assert inst["PrivateIpAddress"].startswith("127.1.")
    assert aws.instance_address(inst, "private") == inst["PrivateIpAddress"]
    assert launched.address("public") is None  # private mode: no public address
    groups = {g["GroupId"] for g in inst.get("SecurityGroups", [])} | {
        g["GroupId"] for ni in inst.get("NetworkInterfaces", []) for g in ni.get("Groups", [])
    }
    assert len(groups) == 1

    tags = aws.tags_of(inst)
    expected = ownership_tags(job_uid=job.job.uid, namespace="default", name="tiles", role=Role.PROXY, generation=3)
    assert expected.items() <= tags.items()
    assert tags[TAG_SLOT] == "proxy-7" and tags[TAG_GENERATION] == "3" and tags[TAG_JOB] == "default/tiles"

    volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [launched.instance_id]}])
    assert volumes["Volumes"], "the root volume exists"
    for volume in volumes["Volumes"]:
        assert volume["Encrypted"] is True
        assert aws.tags_of(volume)[TAG_JOB_UID] == job.job.uid
        assert aws.tags_of(volume)[TAG_SLOT] == "proxy-7"


def test_launch_uses_stock_amazon_linux_from_ssm(job: JobAws, network: dict[str, str], recorder: ApiCallRecorder):
    launched = launch(job, network)
    stock = job.ssm.get_parameter(Name=aws.AL2023_PARAMETER)["Parameter"]["Value"]
    assert launched.instance["ImageId"] == stock
    assert "ssm:GetParameter" in recorder.actions


def test_launch_twice_with_one_slot_makes_one_instance_by_the_tag(
    moto_url: str, job: JobAws, network: dict[str, str], recorder: ApiCallRecorder
):
    first = launch(job, network, slot="proxy-1")
    runs = recorder.calls.count("ec2:RunInstances")
    second = launch(job, network, slot="proxy-1")
    assert second.reused and second.instance_id == first.instance_id
    # No RunInstances at all the second time: the tag lookup found it (moto ignores
    # ClientToken, so this passes only through the tag path).
    assert recorder.calls.count("ec2:RunInstances") == runs
    # An operator restarted after a crash knows nothing but the slot: it finds the same one.
    reborn = JobAws(job.job, ec2=clients(moto_url)[0], ssm=clients(moto_url)[1])
    assert launch(reborn, network, slot="proxy-1").instance_id == first.instance_id
    slot_instances = job.describe_job_instances(extra_filters=aws.tag_filters(job.job.uid, **{TAG_SLOT: "proxy-1"}))
    assert [i["InstanceId"] for i in slot_instances] == [first.instance_id]
    # Another slot is another instance.
    assert launch(job, network, slot="proxy-2").instance_id != first.instance_id


def test_terminated_slot_instance_is_not_reused(job: JobAws, network: dict[str, str]):
    first = launch(job, network, slot="proxy-1")
    job.terminate([first.instance_id])
    again = launch(job, network, slot="proxy-1")
    assert not again.reused and again.instance_id != first.instance_id


def test_instance_type_fallback_on_capacity_errors(job: JobAws, network: dict[str, str]):
    seen = fail_run_instances_for(job.ec2, {"t3.micro"}, "InsufficientInstanceCapacity")
    launched = launch(job, network, instance_types=["t3.micro", "t2.micro"])
    assert seen == ["t3.micro", "t2.micro"]
    assert launched.instance_type == "t2.micro" and launched.refused_types == ("t3.micro",)
    assert launched.instance["InstanceType"] == "t2.micro"


@pytest.mark.parametrize("code", ["Unsupported", "InvalidParameterCombination"])
def test_instance_type_fallback_on_unsupported_types(job: JobAws, network: dict[str, str], code: str):
    fail_run_instances_for(job.ec2, {"t3.micro", "t3a.micro"}, code)
    launched = launch(job, network, instance_types=["t3.micro", "t3a.micro", "t2.micro"])
    assert launched.refused_types == ("t3.micro", "t3a.micro")


def test_no_capacity_in_any_type_is_transient(job: JobAws, network: dict[str, str]):
    fail_run_instances_for(job.ec2, {"t3.micro", "t2.micro"}, "InsufficientInstanceCapacity")
    with pytest.raises(NoCapacityError, match="t3.micro, t2.micro") as exc:
        launch(job, network)
    assert isinstance(exc.value, TransientAwsError)
    assert job.leftovers()["instances"] == 0


@pytest.mark.parametrize(
    ("code", "words"),
    [("AuthFailure", "credentials"), ("UnauthorizedOperation", "iam-policy"), ("InvalidAMIID.Malformed", "InvalidAMIID")],
)
def test_permanent_errors_say_what_is_wrong(job: JobAws, network: dict[str, str], code: str, words: str):
    fail_run_instances_for(job.ec2, {"t3.micro", "t2.micro"}, code)
    with pytest.raises(PermanentAwsError, match=words) as exc:
        launch(job, network)
    assert exc.value.code == code


def test_bad_image_is_permanent(job: JobAws, network: dict[str, str]):
    with pytest.raises(PermanentAwsError, match="InvalidAMIID"):
        launch(job, network, image_id="ami-0123456789abcdef0")


def test_unreadable_answers_are_retried_a_bounded_number_of_times(job: JobAws, network: dict[str, str]):
    sg = job.ensure_security_group(vpc_id=network["vpc"], allowed_cidrs=["127.0.0.0/8"], port=PORT)
    failures = {"left": 2, "calls": 0}

    def garble(**_: Any) -> None:
        failures["calls"] += 1
        if failures["left"]:
            failures["left"] -= 1
            raise ResponseParserError("Unable to parse response (moto's HTTP 500)")

    job.ec2.meta.events.register("before-call.ec2.RunInstances", garble)
    assert launch(job, network, security_group_id=sg).instance_id
    assert failures["calls"] == 3
    failures["left"] = 100
    with pytest.raises(TransientAwsError, match="unreadable"):
        launch(job, network, slot="proxy-2", security_group_id=sg)
    assert failures["calls"] == 3 + aws.PARSER_RETRIES


# --- Describe, terminate --------------------------------------------------------------------


def test_describe_and_terminate_only_touch_this_job(moto_url: str, job: JobAws, network: dict[str, str]):
    other = new_job(moto_url, name="other")
    try:
        mine = launch(job, network, slot="proxy-1")
        theirs = launch(other, network, slot="proxy-1")
        assert [i["InstanceId"] for i in job.describe_job_instances()] == [mine.instance_id]
        # A stale or foreign id does nothing.
        assert job.terminate([theirs.instance_id, "i-0000000000000000"]) == []
        assert [i["InstanceId"] for i in other.describe_job_instances()] == [theirs.instance_id]
        assert job.terminate([mine.instance_id]) == [mine.instance_id]
        assert job.describe_job_instances() == []
        gone = job.describe_job_instances(states=["terminated"])
        assert [i["InstanceId"] for i in gone] == [mine.instance_id]
    finally:
        other.sweep()


# --- Sweep, leftovers, orphans --------------------------------------------------------------


def make_everything(job: JobAws, network: dict[str, str]) -> None:
    """One of each kind of resource a job (operator or ami/) can leave behind."""
    ec2 = job.ec2
    a = launch(job, network, slot="proxy-1")
    launch(job, network, slot="proxy-2")
    tags = aws_tag_list(job.tags(Role.IMAGE))
    ec2.create_key_pair(KeyName=f"tilehopper-{job.job.uid}", TagSpecifications=[{"ResourceType": "key-pair", "Tags": tags}])
    ec2.allocate_address(Domain="vpc", TagSpecifications=[{"ResourceType": "elastic-ip", "Tags": tags}])
    # moto's CreateImage takes no TagSpecifications; the image's own snapshot stays untagged,
    # and the sweep must still remove it with its image.
    image = ec2.create_image(InstanceId=a.instance_id, Name=f"tilehopper-{job.job.uid}")
    ec2.create_tags(Resources=[image["ImageId"]], Tags=tags)
    volume = ec2.create_volume(
        AvailabilityZone=f"{REGION}a", Size=1, TagSpecifications=[{"ResourceType": "volume", "Tags": tags}]
    )
    ec2.create_snapshot(
        VolumeId=volume["VolumeId"], TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags}]
    )


def test_sweep_leaves_zero_leftovers_and_spares_other_jobs(
    moto_url: str, job: JobAws, network: dict[str, str], recorder: ApiCallRecorder
):
    other = new_job(moto_url, name="other")
    try:
        make_everything(job, network)
        launch(other, network, slot="proxy-1")
        before = job.leftovers()
        for kind in ("instances", "security_groups", "key_pairs", "addresses", "images", "snapshots", "volumes"):
            assert before[kind] >= 1, kind
        report = job.sweep()
        assert report.clean, report.errors
        assert job.leftovers() == dict.fromkeys(before, 0)
        assert len(report.removed["instances"]) == 2
        assert "ec2:DescribeInstances" in recorder.actions and "ec2:TerminateInstances" in recorder.actions
        # The other job keeps everything it had.
        assert other.leftovers()["instances"] == 1 and other.leftovers()["security_groups"] == 1
        # A second sweep finds nothing and fails at nothing.
        again = job.sweep()
        assert again.clean and again.summary() == "nothing"
    finally:
        other.sweep()
    assert other.leftovers() == dict.fromkeys(before, 0)


def test_orphan_listing_names_jobs_that_still_own_resources(moto_url: str, network: dict[str, str]):
    a, b = new_job(moto_url, name="a"), new_job(moto_url, name="b")
    launch(a, network)
    b.ensure_security_group(vpc_id=network["vpc"], allowed_cidrs=["127.0.0.0/8"], port=PORT)
    owned = aws.list_owned_job_uids(a.ec2)
    assert {a.job.uid, b.job.uid} <= owned
    a.sweep()
    b.sweep()
    owned = aws.list_owned_job_uids(a.ec2)
    assert a.job.uid not in owned and b.job.uid not in owned


def test_untagged_resources_are_never_swept(job: JobAws, network: dict[str, str]):
    ec2 = job.ec2
    foreign = ec2.create_security_group(GroupName=f"not-ours-{uuid.uuid4()}", Description="x", VpcId=network["vpc"])
    job.sweep()
    assert ec2.describe_security_groups(GroupIds=[foreign["GroupId"]])["SecurityGroups"]
    ec2.delete_security_group(GroupId=foreign["GroupId"])
    with pytest.raises(ValueError):
        aws.sweep(ec2, "")


# --- The recorder ---------------------------------------------------------------------------


def test_recorder_names_every_call_as_an_iam_action(job: JobAws, network: dict[str, str], recorder: ApiCallRecorder):
    launched = launch(job, network)
    job.terminate([launched.instance_id])
    job.wait_terminated([launched.instance_id])
    assert {
        "ec2:DescribeSecurityGroups",
        "ec2:CreateSecurityGroup",
        "ec2:AuthorizeSecurityGroupIngress",
        "ec2:DescribeInstances",
        "ec2:DescribeImages",
        "ec2:RunInstances",
        "ec2:TerminateInstances",
        "ssm:GetParameter",
    } <= recorder.actions
    assert all(call.split(":")[0] in ("ec2", "ssm") for call in recorder.calls)


def test_client_config_retries_with_backoff():
    config = aws.client_config(max_attempts=4)
    assert config.retries == {"mode": "adaptive", "max_attempts": 4}
