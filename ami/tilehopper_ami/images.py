"""Bake, list and delete the proxy image (AMI) with boto3, through the operator's AWS module.

A bake boots one builder from Amazon Linux 2023 with the image-builder user-data of
tilehopper.proxyconf (the proxy installed, no job's config or credentials: each job's own
user-data writes those when an instance boots from the image), waits until the builder has
powered itself off (its sign that the install succeeded), images it, and removes the builder
and its temporary security group. Everything carries the ownership tags of the pseudo-job
"ami-<version>" plus the version tag, so a bake that died is found and finished or swept again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from tilehopper.contracts import API_GROUP, MANAGED_BY, TAG_MANAGED_BY, TAG_ROLE, Role, aws_tag_list
from tilehopper.proxyconf import render_builder_user_data
from tilehopper_operator import aws
from tilehopper_operator.aws import (
    AwsError,
    JobAws,
    JobIdentity,
    PermanentAwsError,
    TransientAwsError,
    _call,
    _retry_dependency,
    tags_of,
)

log = logging.getLogger(__name__)

TAG_IMAGE_VERSION: Final = f"{API_GROUP}/image-version"
TAG_ARCH: Final = f"{API_GROUP}/architecture"
# The pseudo-job every image resource belongs to; TileJobs have Kubernetes uids, never this.
AMI_NAMESPACE: Final = "tilehopper-ami"
# Free-tier sizes per architecture.
DEFAULT_TYPES: Final = {"x86_64": "t3.micro", "arm64": "t4g.micro"}
# The builder halts itself this long after bake's deadline, should the bake have died.
DEAD_MAN_MARGIN_MINUTES: Final = 15


def image_uid(version: str) -> str:
    return f"ami-{version}"


def image_name(version: str, arch: str) -> str:
    return f"tilehopper-proxy-{version}-{arch}"


def job_aws(ec2: Any, ssm: Any | None, version: str, *, poll_seconds: float = 15.0) -> JobAws:
    identity = JobIdentity(uid=image_uid(version), namespace=AMI_NAMESPACE, name=f"proxy-{version}")
    return JobAws(identity, ec2=ec2, ssm=ssm, waiter_delay=poll_seconds, waiter_max_attempts=120)


@dataclass(frozen=True, slots=True)
class Image:
    image_id: str
    name: str
    version: str
    arch: str
    state: str
    snapshot_ids: tuple[str, ...]
    reused: bool = False  # a bake found it instead of baking it

    @classmethod
    def from_described(cls, image: dict[str, Any], *, reused: bool = False) -> Image:
        tags = tags_of(image)
        snapshots = tuple(
            str(m["Ebs"]["SnapshotId"]) for m in image.get("BlockDeviceMappings", []) if m.get("Ebs", {}).get("SnapshotId")
        )
        return cls(
            image_id=str(image["ImageId"]),
            name=str(image.get("Name", "")),
            version=tags.get(TAG_IMAGE_VERSION, ""),
            arch=tags.get(TAG_ARCH, str(image.get("Architecture", ""))),
            state=str(image.get("State", "")),
            snapshot_ids=snapshots,
            reused=reused,
        )


def list_images(ec2: Any, *, version: str | None = None, arch: str | None = None) -> list[Image]:
    """Our images (own account, our ownership and role tags), oldest first."""
    filters = aws.tag_filters(image_uid(version) if version else None, **{TAG_ROLE: Role.IMAGE})
    if arch:
        filters.append({"Name": f"tag:{TAG_ARCH}", "Values": [arch]})
    found = list(aws._pages(ec2, "describe_images", "Images", Owners=["self"], Filters=filters))
    found.sort(key=lambda i: str(i.get("CreationDate", "")))
    return [Image.from_described(i) for i in found]


# --- bake ---------------------------------------------------------------------------------


class BakeError(AwsError):
    """The builder never finished its install in time, or the image could not be made."""


def bake(
    *,
    ec2: Any,
    ssm: Any | None,
    version: str,
    arch: str = "x86_64",
    instance_type: str | None = None,
    subnet_id: str | None = None,
    base_image_id: str | None = None,
    public_ip: bool = True,
    timeout_s: float = 1800.0,
    poll_seconds: float = 15.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Image:
    """The image of this version and architecture: an existing one, or a new bake."""
    for image in list_images(ec2, version=version, arch=arch):
        if image.state in ("available", "pending"):
            log.info("image %s (%s) exists for version %s: reused", image.image_id, image.state, version)
            if image.state == "pending":
                _wait_available(ec2, image.image_id, poll_seconds=poll_seconds, timeout_s=timeout_s)
            return Image.from_described(_describe_image(ec2, image.image_id), reused=True)
    job = job_aws(ec2, ssm, version, poll_seconds=poll_seconds)
    _remove_builders(job)  # a bake that died left its builder: it never becomes this image
    base = base_image_id or str(_call(ssm.get_parameter, Name=aws.al2023_parameter(arch))["Parameter"]["Value"])
    vpc_id, subnet = aws.network_of(ec2, subnet_id)
    group_id = _builder_group(job, vpc_id)
    builder_id = ""
    try:
        builder_id = _launch_builder(
            job, version=version, arch=arch, image_id=base, subnet_id=subnet, group_id=group_id,
            instance_type=instance_type or DEFAULT_TYPES[arch], public_ip=public_ip,
            dead_man_minutes=int(timeout_s // 60) + DEAD_MAN_MARGIN_MINUTES,
        )
        log.info("builder %s boots from %s", builder_id, base)
        _wait_installed(ec2, builder_id, timeout_s=timeout_s, poll_seconds=poll_seconds, sleep=sleep)
        image_id = _create_image(job, builder_id, version=version, arch=arch)
        try:
            _wait_available(ec2, image_id, poll_seconds=poll_seconds, timeout_s=timeout_s)
        except AwsError:
            delete_image(ec2, image_id, sleep=sleep)  # a failed or stuck image is no image
            raise
        log.info("image %s is available", image_id)
        return Image.from_described(_describe_image(ec2, image_id))
    finally:
        if builder_id:
            job.terminate([builder_id])
            job.wait_terminated([builder_id])
        _retry_dependency(lambda: _call(ec2.delete_security_group, GroupId=group_id), sleep=sleep)


def _builder_filters(job: JobAws) -> list[dict[str, Any]]:
    return aws.tag_filters(job.job.uid, **{TAG_ROLE: Role.BUILDER})


def _remove_builders(job: JobAws) -> None:
    left = [str(i["InstanceId"]) for i in job.describe_job_instances(extra_filters=_builder_filters(job))]
    if left:
        log.warning("terminating builders an earlier bake left: %s", ", ".join(left))
        job.wait_terminated(job.terminate(left))


def _builder_group(job: JobAws, vpc_id: str) -> str:
    """The builder's security group: no ingress rule at all (nobody connects to a builder);
    the default egress stays, the install needs the package repositories. Reused by tags."""
    filters = [{"Name": "vpc-id", "Values": [vpc_id]}, *aws.tag_filters(job.job.uid, **{TAG_ROLE: Role.SECURITY_GROUP})]
    for group in aws._pages(job.ec2, "describe_security_groups", "SecurityGroups", Filters=filters):
        return str(group["GroupId"])
    created = _call(
        job.ec2.create_security_group,
        GroupName=f"tilehopper-{job.job.uid}-builder",
        Description="tilehopper image builder: no ingress",
        VpcId=vpc_id,
        TagSpecifications=[{"ResourceType": "security-group", "Tags": aws_tag_list(job.tags(Role.SECURITY_GROUP))}],
    )
    return str(created["GroupId"])


def _launch_builder(
    job: JobAws, *, version: str, arch: str, image_id: str, subnet_id: str, group_id: str, instance_type: str,
    public_ip: bool, dead_man_minutes: int,
) -> str:
    device, size = job._root_device(image_id)
    tags = aws_tag_list(
        job.tags(Role.BUILDER, **{TAG_IMAGE_VERSION: version, TAG_ARCH: arch, "Name": f"tilehopper-ami-builder-{version}"})
    )
    answer = _call(
        job.ec2.run_instances,
        ImageId=image_id,
        InstanceType=instance_type,
        MinCount=1,
        MaxCount=1,
        UserData=render_builder_user_data(max_lifetime_minutes=dead_man_minutes),
        # A public IP reaches the package repositories without a NAT; no ingress lets anyone in.
        **aws.hardened_launch_options(root_device=device, root_size_gib=size, subnet_id=subnet_id,
                                      security_group_id=group_id, public_ip=public_ip),
        # Stop, not terminate: the builder's own poweroff at the end of its install leaves a
        # stopped instance to image (consistent, no reboot), and says the install succeeded.
        InstanceInitiatedShutdownBehavior="stop",
        TagSpecifications=[
            {"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume", "network-interface")
        ],
    )
    return str(answer["Instances"][0]["InstanceId"])


def _wait_installed(
    ec2: Any, instance_id: str, *, timeout_s: float, poll_seconds: float, sleep: Callable[[float], None]
) -> None:
    deadline = time.monotonic() + timeout_s
    seen = ""
    while True:
        try:
            reservations = _call(ec2.describe_instances, InstanceIds=[instance_id]).get("Reservations", [])
            state = str(reservations[0]["Instances"][0]["State"]["Name"]) if reservations else "pending"
        except TransientAwsError as exc:
            if exc.code != "InvalidInstanceID.NotFound":  # a new instance is not listed at once
                raise
            state = "pending"
        if state != seen:
            log.info("builder %s is %s", instance_id, state)
            seen = state
        if state == "stopped":
            return
        if state in ("shutting-down", "terminated"):
            raise BakeError(f"builder {instance_id} was {state} before its install finished")
        if time.monotonic() > deadline:
            raise BakeError(
                f"builder {instance_id} did not finish its install within {timeout_s:.0f}s (still {state}); "
                "does the base image's package repository carry tinyproxy? (docs/security.md)"
            )
        sleep(poll_seconds)


def _create_image(job: JobAws, builder_id: str, *, version: str, arch: str) -> str:
    extra = {TAG_IMAGE_VERSION: version, TAG_ARCH: arch}
    image_tags = aws_tag_list(job.tags(Role.IMAGE, **extra))
    snapshot_tags = aws_tag_list(job.tags(Role.SNAPSHOT, **extra))
    name = image_name(version, arch)
    request = {"InstanceId": builder_id, "Name": name, "Description": f"tilehopper proxy {version} ({arch})"}
    try:
        # The IAM policy lets CreateImage make only images and snapshots tagged as ours.
        answer = _call(
            job.ec2.create_image,
            **request,
            TagSpecifications=[
                {"ResourceType": "image", "Tags": image_tags},
                {"ResourceType": "snapshot", "Tags": snapshot_tags},
            ],
        )
        return str(answer["ImageId"])
    except TransientAwsError as exc:
        # The name is unique per account and region, so a lost answer shows up as an image
        # with that name; an endpoint that cannot tag snapshots at creation (moto 5.2.5 answers
        # HTTP 500) gets them tagged afterwards.
        for image in aws._pages(job.ec2, "describe_images", "Images", Owners=["self"],
                                Filters=[{"Name": "name", "Values": [name]}]):
            return str(image["ImageId"])
        log.info("create_image with snapshot tags failed (%s): tagging the snapshots afterwards", exc)
    image_id = str(_call(job.ec2.create_image, **request,
                         TagSpecifications=[{"ResourceType": "image", "Tags": image_tags}])["ImageId"])
    snapshots = Image.from_described(_describe_image(job.ec2, image_id)).snapshot_ids
    if snapshots:
        _call(job.ec2.create_tags, Resources=list(snapshots), Tags=snapshot_tags)
    return image_id


def _describe_image(ec2: Any, image_id: str) -> dict[str, Any]:
    images = _call(ec2.describe_images, ImageIds=[image_id]).get("Images", [])
    if not images:
        raise PermanentAwsError(f"image {image_id} does not exist", code="InvalidAMIID.NotFound")
    return dict(images[0])


def _wait_available(ec2: Any, image_id: str, *, poll_seconds: float, timeout_s: float) -> None:
    from botocore.exceptions import WaiterError

    attempts = max(1, int(timeout_s / max(poll_seconds, 0.1)))
    try:
        ec2.get_waiter("image_available").wait(
            ImageIds=[image_id], WaiterConfig={"Delay": poll_seconds, "MaxAttempts": attempts}
        )
    except WaiterError as exc:
        raise BakeError(f"image {image_id} did not become available: {exc}") from None


# --- delete -------------------------------------------------------------------------------


def delete_image(ec2: Any, image_id: str, *, sleep: Callable[[float], None] = time.sleep) -> Image:
    """Deregister one of our images and delete its snapshots. Refuses images we did not make."""
    image = _describe_image(ec2, image_id)
    if tags_of(image).get(TAG_MANAGED_BY) != MANAGED_BY:
        raise PermanentAwsError(f"image {image_id} was not made by tilehopper: not deleting it")
    found = Image.from_described(image)
    _call(ec2.deregister_image, ImageId=image_id)
    for snapshot_id in found.snapshot_ids:
        # A snapshot stays "in use" for a moment after its image was deregistered.
        _retry_dependency(lambda s=snapshot_id: _call(ec2.delete_snapshot, SnapshotId=s), sleep=sleep)
    log.info("deleted image %s and snapshots %s", image_id, ", ".join(found.snapshot_ids) or "none")
    return found


def delete_version(ec2: Any, version: str, *, poll_seconds: float = 15.0) -> aws.SweepReport:
    """Everything of one version: its images and their snapshots, and a dead bake's builder and
    security group (the same sweep by ownership tags that ends a TileJob)."""
    return job_aws(ec2, None, version, poll_seconds=poll_seconds).sweep()
