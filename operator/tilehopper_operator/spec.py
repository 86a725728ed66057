"""The TileJob spec as typed values. The CRD schema validates and defaults; this only reads."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tilehopper.contracts import DEFAULT_URL_TEMPLATE, PROXY_PORT

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | int | float) -> float:
    """Seconds in a Go-style duration: "5m", "20s", "1h30m"."""
    if isinstance(text, (int, float)):
        return float(text)
    text = text.strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r} (use e.g. 20s, 5m, 1h)")
    return sum(float(n) * _UNIT[u] for n, u in parts)


@dataclass(frozen=True)
class ProxySpec:
    region: str
    instance_types: tuple[str, ...]
    image_id: str
    rotate_every_s: float
    ban_status_codes: frozenset[int]
    standby: int
    allowed_cidrs: tuple[str, ...]
    max_lifetime_s: float
    address_mode: str
    subnet_id: str
    port: int


@dataclass(frozen=True)
class JobSpec:
    tiles: dict[str, Any]
    url_template: str
    replicas: int
    threads: int
    proxy: ProxySpec

    @classmethod
    def from_body(cls, spec: dict[str, Any], *, default_region: str, default_mode: str, default_subnet: str) -> JobSpec:
        source = spec.get("source") or {}
        consumers = spec.get("consumers") or {}
        proxy = spec.get("proxy") or {}
        return cls(
            tiles=dict(spec.get("tiles") or {}),
            url_template=source.get("urlTemplate") or DEFAULT_URL_TEMPLATE,
            replicas=int(consumers.get("replicas", 4)),
            threads=int(consumers.get("threads", 16)),
            proxy=ProxySpec(
                region=proxy.get("region") or default_region,
                instance_types=tuple(proxy.get("instanceTypes") or ("t3.micro", "t2.micro")),
                image_id=proxy.get("imageId") or "",
                rotate_every_s=parse_duration(proxy.get("rotateEvery", "5m")),
                ban_status_codes=frozenset(int(c) for c in proxy.get("banStatusCodes") or (403,)),
                standby=int(proxy.get("standby", 1)),
                allowed_cidrs=tuple(proxy.get("allowedCidrs") or ()),
                max_lifetime_s=parse_duration(proxy.get("maxLifetime", "1h")),
                address_mode=proxy.get("addressMode") or default_mode,
                subnet_id=proxy.get("subnetId") or default_subnet,
                port=int(proxy.get("port", PROXY_PORT)),
            ),
        )
