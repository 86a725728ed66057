"""The wire contracts shared by the generator, the consumer and the operator.

Each contract is defined here once and imported everywhere (design.md, "Contracts"). Nothing in
this module talks to RabbitMQ, Kubernetes or AWS: it only names things and encodes messages.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

API_GROUP: Final = "tilehopper.dev"
API_VERSION: Final = "v1alpha1"
TILEJOB_PLURAL: Final = "tilejobs"
TILEJOB_KIND: Final = "TileJob"

# The highest zoom any tile source we know serves; x and y must lie below 2**zoom.
MAX_ZOOM: Final = 24


# --- Queue messages ---------------------------------------------------------------------------


class MalformedMessage(ValueError):
    """A queue message that is not a tile: the consumer dead-letters it instead of crashing."""


@dataclass(frozen=True, order=True, slots=True)
class Tile:
    x: int
    y: int
    zoom: int

    @property
    def filename(self) -> str:
        return tile_filename(self.x, self.y, self.zoom)


def encode_tile(tile: Tile) -> bytes:
    """The original producer's format: {"x": int, "y": int, "zoom": int}."""
    return b'{"x":%d,"y":%d,"zoom":%d}' % (tile.x, tile.y, tile.zoom)


def decode_tile(body: bytes) -> Tile:
    """Parse a queue message; extra fields are ignored, anything else is MalformedMessage."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedMessage("not a JSON object")
    values: dict[str, int] = {}
    for field in ("x", "y", "zoom"):
        value = doc.get(field)
        # bool is an int in Python; a tile coordinate is never true/false.
        if not isinstance(value, int) or isinstance(value, bool):
            raise MalformedMessage(f"field {field!r} must be an integer, got {value!r}")
        values[field] = value
    tile = Tile(**values)
    problem = tile_problem(tile)
    if problem:
        raise MalformedMessage(problem)
    return tile


def tile_problem(tile: Tile) -> str | None:
    """Why a tile does not exist in the Web-Mercator pyramid, or None when it does."""
    if not 0 <= tile.zoom <= MAX_ZOOM:
        return f"zoom must be within 0..{MAX_ZOOM}, got {tile.zoom}"
    limit = 1 << tile.zoom
    for field, value in (("x", tile.x), ("y", tile.y)):
        if not 0 <= value < limit:
            return f"{field} must be within 0..{limit - 1} at zoom {tile.zoom}, got {value}"
    return None


# --- Files ------------------------------------------------------------------------------------

TILE_FILE_RE: Final = re.compile(r"^(\d+)_(\d+)_(\d+)\.png$")


def tile_filename(x: int, y: int, zoom: int) -> str:
    """tiles/<x>_<y>_<zoom>.png, as the user asked."""
    return f"{x}_{y}_{zoom}.png"


def parse_tile_filename(name: str) -> Tile | None:
    match = TILE_FILE_RE.match(name)
    if not match:
        return None
    x, y, zoom = (int(g) for g in match.groups())
    return Tile(x, y, zoom)


# --- Queues -----------------------------------------------------------------------------------


def queue_name(namespace: str, job: str) -> str:
    return f"tilehopper.{namespace}.{job}"


# Header the consumer sets on a dead-lettered message: why it gave up on the tile.
DEAD_LETTER_REASON_HEADER: Final = "x-tilehopper-reason"


# --- Kubernetes objects the operator writes and the consumers read ----------------------------

LABEL_JOB: Final = f"{API_GROUP}/job"
LABEL_ROLE: Final = f"{API_GROUP}/role"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "tilehopper"


def proxy_configmap_name(job: str) -> str:
    return f"{job}-proxy"


def proxy_secret_name(job: str) -> str:
    return f"{job}-proxy-credentials"


def ban_configmap_name(job: str) -> str:
    return f"{job}-bans"


class ProxyState:
    ACTIVE: Final = "active"
    PAUSED: Final = "paused"


# Keys of the <job>-proxy ConfigMap.
CM_URL: Final = "url"  # http://host:port, never with credentials
CM_GENERATION: Final = "generation"  # grows at every switch
CM_INSTANCE_ID: Final = "instanceId"
CM_STATE: Final = "state"  # ProxyState
CM_BAN_STATUS_CODES: Final = "banStatusCodes"  # comma-separated, e.g. "403"

# Keys of the <job>-proxy-credentials Secret.
SECRET_USERNAME: Final = "username"
SECRET_PASSWORD: Final = "password"


@dataclass(frozen=True, slots=True)
class ProxyAnnouncement:
    """What the <job>-proxy ConfigMap says; parsed the same way by every reader."""

    url: str
    generation: int
    instance_id: str
    state: str
    ban_status_codes: frozenset[int]

    @property
    def usable(self) -> bool:
        return self.state == ProxyState.ACTIVE and bool(self.url)

    def to_data(self) -> dict[str, str]:
        return {
            CM_URL: self.url,
            CM_GENERATION: str(self.generation),
            CM_INSTANCE_ID: self.instance_id,
            CM_STATE: self.state,
            CM_BAN_STATUS_CODES: ",".join(str(c) for c in sorted(self.ban_status_codes)),
        }

    @classmethod
    def from_data(cls, data: dict[str, str] | None) -> ProxyAnnouncement:
        data = data or {}
        codes = frozenset(int(c) for c in data.get(CM_BAN_STATUS_CODES, "403").split(",") if c.strip())
        return cls(
            url=data.get(CM_URL, ""),
            generation=int(data.get(CM_GENERATION, "0") or 0),
            instance_id=data.get(CM_INSTANCE_ID, ""),
            state=data.get(CM_STATE, ProxyState.PAUSED),
            ban_status_codes=codes,
        )


# --- Ban reports ------------------------------------------------------------------------------
# A consumer reports "generation G got a ban" by merge-patching one key, ban_key(G), into the
# <job>-bans ConfigMap. Every consumer that sees the ban writes the same key, so a thousand
# reports for G are one fact; the operator rotates only when the key names its current
# generation, so a report for an old G causes nothing. Consumers' RBAC allows exactly this one
# patch, on this one object.

BAN_KEY_PREFIX: Final = "generation-"


def ban_key(generation: int) -> str:
    return f"{BAN_KEY_PREFIX}{generation}"


def ban_patch(generation: int, reporter: str, status: int, at: str) -> dict[str, Any]:
    return {"data": {ban_key(generation): f"{status} by {reporter} at {at}"}}


def banned_generations(data: dict[str, str] | None) -> set[int]:
    found = set()
    for key in data or {}:
        if key.startswith(BAN_KEY_PREFIX) and key[len(BAN_KEY_PREFIX) :].isdigit():
            found.add(int(key[len(BAN_KEY_PREFIX) :]))
    return found


# --- AWS ownership tags -----------------------------------------------------------------------
# Every AWS resource the product creates carries these; every sweep finds resources only by them.

TAG_MANAGED_BY: Final = f"{API_GROUP}/managed-by"
TAG_JOB_UID: Final = f"{API_GROUP}/job-uid"
TAG_JOB: Final = f"{API_GROUP}/job"  # <namespace>/<name>
TAG_ROLE: Final = f"{API_GROUP}/role"
TAG_GENERATION: Final = f"{API_GROUP}/generation"
TAG_SLOT: Final = f"{API_GROUP}/slot"  # the launch's idempotency key, unique within a job


class Role:
    PROXY: Final = "proxy"
    SECURITY_GROUP: Final = "security-group"
    IMAGE: Final = "image"
    SNAPSHOT: Final = "snapshot"
    BUILDER: Final = "image-builder"


def ownership_tags(
    *, job_uid: str, namespace: str, name: str, role: str, generation: int | None = None
) -> dict[str, str]:
    tags = {
        TAG_MANAGED_BY: MANAGED_BY,
        TAG_JOB_UID: job_uid,
        TAG_JOB: f"{namespace}/{name}",
        TAG_ROLE: role,
    }
    if generation is not None:
        tags[TAG_GENERATION] = str(generation)
    return tags


def aws_tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


# --- Defaults the user can see ----------------------------------------------------------------

DEFAULT_URL_TEMPLATE: Final = "http://mt0.google.com/vt?lyrs=s&x={x}&y={y}&z={z}"
PROXY_PORT: Final = 8888
