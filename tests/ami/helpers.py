"""What the image tests share: bench clients and the stand-in for the builder's own poweroff.

moto runs no user-data, so nothing inside a builder ever powers it off; BuilderGuest plays that
last line of the builder's user-data (`poweroff`, shutdown behaviour stop) once the builder runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tilehopper.contracts import TAG_ROLE, Role
from tilehopper_ami import images
from tilehopper_bench.stack import Bench
from tilehopper_operator import aws


def clients(bench: Bench, recorder: aws.ApiCallRecorder | None = None) -> tuple[Any, Any]:
    env = bench.env
    return aws.make_clients(
        region=env["AWS_DEFAULT_REGION"], endpoint_url=env["AWS_ENDPOINT_URL"],
        access_key_id=env["AWS_ACCESS_KEY_ID"], secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        recorder=recorder, max_attempts=2,
    )


def builders(ec2: Any, version: str, states: tuple[str, ...] = aws.NOT_TERMINATED) -> list[dict[str, Any]]:
    filters = [*aws.tag_filters(images.image_uid(version), **{TAG_ROLE: Role.BUILDER}),
               {"Name": "instance-state-name", "Values": list(states)}]
    return [i for r in ec2.describe_instances(Filters=filters)["Reservations"] for i in r["Instances"]]


def group_ids(instance: dict[str, Any]) -> list[str]:
    """The instance's security groups (moto lists them only on the network interface when the
    launch named them there, as tilehopper's launches do)."""
    found = [g["GroupId"] for g in instance.get("SecurityGroups", [])]
    found += [g["GroupId"] for eni in instance.get("NetworkInterfaces", []) for g in eni.get("Groups", [])]
    return sorted(set(found))


@contextmanager
def builder_guest(bench: Bench, version: str, *, install_ok: bool = True) -> Iterator[list[dict[str, Any]]]:
    """While inside, every running builder of this version powers itself off (install_ok) or
    never does (a failed install). Yields the builders it saw, as described while running (plus IngressWhileRunning and VolumesWhileRunning: both go with the builder)."""
    ec2, _ = clients(bench)
    seen: list[dict[str, Any]] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(0.1):
            for instance in builders(ec2, version, ("running",)):
                if instance["InstanceId"] not in {s["InstanceId"] for s in seen}:
                    # Its security groups' ingress rules now, while they still exist.
                    groups = group_ids(instance)
                    described = ec2.describe_security_groups(GroupIds=groups)["SecurityGroups"]
                    instance["IngressWhileRunning"] = [p for g in described for p in g["IpPermissions"]]
                    volumes = ec2.describe_volumes(
                        Filters=[{"Name": "attachment.instance-id", "Values": [instance["InstanceId"]]}])
                    instance["VolumesWhileRunning"] = volumes["Volumes"]
                    seen.append(instance)
                if install_ok:
                    ec2.stop_instances(InstanceIds=[instance["InstanceId"]])

    thread = threading.Thread(target=run, name=f"builder-guest-{version}", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=10)
