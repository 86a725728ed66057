"""`tilehopper-ami bake|list|delete|leftovers`: the proxy image (AMI) a TileJob can name in spec.proxy.imageId.

AWS credentials and the region come from boto3's own chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
the original task's AWS_SERVER_PUBLIC_KEY/AWS_SERVER_SECRET_KEY, a profile, or an instance or pod
identity); AWS_ENDPOINT_URL points it at another endpoint (the bench's moto).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from importlib import metadata

from tilehopper_ami import images
from tilehopper_operator import aws
from tilehopper_operator.__main__ import _accept_original_credentials

DEFAULT_REGION = "eu-central-1"


def default_version() -> str:
    return metadata.version("tilehopper")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilehopper-ami", description=__doc__.splitlines()[0])
    parser.add_argument("--region", default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                        or DEFAULT_REGION)
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL") or None, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    bake = commands.add_parser("bake", help="bake the image of a version (reused when it exists)")
    bake.add_argument("--version", default=default_version(), help="default: the tilehopper package version")
    bake.add_argument("--arch", choices=sorted(images.DEFAULT_TYPES), default="x86_64")
    bake.add_argument("--instance-type", help="the builder's type; default: t3.micro (x86_64) / t4g.micro (arm64)")
    bake.add_argument("--subnet-id", help="default: a subnet of the region's default VPC")
    bake.add_argument("--base-image-id", help="default: Amazon Linux 2023 from the public SSM parameter")
    bake.add_argument("--no-public-ip", dest="public_ip", action="store_false",
                      help="the subnet reaches the package repositories through a NAT or endpoint")
    bake.add_argument("--timeout", type=float, default=1800.0, help="seconds for the builder's install")
    bake.add_argument("--poll", type=float, default=15.0, help="seconds between state checks")

    listing = commands.add_parser("list", help="list our images")
    listing.add_argument("--version")
    listing.add_argument("--json", action="store_true")

    delete = commands.add_parser("delete", help="deregister an image and delete its snapshots")
    which = delete.add_mutually_exclusive_group(required=True)
    which.add_argument("--image-id")
    which.add_argument("--version", help="every image of this version, and whatever a dead bake left")

    left = commands.add_parser("leftovers", help="count what tilehopper created and is still there (exit 1 if any)")
    left.add_argument("--job-uid", help="only this TileJob's (its metadata.uid)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "bake" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    _accept_original_credentials()
    ec2, ssm = aws.make_clients(region=args.region, endpoint_url=args.endpoint_url)
    try:
        if args.command == "bake":
            image = images.bake(
                ec2=ec2, ssm=ssm, version=args.version, arch=args.arch, instance_type=args.instance_type,
                subnet_id=args.subnet_id, base_image_id=args.base_image_id, public_ip=args.public_ip,
                timeout_s=args.timeout, poll_seconds=args.poll,
            )
            print(image.image_id)
        elif args.command == "list":
            found = images.list_images(ec2, version=args.version)
            if args.json:
                print(json.dumps([asdict(i) for i in found], indent=2))
            for image in [] if args.json else found:
                print(f"{image.image_id}\t{image.version}\t{image.arch}\t{image.state}\t{image.name}")
        elif args.command == "leftovers":
            counts = aws.leftovers(ec2, args.job_uid)
            for kind, count in counts.items():
                print(f"{kind}\t{count}")
            return 1 if any(counts.values()) else 0
        elif args.image_id:
            images.delete_image(ec2, args.image_id)
        else:
            report = images.delete_version(ec2, args.version, poll_seconds=5.0)
            print(f"removed: {report.summary()}")
            if not report.clean:
                print("\n".join(report.errors), file=sys.stderr)
                return 1
    except aws.AwsError as exc:
        print(f"tilehopper-ami: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
