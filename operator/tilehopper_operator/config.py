"""The operator's configuration: one typed object read from TILEHOPPER_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

PREFIX = "TILEHOPPER_"


@dataclass(frozen=True)
class OperatorConfig:
    # Namespace to watch; empty watches every namespace.
    namespace_scope: str = ""
    # Image of the generator and consumer pods (the same image as the operator's).
    image: str = "tilehopper:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    # RabbitMQ, as the pods reach it (copied into a per-job Secret, never into a pod spec).
    amqp_url: str = "amqp://guest:guest@rabbitmq:5672/%2F"
    # RabbitMQ's management API, as the operator reaches it: queue counts for progress.
    rabbitmq_api_url: str = "http://guest:guest@rabbitmq:15672"
    # Where consumers write tiles: a host path (kind maps it to ./tiles) or a PVC name.
    tiles_hostpath: str = ""
    tiles_pvc: str = ""
    # AWS placement when the TileJob does not say: subnet (its VPC follows) and address mode.
    subnet_id: str = ""
    address_mode: str = "public"
    # The region when the TileJob does not say.
    default_region: str = "eu-central-1"
    # Seconds between two reconcile steps of a job's pool when nothing wakes it earlier.
    tick_seconds: float = 1.0
    # Seconds an old proxy keeps serving in-flight requests after a switch.
    drain_seconds: float = 2.0
    # Seconds a new instance has to pass its health check before it is replaced.
    health_timeout_seconds: float = 300.0
    # Seconds between two sweeps for AWS resources whose TileJob no longer exists.
    orphan_sweep_seconds: float = 300.0
    # The public address the operator's traffic leaves from, when allowedCidrs is empty in
    # public mode (found at start when empty).
    egress_cidr: str = ""
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorConfig:
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(PREFIX + f.name.upper())
            if raw is None:
                continue
            if f.type in ("float", float):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        config = cls(**values)
        if config.address_mode not in ("public", "private"):
            raise ValueError(f"{PREFIX}ADDRESS_MODE must be public or private, got {config.address_mode!r}")
        return config
