"""Everything the operator does in AWS, and the only module that uses boto3 (style.md).

`JobAws` is bound to one TileJob (its uid, namespace and name): every resource it creates carries
the job's ownership tags (contracts.ownership_tags) from the moment it exists (TagSpecifications),
and every lookup, termination and sweep finds resources by those tags only, so jobs never touch
each other's resources and a crashed operator finds its own again.

Errors come out as AwsError: PermanentAwsError (bad credentials, missing permission, bad image or
subnet: the job cannot run; the caller ends it with a clear condition) or TransientAwsError
(throttling and 5xx that botocore's retries could not get through, no capacity in any instance
type: try again later).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError  # not a BotoCoreError

from tilehopper.contracts import (
    MANAGED_BY,
    TAG_JOB,
    TAG_JOB_UID,
    TAG_MANAGED_BY,
    TAG_ROLE,
    TAG_SLOT,
    Role,
    aws_tag_list,
    ownership_tags,
)

log = logging.getLogger(__name__)

AL2023_PARAMETER: Final = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"

# States in which an instance still exists (and costs money, and may serve).
NOT_TERMINATED: Final = ("pending", "running", "shutting-down", "stopping", "stopped")
SERVING: Final = ("pending", "running")

# RunInstances errors that say "not this instance type (here, now)": try the next one.
TRY_NEXT_TYPE: Final = frozenset(
    {"InsufficientInstanceCapacity", "Unsupported", "InvalidParameterCombination", "UnsupportedOperation"}
)
# Errors no retry can fix: the job cannot run until a human changes something.
PERMANENT: Final = frozenset(
    {
        "AuthFailure",
        "UnauthorizedOperation",
        "AccessDenied",
        "AccessDeniedException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "OptInRequired",
        "Blocked",
        "InvalidSubnetID.NotFound",
        "InvalidVpcID.NotFound",
        "InvalidGroup.NotFound",
        "ParameterNotFound",
    }
)
PERMANENT_PREFIXES: Final = ("InvalidAMIID.",)
# moto answers some bad requests with an HTTP 500 body botocore cannot parse; a real endpoint can
# send a garbled answer too. Retried a few times, then reported as transient.
PARSER_RETRIES: Final = 3


class AwsError(Exception):
    def __init__(self, message: str, *, code: str = "", operation: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.operation = operation


class PermanentAwsError(AwsError):
    """Retrying cannot help: bad credentials, missing permission, bad image, subnet or VPC."""


class TransientAwsError(AwsError):
    """Worth retrying later: throttling, 5xx after botocore's retries, no capacity anywhere."""


class NoCapacityError(TransientAwsError):
    """Every instance type in the list was refused for capacity or support."""


def classify(error: ClientError, operation: str = "") -> AwsError:
    err = error.response.get("Error", {})
    code = str(err.get("Code", ""))
    message = str(err.get("Message", "")) or str(error)
    text = f"{operation or 'AWS'} failed: {code}: {message}"
    if code in PERMANENT or code.startswith(PERMANENT_PREFIXES):
        hint = {
            "AuthFailure": "check the AWS credentials Secret",
            "UnauthorizedOperation": "the IAM policy lacks this action (deploy/iam-policy.json)",
        }.get(code)
        return PermanentAwsError(f"{text} ({hint})" if hint else text, code=code, operation=operation)
    return TransientAwsError(text, code=code, operation=operation)


# --- Clients and the call recorder ----------------------------------------------------------


class ApiCallRecorder:
    """Records every EC2/SSM call a client makes, as IAM action names ("ec2:RunInstances").

    Hooked on botocore's before-call event, so waiters, paginators and calls that fail are
    recorded too; a security test compares the set with deploy/iam-policy.json.
    """

    def __init__(self, log_path: str | None = None) -> None:
        self.calls: list[str] = []
        # With a path, every call is also appended there (one action a line), so the calls of an
        # operator running in another process can be checked too.
        self.log_path = log_path

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-call", self._record)
        return client

    def _record(self, model: Any, **_: Any) -> None:
        action = f"{model.service_model.signing_name}:{model.name}"
        self.calls.append(action)
        if self.log_path:
            with open(self.log_path, "a") as out:
                out.write(action + "\n")

    @property
    def actions(self) -> set[str]:
        return set(self.calls)


def client_config(*, max_attempts: int = 6, mode: str = "adaptive") -> Config:
    """Throttling and 5xx are retried with backoff by botocore (adaptive also rate-limits)."""
    return Config(retries={"mode": mode, "max_attempts": max_attempts}, connect_timeout=10, read_timeout=30)


def make_clients(
    *,
    region: str,
    endpoint_url: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    recorder: ApiCallRecorder | None = None,
    max_attempts: int = 6,
) -> tuple[Any, Any]:
    """(ec2, ssm) clients. No keys given: boto3's own chain (env, IRSA, EKS Pod Identity)."""
    session = boto3.session.Session(
        aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key, region_name=region
    )
    config = client_config(max_attempts=max_attempts)
    clients = tuple(
        session.client(service, endpoint_url=endpoint_url, config=config) for service in ("ec2", "ssm")
    )
    if recorder is not None:
        for client in clients:
            recorder.attach(client)
    return clients[0], clients[1]


def _call(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """One AWS call, its errors turned into AwsError."""
    operation = getattr(fn, "__name__", "AWS call")
    for attempt in range(1, PARSER_RETRIES + 1):
        try:
            return fn(**kwargs)
        except ClientError as exc:
            raise classify(exc, operation) from None
        except ResponseParserError as exc:
            if attempt == PARSER_RETRIES:
                raise TransientAwsError(f"{operation}: unreadable answer: {exc}", operation=operation) from None
            time.sleep(0.2 * attempt)
        except BotoCoreError as exc:  # endpoint unreachable, timeouts after botocore's retries
            raise TransientAwsError(f"{operation}: {exc}", operation=operation) from None
    raise AssertionError("unreachable")


def _pages(client: Any, operation: str, key: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
    if client.can_paginate(operation):
        pages = client.get_paginator(operation).paginate(**kwargs)
        try:
            for page in pages:
                yield from page.get(key, [])
        except ClientError as exc:
            raise classify(exc, operation) from None
    else:
        yield from _call(getattr(client, operation), **kwargs).get(key, [])


# --- Tags, filters, addresses ---------------------------------------------------------------


def tag_filters(job_uid: str | None = None, **tags: str) -> list[dict[str, Any]]:
    """Filters that match only resources tilehopper created (of one job, when job_uid is given)."""
    wanted = {TAG_MANAGED_BY: MANAGED_BY}
    if job_uid:
        wanted[TAG_JOB_UID] = job_uid
    wanted.update(tags)
    return [{"Name": f"tag:{k}", "Values": [v]} for k, v in wanted.items()]


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def instance_address(instance: dict[str, Any], mode: str) -> str | None:
    """The address consumers reach the proxy at: "public" (default) or "private" (same VPC)."""
    if mode == "private":
        return instance.get("PrivateIpAddress") or None
    if mode == "public":
        return instance.get("PublicIpAddress") or None
    raise ValueError(f"address mode must be public or private, not {mode!r}")


def _client_token(*parts: str) -> str:
    # Real EC2 honours it (moto does not): a RunInstances repeated by botocore's retries after a
    # lost answer returns the same instance. The slot tag lookup covers everything else.
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:48]


@dataclass(frozen=True, slots=True)
class JobIdentity:
    uid: str
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Launched:
    instance: dict[str, Any]  # as EC2 describes it
    reused: bool  # found by its slot tag: an earlier launch (maybe before a crash) made it
    instance_type: str
    refused_types: tuple[str, ...] = ()  # tried first and refused (capacity, support)

    @property
    def instance_id(self) -> str:
        return str(self.instance["InstanceId"])

    def address(self, mode: str) -> str | None:
        return instance_address(self.instance, mode)


@dataclass
class SweepReport:
    """What a sweep found and removed, by kind ("instances", "security_groups", ...)."""

    job_uid: str
    found: dict[str, list[str]] = field(default_factory=dict)
    removed: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def note(self, kind: str, ids: Iterable[str], *, removed: bool) -> None:
        target = self.removed if removed else self.found
        target.setdefault(kind, []).extend(ids)

    @property
    def clean(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        parts = [f"{kind} {len(ids)}" for kind, ids in sorted(self.removed.items()) if ids]
        return ", ".join(parts) or "nothing"


# --- One job's resources --------------------------------------------------------------------


class JobAws:
    """The AWS side of one TileJob."""

    def __init__(
        self,
        job: JobIdentity,
        *,
        ec2: Any,
        ssm: Any | None = None,
        waiter_delay: float = 5.0,
        waiter_max_attempts: int = 60,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.job = job
        self.ec2 = ec2
        self.ssm = ssm
        self.waiter_delay = waiter_delay
        self.waiter_max_attempts = waiter_max_attempts
        self._sleep = sleep
        self._stock_image: str | None = None
        self._root_devices: dict[str, tuple[str, int]] = {}

    def tags(self, role: str, generation: int | None = None, **extra: str) -> dict[str, str]:
        tags = ownership_tags(
            job_uid=self.job.uid, namespace=self.job.namespace, name=self.job.name, role=role, generation=generation
        )
        return tags | extra

    def _filters(self, **tags: str) -> list[dict[str, Any]]:
        return tag_filters(self.job.uid, **tags)

    # -- image --

    def stock_image_id(self) -> str:
        """Amazon Linux 2023 for this region, from the public SSM parameter."""
        if self._stock_image is None:
            if self.ssm is None:
                raise PermanentAwsError("no image id given and no SSM client to resolve Amazon Linux 2023")
            answer = _call(self.ssm.get_parameter, Name=AL2023_PARAMETER)
            self._stock_image = str(answer["Parameter"]["Value"])
        return self._stock_image

    def _root_device(self, image_id: str) -> tuple[str, int]:
        """(device name, size GiB) of the image's root volume, to encrypt it at launch."""
        if image_id not in self._root_devices:
            images = _call(self.ec2.describe_images, ImageIds=[image_id]).get("Images", [])
            if not images:
                raise PermanentAwsError(f"image {image_id} does not exist", code="InvalidAMIID.NotFound")
            image = images[0]
            device = image.get("RootDeviceName") or "/dev/xvda"
            size = 8
            for mapping in image.get("BlockDeviceMappings", []):
                if mapping.get("DeviceName") == device and "Ebs" in mapping:
                    size = int(mapping["Ebs"].get("VolumeSize") or size)
            self._root_devices[image_id] = (device, size)
        return self._root_devices[image_id]

    # -- security group --

    def ensure_security_group(self, *, vpc_id: str, allowed_cidrs: Sequence[str], port: int) -> str:
        """The job's security group: ingress only on the proxy port from the allowed CIDRs (no
        SSH, nothing else); the default egress stays, the proxy needs it. Idempotent by tags,
        and it converges: rules someone added by hand are revoked."""
        cidrs = sorted({str(ipaddress.ip_network(c, strict=False)) for c in allowed_cidrs})
        if not cidrs:
            raise ValueError("a proxy security group needs at least one allowed CIDR: it is never open")
        found = list(
            _pages(
                self.ec2,
                "describe_security_groups",
                "SecurityGroups",
                Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, *self._filters(**{TAG_ROLE: Role.SECURITY_GROUP})],
            )
        )
        if found:
            group = found[0]
        else:
            created = _call(
                self.ec2.create_security_group,
                GroupName=f"tilehopper-{self.job.uid}",
                Description=f"tilehopper proxies of {self.job.namespace}/{self.job.name}: proxy port only",
                VpcId=vpc_id,
                TagSpecifications=[
                    {"ResourceType": "security-group", "Tags": aws_tag_list(self.tags(Role.SECURITY_GROUP))}
                ],
            )
            group = {"GroupId": created["GroupId"], "IpPermissions": []}
        group_id = str(group["GroupId"])
        self._converge_ingress(group_id, group.get("IpPermissions", []), cidrs, port)
        return group_id

    def _converge_ingress(self, group_id: str, current: list[dict[str, Any]], cidrs: list[str], port: int) -> None:
        wanted = {("tcp", port, port, cidr) for cidr in cidrs}
        unwanted: list[dict[str, Any]] = []
        have: set[tuple[str, int, int, str]] = set()
        for perm in current:
            proto, lo, hi = perm.get("IpProtocol"), perm.get("FromPort", -1), perm.get("ToPort", -1)
            extra = {k: perm[k] for k in ("Ipv6Ranges", "UserIdGroupPairs", "PrefixListIds") if perm.get(k)}
            bad_v4 = []
            for rng in perm.get("IpRanges", []):
                key = (str(proto), int(lo), int(hi), str(rng["CidrIp"]))
                if key in wanted:
                    have.add(key)
                else:
                    bad_v4.append({"CidrIp": rng["CidrIp"]})
            if bad_v4 or extra:
                unwanted.append({"IpProtocol": proto, "FromPort": lo, "ToPort": hi, "IpRanges": bad_v4, **extra})
        for perm in unwanted:
            if perm.get("IpProtocol") == "-1":
                perm.pop("FromPort", None)
                perm.pop("ToPort", None)
            _call(self.ec2.revoke_security_group_ingress, GroupId=group_id, IpPermissions=[perm])
        missing = sorted(wanted - have)
        if missing:
            _call(
                self.ec2.authorize_security_group_ingress,
                GroupId=group_id,
                IpPermissions=[
                    {
                        "IpProtocol": "tcp",
                        "FromPort": port,
                        "ToPort": port,
                        "IpRanges": [{"CidrIp": c, "Description": "tilehopper proxy clients"} for *_, c in missing],
                    }
                ],
            )

    # -- instances --

    def find_slot(self, slot: str) -> dict[str, Any] | None:
        """The not-terminated instance launched for this slot, if any."""
        for inst in self.describe_job_instances(extra_filters=self._filters(**{TAG_SLOT: slot})):
            return inst
        return None

    def launch(
        self,
        *,
        slot: str,
        generation: int,
        instance_types: Sequence[str],
        image_id: str | None,
        subnet_id: str,
        user_data: str,
        security_group_id: str,
        public_ip: bool = True,
    ) -> Launched:
        """One proxy instance for this slot, exactly once: an instance already tagged with the
        job's uid and this slot is returned instead of launching another (after a crash, or a
        repeated Launch). Instance types are tried in order."""
        existing = self.find_slot(slot)
        if existing is not None:
            return Launched(existing, reused=True, instance_type=str(existing.get("InstanceType", "")))
        if not instance_types:
            raise ValueError("instance_types must name at least one type")
        image = image_id or self.stock_image_id()
        device, size = self._root_device(image)
        name = f"tilehopper-{self.job.name}-{slot}"
        tags = aws_tag_list(self.tags(Role.PROXY, generation, **{TAG_SLOT: slot, "Name": name}))
        refused: list[str] = []
        for instance_type in instance_types:
            try:
                answer = _call(
                    self.ec2.run_instances,
                    ImageId=image,
                    InstanceType=instance_type,
                    MinCount=1,
                    MaxCount=1,
                    UserData=user_data,  # boto3 base64-encodes it
                    # One interface in our group, an encrypted root volume, IMDSv2 with one hop
                    # (a container on the instance cannot reach it), no KeyName: nobody logs in.
                    **hardened_launch_options(
                        root_device=device, root_size_gib=size, subnet_id=subnet_id,
                        security_group_id=security_group_id, public_ip=public_ip,
                    ),
                    # The user-data's scheduled halt then ends the instance: the dead-man switch.
                    InstanceInitiatedShutdownBehavior="terminate",
                    TagSpecifications=[
                        {"ResourceType": "instance", "Tags": tags},
                        {"ResourceType": "volume", "Tags": tags},
                        {"ResourceType": "network-interface", "Tags": tags},
                    ],
                    ClientToken=_client_token(self.job.uid, slot, instance_type),
                )
            except AwsError as exc:
                if exc.code in TRY_NEXT_TYPE:
                    log.info("instance type %s refused (%s); trying the next", instance_type, exc.code)
                    refused.append(instance_type)
                    continue
                raise
            return Launched(
                answer["Instances"][0], reused=False, instance_type=instance_type, refused_types=tuple(refused)
            )
        raise NoCapacityError(
            f"no instance type could be launched: {', '.join(refused)} refused", code="InsufficientInstanceCapacity"
        )

    def describe_job_instances(
        self, *, states: Sequence[str] = NOT_TERMINATED, extra_filters: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        filters = [*(extra_filters or self._filters()), {"Name": "instance-state-name", "Values": list(states)}]
        return [
            inst
            for reservation in _pages(self.ec2, "describe_instances", "Reservations", Filters=filters)
            for inst in reservation.get("Instances", [])
        ]

    def terminate(self, instance_ids: Iterable[str]) -> list[str]:
        """Terminate those of the given instances that belong to this job; returns their ids.
        Ids of other jobs or of no instance are ignored, so a stale id can do no harm."""
        ids = sorted(set(instance_ids))
        if not ids:
            return []
        owned = [
            str(i["InstanceId"])
            for i in self.describe_job_instances(
                extra_filters=[*self._filters(), {"Name": "instance-id", "Values": ids}]
            )
        ]
        if owned:
            _call(self.ec2.terminate_instances, InstanceIds=owned)
        return owned

    def wait_terminated(self, instance_ids: Sequence[str]) -> None:
        if instance_ids:
            waiter = self.ec2.get_waiter("instance_terminated")
            try:
                waiter.wait(
                    InstanceIds=list(instance_ids),
                    WaiterConfig={"Delay": self.waiter_delay, "MaxAttempts": self.waiter_max_attempts},
                )
            except BotoCoreError as exc:  # WaiterError: not terminated in time
                raise TransientAwsError(f"instances not terminated in time: {exc}") from None

    def sweep(self) -> SweepReport:
        return sweep(self.ec2, self.job.uid, waiter=self.wait_terminated, sleep=self._sleep)

    def leftovers(self) -> dict[str, int]:
        return leftovers(self.ec2, self.job.uid)


# --- Sweeps across jobs (end of a job, delete, orphans) -------------------------------------


def _job_resources(ec2: Any, job_uid: str | None) -> dict[str, list[dict[str, Any]]]:
    """Every not-yet-removed resource tilehopper created (for one job, or for all)."""
    filters = tag_filters(job_uid)
    instances = [
        inst
        for reservation in _pages(
            ec2,
            "describe_instances",
            "Reservations",
            Filters=[*filters, {"Name": "instance-state-name", "Values": list(NOT_TERMINATED)}],
        )
        for inst in reservation.get("Instances", [])
    ]
    return {
        "instances": instances,
        "security_groups": list(_pages(ec2, "describe_security_groups", "SecurityGroups", Filters=filters)),
        "key_pairs": list(_pages(ec2, "describe_key_pairs", "KeyPairs", Filters=filters)),
        "addresses": list(_pages(ec2, "describe_addresses", "Addresses", Filters=filters)),
        "images": list(_pages(ec2, "describe_images", "Images", Owners=["self"], Filters=filters)),
        "snapshots": list(_pages(ec2, "describe_snapshots", "Snapshots", OwnerIds=["self"], Filters=filters)),
        "volumes": list(_pages(ec2, "describe_volumes", "Volumes", Filters=filters)),
    }


_ID_KEYS: Final = {
    "instances": "InstanceId",
    "security_groups": "GroupId",
    "key_pairs": "KeyName",
    "addresses": "AllocationId",
    "images": "ImageId",
    "snapshots": "SnapshotId",
    "volumes": "VolumeId",
}


def leftovers(ec2: Any, job_uid: str | None = None) -> dict[str, int]:
    """Counts of what still exists, by kind (not-terminated instances, groups, keys, ...)."""
    return {kind: len(items) for kind, items in _job_resources(ec2, job_uid).items()}


def list_owned_job_uids(ec2: Any) -> set[str]:
    """The uids of every job that still has a resource in this region: the orphan sweep compares
    them with the TileJobs that exist."""
    return set(list_owned_jobs(ec2))


def list_owned_jobs(ec2: Any) -> dict[str, str]:
    """uid -> "<namespace>/<name>" of every job that still has a resource in this region."""
    jobs: dict[str, str] = {}
    for items in _job_resources(ec2, None).values():
        for item in items:
            tags = tags_of(item)
            # Baked images (and their builders and snapshots) belong to ami/, not to a TileJob:
            # they outlive every job and are removed only by `tilehopper-ami delete`.
            if tags.get(TAG_ROLE) in (Role.IMAGE, Role.SNAPSHOT, Role.BUILDER):
                continue
            if tags.get(TAG_JOB_UID):
                jobs[tags[TAG_JOB_UID]] = tags.get(TAG_JOB, "")
    return jobs


def _retry_dependency(fn: Callable[[], Any], *, sleep: Callable[[float], None], attempts: int = 12) -> None:
    # A security group stays "in use" for a little while after its instances terminated.
    for attempt in range(attempts):
        try:
            fn()
            return
        except TransientAwsError as exc:
            if exc.code not in ("DependencyViolation", "InvalidSnapshot.InUse") or attempt == attempts - 1:
                raise
            sleep(min(2.0 * (attempt + 1), 15.0))


def sweep(
    ec2: Any,
    job_uid: str,
    *,
    waiter: Callable[[Sequence[str]], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> SweepReport:
    """Remove everything tagged with this job's uid: instances (and wait until they are
    terminated), addresses, security groups, key pairs, images and their snapshots, volumes.
    Found only by the ownership tags; safe to repeat; errors are collected, not raised, so one
    stuck resource does not keep the others alive."""
    if not job_uid:
        raise ValueError("a sweep needs a job uid: it never sweeps everything")
    report = SweepReport(job_uid=job_uid)
    found = _job_resources(ec2, job_uid)
    for kind, items in found.items():
        report.note(kind, (str(i[_ID_KEYS[kind]]) for i in items), removed=False)

    def attempt(kind: str, ident: str, fn: Callable[[], Any]) -> None:
        try:
            _retry_dependency(fn, sleep=sleep)
            report.note(kind, [ident], removed=True)
        except AwsError as exc:
            if exc.code.endswith(".NotFound"):
                report.note(kind, [ident], removed=True)  # already gone
            else:
                report.errors.append(f"{kind} {ident}: {exc}")

    instance_ids = [str(i["InstanceId"]) for i in found["instances"]]
    if instance_ids:
        try:
            _call(ec2.terminate_instances, InstanceIds=instance_ids)
            if waiter is not None:
                waiter(instance_ids)
            else:
                ec2.get_waiter("instance_terminated").wait(InstanceIds=instance_ids)
            report.note("instances", instance_ids, removed=True)
        except (AwsError, BotoCoreError) as exc:
            report.errors.append(f"instances {', '.join(instance_ids)}: {exc}")
    for addr in found["addresses"]:

        def release(a: dict[str, Any] = addr) -> None:
            if a.get("AssociationId"):
                _call(ec2.disassociate_address, AssociationId=a["AssociationId"])
            _call(ec2.release_address, AllocationId=a["AllocationId"])

        attempt("addresses", str(addr["AllocationId"]), release)
    for group in found["security_groups"]:
        gid = str(group["GroupId"])
        attempt("security_groups", gid, lambda g=gid: _call(ec2.delete_security_group, GroupId=g))
    for key in found["key_pairs"]:
        name = str(key["KeyName"])
        attempt("key_pairs", name, lambda k=name: _call(ec2.delete_key_pair, KeyName=k))
    image_snapshots: set[str] = set()
    for image in found["images"]:
        iid = str(image["ImageId"])
        for mapping in image.get("BlockDeviceMappings", []):
            if mapping.get("Ebs", {}).get("SnapshotId"):
                image_snapshots.add(str(mapping["Ebs"]["SnapshotId"]))
        attempt("images", iid, lambda i=iid: _call(ec2.deregister_image, ImageId=i))
    # An image's snapshots go with it, tagged or not: they were made for it.
    snapshots = {str(s["SnapshotId"]) for s in found["snapshots"]} | image_snapshots
    report.found["snapshots"] = sorted(snapshots)
    for sid in sorted(snapshots):
        attempt("snapshots", sid, lambda s=sid: _call(ec2.delete_snapshot, SnapshotId=s))
    for volume in _job_resources_volumes(ec2, job_uid):
        vid = str(volume["VolumeId"])
        attempt("volumes", vid, lambda v=vid: _call(ec2.delete_volume, VolumeId=v))
    if report.errors:
        log.warning("sweep of job %s left errors: %s", job_uid, "; ".join(report.errors))
    return report


def _job_resources_volumes(ec2: Any, job_uid: str) -> list[dict[str, Any]]:
    # Root volumes go with their instances; what is left after the instances terminated (a
    # volume detached by hand, or not deleted on termination) is removed here.
    return list(
        _pages(
            ec2,
            "describe_volumes",
            "Volumes",
            Filters=[*tag_filters(job_uid), {"Name": "status", "Values": ["available"]}],
        )
    )


# --- Pieces ami/ (the image baker) shares with the launch path ------------------------------


def al2023_parameter(arch: str = "x86_64") -> str:
    """The public SSM parameter naming the newest Amazon Linux 2023 image for an architecture."""
    if arch not in ("x86_64", "arm64"):
        raise ValueError(f"architecture must be x86_64 or arm64, not {arch!r}")
    return AL2023_PARAMETER.replace("x86_64", arch)


def hardened_launch_options(
    *, root_device: str, root_size_gib: int, subnet_id: str, security_group_id: str, public_ip: bool
) -> dict[str, Any]:
    """RunInstances arguments every tilehopper instance gets (the same as JobAws.launch's): one
    interface in our security group, an encrypted root volume that goes with the instance,
    IMDSv2 only with one hop. No KeyName: nobody logs in."""
    return {
        "NetworkInterfaces": [
            {
                "DeviceIndex": 0,
                "SubnetId": subnet_id,
                "Groups": [security_group_id],
                "AssociatePublicIpAddress": public_ip,
                "DeleteOnTermination": True,
            }
        ],
        "BlockDeviceMappings": [
            {
                "DeviceName": root_device,
                "Ebs": {"Encrypted": True, "DeleteOnTermination": True, "VolumeType": "gp3", "VolumeSize": root_size_gib},
            }
        ],
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"},
    }


def network_of(ec2: Any, subnet_id: str | None) -> tuple[str, str]:
    """(vpc id, subnet id) of the given subnet, or of a subnet of the region's default VPC."""
    if subnet_id:
        subnets = _call(ec2.describe_subnets, SubnetIds=[subnet_id]).get("Subnets", [])
    else:
        vpcs = _call(ec2.describe_vpcs, Filters=[{"Name": "isDefault", "Values": ["true"]}]).get("Vpcs", [])
        if not vpcs:
            raise PermanentAwsError("no default VPC in this region: name a subnet", operation="DescribeVpcs")
        vpc_filter = [{"Name": "vpc-id", "Values": [vpcs[0]["VpcId"]]}]
        subnets = _call(ec2.describe_subnets, Filters=vpc_filter).get("Subnets", [])
    if not subnets:
        raise PermanentAwsError(f"no subnet {subnet_id or 'in the default VPC'}", code="InvalidSubnetID.NotFound")
    return str(subnets[0]["VpcId"]), str(subnets[0]["SubnetId"])
