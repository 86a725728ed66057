"""ami/: bake → launch a proxy from the image → delete, against the bench's moto, nothing left."""

from __future__ import annotations

import base64
import json
import shutil
from typing import Any

import pytest
import requests

from tilehopper.contracts import TAG_JOB_UID, TAG_MANAGED_BY, TAG_ROLE, Role
from tilehopper.proxyconf import ProxySettings, render_user_data
from tilehopper_ami import images
from tilehopper_ami.__main__ import main
from tilehopper_bench import procs
from tilehopper_bench.stack import Bench
from tilehopper_operator import aws
from tests.ami.helpers import builder_guest, builders, clients

pytestmark = [
    pytest.mark.bench,
    pytest.mark.skipif(shutil.which("tinyproxy") is None, reason="tinyproxy is not installed"),
]

FAST = {"poll_seconds": 0.2, "timeout_s": 60.0}


def bake(bench: Bench, version: str, **kwargs: Any) -> images.Image:
    ec2, ssm = clients(bench)
    return images.bake(ec2=ec2, ssm=ssm, version=version, subnet_id=bench.env["TILEHOPPER_BENCH_SUBNET_ID"],
                       sleep=lambda _s: None, **{**FAST, **kwargs})


def nothing_left(ec2: Any, uid: str) -> dict[str, int]:
    return {kind: n for kind, n in aws.leftovers(ec2, uid).items() if n}


def test_bake_launch_from_the_image_and_delete(bench: Bench, unique: str) -> None:
    ec2, ssm = clients(bench)
    version = f"test-{unique}"
    uid = images.image_uid(version)
    with builder_guest(bench, version) as seen:
        image = bake(bench, version)
    assert image.state == "available" and not image.reused
    described = ec2.describe_images(ImageIds=[image.image_id])["Images"][0]
    tags = aws.tags_of(described)
    assert tags[TAG_MANAGED_BY] == "tilehopper" and tags[TAG_JOB_UID] == uid and tags[TAG_ROLE] == Role.IMAGE
    assert tags[images.TAG_IMAGE_VERSION] == version and described["Name"] == images.image_name(version, "x86_64")
    (snapshot_id,) = image.snapshot_ids
    snapshot = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
    assert aws.tags_of(snapshot)[TAG_ROLE] == Role.SNAPSHOT and aws.tags_of(snapshot)[TAG_JOB_UID] == uid

    # The builder: from Amazon Linux 2023, hardened, installs the proxy but holds no job's secret.
    (builder,) = seen
    al2023 = ssm.get_parameter(Name=aws.al2023_parameter("x86_64"))["Parameter"]["Value"]
    assert builder["ImageId"] == al2023 and "KeyName" not in builder
    assert builder["MetadataOptions"]["HttpTokens"] == "required"
    user_data = base64.b64decode(
        ec2.describe_instance_attribute(InstanceId=builder["InstanceId"], Attribute="userData")["UserData"]["Value"]
    ).decode()
    assert "dnf install -y tinyproxy" in user_data and "poweroff" in user_data
    assert "BasicAuth" not in user_data and "TILEHOPPER_PROXY_CONF" not in user_data
    behaviour = ec2.describe_instance_attribute(InstanceId=builder["InstanceId"],
                                                Attribute="instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"
    # The builder and its temporary security group are gone; the image and its snapshot stay.
    assert nothing_left(ec2, uid) == {"images": 1, "snapshots": 1}

    # Same version again: the image is reused, no builder boots.
    with builder_guest(bench, version) as seen_again:
        again = bake(bench, version)
    assert again.image_id == image.image_id and again.reused and not seen_again
    assert [i.image_id for i in images.list_images(ec2, version=version)] == [image.image_id]

    # A proxy instance launched from the baked image with a job's user-data serves that job.
    job = aws.JobAws(aws.JobIdentity(f"job-{unique}", f"ns-{unique}", "from-image"), ec2=ec2, ssm=ssm,
                     waiter_delay=0.2)
    group = job.ensure_security_group(vpc_id=bench.env["TILEHOPPER_BENCH_VPC_ID"],
                                      allowed_cidrs=["127.0.0.1/32"], port=8888)
    settings = ProxySettings(username=f"u-{unique}", password=f"p-{unique}-secret", allowed_cidrs=("127.0.0.1/32",),
                             http_ports=(int(bench.env["TILE_SERVER_URL"].rsplit(":", 1)[1]),))
    launched = job.launch(slot="a", generation=1, instance_types=["t3.micro"], image_id=image.image_id,
                          subnet_id=bench.env["TILEHOPPER_BENCH_SUBNET_ID"], user_data=render_user_data(settings),
                          security_group_id=group, public_ip=False)
    assert launched.instance["ImageId"] == image.image_id
    ip = launched.address("private")
    assert ip
    procs.wait_for(lambda: launched.instance_id in bench.aws.proxies(), timeout=20, what="proxy from the image")
    procs.wait_for(lambda: procs.port_open(ip, 8888), timeout=10, what="proxy port")
    session = requests.Session()
    session.trust_env = False
    tile = bench.env["TILE_URL"].format(x=1, y=2, z=3)
    creds = f"{settings.username}:{settings.password}"
    assert session.get(tile, proxies={"http": f"http://{creds}@{ip}:8888"}, timeout=10).status_code == 200
    assert session.get(tile, proxies={"http": f"http://{ip}:8888"}, timeout=10).status_code == 407
    report = job.sweep()
    assert report.clean and nothing_left(ec2, job.job.uid) == {}

    deleted = images.delete_image(ec2, image.image_id)
    assert deleted.snapshot_ids == (snapshot_id,)
    assert nothing_left(ec2, uid) == {}
    assert images.list_images(ec2, version=version) == []


def test_a_failed_install_leaves_nothing(bench: Bench, unique: str) -> None:
    ec2, _ = clients(bench)
    version = f"fail-{unique}"
    with builder_guest(bench, version, install_ok=False) as seen:
        with pytest.raises(images.BakeError, match="did not finish its install"):
            bake(bench, version, timeout_s=3.0)
    assert len(seen) == 1  # it did boot, and never powered off
    assert builders(ec2, version) == []
    assert nothing_left(ec2, images.image_uid(version)) == {}


def test_a_dead_bakes_builder_is_removed_by_the_next_bake(bench: Bench, unique: str) -> None:
    ec2, ssm = clients(bench)
    version = f"dead-{unique}"
    job = images.job_aws(ec2, None, version, poll_seconds=0.2)
    # What a bake killed mid-way leaves: a builder tagged as one, in no state to become an image.
    stock = ssm.get_parameter(Name=aws.al2023_parameter())["Parameter"]["Value"]
    left = ec2.run_instances(
        ImageId=stock, MinCount=1, MaxCount=1, SubnetId=bench.env["TILEHOPPER_BENCH_SUBNET_ID"],
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": k, "Value": v} for k, v in job.tags(Role.BUILDER).items()]}],
    )["Instances"][0]["InstanceId"]
    with builder_guest(bench, version):
        image = bake(bench, version)
    state = ec2.describe_instances(InstanceIds=[left])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state == "terminated"
    assert image.state == "available" and builders(ec2, version) == []
    report = images.delete_version(ec2, version, poll_seconds=0.2)
    assert report.clean and report.removed["images"] == [image.image_id]
    assert nothing_left(ec2, images.image_uid(version)) == {}


def test_command_line_bake_list_delete(bench: Bench, unique: str, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, bench.env[key])
    version = f"cli-{unique}"
    with builder_guest(bench, version):
        assert main(["bake", "--version", version, "--subnet-id", bench.env["TILEHOPPER_BENCH_SUBNET_ID"],
                     "--poll", "0.2", "--timeout", "60"]) == 0
    image_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert image_id.startswith("ami-")
    assert main(["list", "--version", version, "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["image_id"] == image_id and listed["version"] == version and listed["state"] == "available"
    assert main(["delete", "--version", version]) == 0
    assert "images 1" in capsys.readouterr().out
    ec2, _ = clients(bench)
    assert nothing_left(ec2, images.image_uid(version)) == {}
    # An image tilehopper did not make is never deleted.
    assert main(["delete", "--image-id", ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]]) == 1
    assert "not made by tilehopper" in capsys.readouterr().err


def test_command_line_leftovers_counts_what_is_still_there(bench: Bench, unique: str,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, bench.env[key])
    uid = f"left-{unique}"
    assert main(["leftovers", "--job-uid", uid]) == 0
    assert "security_groups\t0" in capsys.readouterr().out
    ec2, _ = clients(bench)
    job = aws.JobAws(aws.JobIdentity(uid, "default", "left"), ec2=ec2)
    job.ensure_security_group(vpc_id=bench.env["TILEHOPPER_BENCH_VPC_ID"], allowed_cidrs=["127.0.0.1/32"], port=8888)
    assert main(["leftovers", "--job-uid", uid]) == 1
    assert "security_groups\t1" in capsys.readouterr().out
    job.sweep()
    assert main(["leftovers", "--job-uid", uid]) == 0
