"""The TileJob CRD on a real apiserver: bad specs fail at `kubectl apply` naming the field.

Every bad spec below is the good spec with one change, so a rejection can only come from that change;
each must name the field it is about. The good spec is accepted with the documented defaults.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.deploy.chart import EXAMPLES, kubectl_result
from tilehopper import contracts
from tilehopper_bench.kube import ControlPlane

pytestmark = pytest.mark.bench

# Never fetched by these tests (nothing runs the job), but kept on loopback all the same.
LOCAL_URL = "http://127.0.0.1:8080/vt?lyrs=s&x={x}&y={y}&z={z}"

GOOD: dict[str, Any] = {
    "tiles": {
        "bbox": {"west": 24.08, "south": 56.93, "east": 24.16, "north": 56.97},
        "zooms": {"min": 15, "max": 16},
    },
    "source": {"urlTemplate": LOCAL_URL},
}

Change = Callable[[dict[str, Any]], None]


def set_path(path: str, value: Any) -> Change:
    """A change that sets spec.<path> (dots; a number indexes a list)."""

    def change(spec: dict[str, Any]) -> None:
        keys = path.split(".")
        node: Any = spec
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[keys[-1]] = copy.deepcopy(value)  # each test gets its own copy

    return change


def drop(path: str) -> Change:
    def change(spec: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node[key]
        del node[last]

    return change


def both(*changes: Change) -> Change:
    def change(spec: dict[str, Any]) -> None:
        for each in changes:
            each(spec)

    return change


SQUARE = {"x": 268396, "y": 390159, "zoom": 20, "width": 900, "height": 900}
as_square = both(drop("tiles.bbox"), drop("tiles.zooms"), set_path("tiles.square", dict(SQUARE)))
as_list = both(drop("tiles.bbox"), drop("tiles.zooms"), set_path("tiles.list", [{"x": 1, "y": 2, "zoom": 3}]))

# (case id, change to the good spec, text the error must contain: the field it names)
BAD_SPECS: list[tuple[str, Change, str]] = [
    ("no-tiles", drop("tiles"), "spec.tiles"),
    ("no-selection", both(drop("tiles.bbox"), drop("tiles.zooms")), "spec.tiles"),
    ("bbox-and-square", set_path("tiles.square", dict(SQUARE)), "exactly one of bbox, square or list"),
    ("bbox-without-zooms", drop("tiles.zooms"), "spec.tiles.zooms"),
    ("square-with-zooms", both(as_square, set_path("tiles.zooms", {"min": 1, "max": 2})), "spec.tiles.zooms"),
    ("west-not-below-east", set_path("tiles.bbox.west", 24.2), "spec.tiles.bbox.west"),
    ("south-not-below-north", set_path("tiles.bbox.south", 57.5), "spec.tiles.bbox.south"),
    ("north-beyond-mercator", set_path("tiles.bbox.north", 86.0), "spec.tiles.bbox.north"),
    ("west-beyond-180", set_path("tiles.bbox.west", -181.0), "spec.tiles.bbox.west"),
    ("zooms-reversed", set_path("tiles.zooms", {"min": 17, "max": 15}), "spec.tiles.zooms.min"),
    ("zoom-above-24", set_path("tiles.zooms.max", 25), "spec.tiles.zooms.max"),
    ("square-width-zero", both(as_square, set_path("tiles.square.width", 0)), "spec.tiles.square.width"),
    ("square-height-huge", both(as_square, set_path("tiles.square.height", 5000)), "spec.tiles.square.height"),
    ("square-past-the-edge", both(as_square, set_path("tiles.square.x", 1048000)), "spec.tiles.square.x"),
    ("square-y-past-the-edge", both(as_square, set_path("tiles.square.y", 1048000)), "spec.tiles.square.y"),
    ("list-x-not-in-zoom", both(as_list, set_path("tiles.list.0.x", 8)), "spec.tiles.list[0].x"),
    ("list-negative-y", both(as_list, set_path("tiles.list.0.y", -1)), "spec.tiles.list[0].y"),
    ("list-empty", both(as_list, set_path("tiles.list", [])), "spec.tiles.list"),
    ("url-without-y", set_path("source.urlTemplate", "http://127.0.0.1/vt?x={x}&z={z}"), "spec.source.urlTemplate"),
    ("url-not-http", set_path("source.urlTemplate", "ftp://127.0.0.1/{z}/{x}/{y}.png"), "spec.source.urlTemplate"),
    ("replicas-zero", set_path("consumers.replicas", 0), "spec.consumers.replicas"),
    ("replicas-too-many", set_path("consumers.replicas", 65), "spec.consumers.replicas"),
    ("threads-too-many", set_path("consumers.threads", 129), "spec.consumers.threads"),
    ("region-malformed", set_path("proxy.region", "Frankfurt"), "spec.proxy.region"),
    ("no-instance-types", set_path("proxy.instanceTypes", []), "spec.proxy.instanceTypes"),
    ("instance-type-twice", set_path("proxy.instanceTypes", ["t3.micro", "t3.micro"]), "spec.proxy.instanceTypes"),
    ("image-not-an-ami", set_path("proxy.imageId", "ubuntu-22.04"), "spec.proxy.imageId"),
    ("rotate-every-prose", set_path("proxy.rotateEvery", "5 minutes"), "spec.proxy.rotateEvery"),
    ("rotate-every-too-short", set_path("proxy.rotateEvery", "5s"), "spec.proxy.rotateEvery"),
    ("ban-status-not-an-error", set_path("proxy.banStatusCodes", [200]), "spec.proxy.banStatusCodes"),
    ("standby-zero", set_path("proxy.standby", 0), "spec.proxy.standby"),
    ("standby-four", set_path("proxy.standby", 4), "spec.proxy.standby"),
    ("cidr-malformed", set_path("proxy.allowedCidrs", ["10.0.0.300/8"]), "spec.proxy.allowedCidrs"),
    ("cidr-open-to-all", set_path("proxy.allowedCidrs", ["0.0.0.0/0"]), "spec.proxy.allowedCidrs"),
    ("cidr-open-to-all-v6", set_path("proxy.allowedCidrs", ["::/0"]), "spec.proxy.allowedCidrs"),
    ("lifetime-not-beyond-rotation", set_path("proxy.maxLifetime", "10m"), "spec.proxy.maxLifetime"),
    ("lifetime-over-a-day", set_path("proxy.maxLifetime", "25h"), "spec.proxy.maxLifetime"),
    ("address-mode-unknown", set_path("proxy.addressMode", "internal"), "spec.proxy.addressMode"),
    ("subnet-malformed", set_path("proxy.subnetId", "my-subnet"), "spec.proxy.subnetId"),
    ("port-privileged", set_path("proxy.port", 80), "spec.proxy.port"),
    ("max-tiles-zero", set_path("maxTiles", 0), "spec.maxTiles"),
    ("unknown-field", set_path("proxy.rotate_every", "5m"), "rotate_every"),
]


def tilejob(name: str, spec: dict[str, Any]) -> str:
    body = {
        "apiVersion": f"{contracts.API_GROUP}/{contracts.API_VERSION}",
        "kind": contracts.TILEJOB_KIND,
        "metadata": {"name": name},
        "spec": spec,
    }
    return json.dumps(body)


def test_at_least_fifteen_distinct_bad_specs() -> None:
    assert len({case for case, _, _ in BAD_SPECS}) == len(BAD_SPECS) >= 15


@pytest.mark.parametrize(("case", "change", "field"), BAD_SPECS, ids=[c for c, _, _ in BAD_SPECS])
def test_bad_spec_is_rejected_naming_the_field(
    tilejob_crd: ControlPlane, namespace: str, case: str, change: Change, field: str
) -> None:
    spec = copy.deepcopy(GOOD)
    change(spec)
    name = f"bad-{case}"
    result = kubectl_result(tilejob_crd, "apply", "-n", namespace, "-f", "-", input=tilejob(name, spec))
    assert result.returncode != 0, f"accepted: {spec}"
    assert field in result.stderr, result.stderr
    # Rejected by the apiserver, so nothing was stored.
    listed = tilejob_crd.kubectl("get", "tilejobs", "-n", namespace, "-o", "name")
    assert name not in listed


def test_good_spec_is_accepted_with_defaults(tilejob_crd: ControlPlane, namespace: str) -> None:
    spec = {"tiles": copy.deepcopy(GOOD["tiles"])}  # no source, consumers or proxy at all
    tilejob_crd.kubectl("apply", "-n", namespace, "-f", "-", input=tilejob("defaults", spec))
    stored = json.loads(tilejob_crd.kubectl("get", "tj", "defaults", "-n", namespace, "-o", "json"))["spec"]
    assert stored["source"] == {"urlTemplate": contracts.DEFAULT_URL_TEMPLATE}
    assert stored["consumers"] == {"replicas": 4, "threads": 16}
    assert stored["proxy"] == {
        "region": "eu-central-1",
        "instanceTypes": ["t3.micro", "t2.micro"],
        "imageId": "",
        "rotateEvery": "5m",
        "maxLifetime": "1h",
        "banStatusCodes": [403],
        "standby": 1,
        "allowedCidrs": [],
        "port": contracts.PROXY_PORT,
    }
    # addressMode stays unset: the operator's TILEHOPPER_ADDRESS_MODE decides.
    assert "addressMode" not in stored["proxy"]


@pytest.mark.parametrize(
    "change",
    [
        as_square,  # the original project's 900 x 900 square at zoom 20
        as_list,
        both(as_square, set_path("tiles.square", {"x": 0, "y": 0, "zoom": 0, "width": 1, "height": 1})),
        set_path("tiles.bbox", {"west": -180, "south": -85.05, "east": 180, "north": 85.05}),
        set_path("source.urlTemplate", "https://127.0.0.1:8443/{z}/{x}/{y}.png"),
        set_path("proxy", {
            "rotateEvery": "20s", "maxLifetime": "10m", "standby": 3, "addressMode": "private",
            "allowedCidrs": ["127.1.0.0/16", "2001:db8::/32"], "banStatusCodes": [403, 429],
            "imageId": "ami-0123456789abcdef0", "subnetId": "subnet-0123abcd", "port": 3128,
            "instanceTypes": ["t4g.nano"], "region": "us-gov-west-1",
        }),
        set_path("maxTiles", 2000),
    ],
    ids=["square", "list", "one-tile-world", "whole-world", "https-port", "every-proxy-field", "max-tiles"],
)
def test_other_good_specs_are_accepted(tilejob_crd: ControlPlane, namespace: str, change: Change) -> None:
    spec = copy.deepcopy(GOOD)
    change(spec)
    name = f"good-{uuid.uuid4().hex[:6]}"
    result = kubectl_result(tilejob_crd, "apply", "-n", namespace, "-f", "-", input=tilejob(name, spec))
    assert result.returncode == 0, result.stderr


def test_every_example_is_accepted(tilejob_crd: ControlPlane, namespace: str) -> None:
    examples = sorted(EXAMPLES.glob("*.yaml"))
    assert examples, "deploy/examples has no TileJob"
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == contracts.TILEJOB_KIND:
                result = kubectl_result(
                    tilejob_crd, "apply", "--dry-run=server", "-n", namespace, "-f", "-",
                    input=json.dumps(doc),
                )
                assert result.returncode == 0, f"{path.name}: {result.stderr}"


def test_printer_columns_short_name_and_kopf_state(tilejob_crd: ControlPlane, namespace: str) -> None:
    tilejob_crd.kubectl("apply", "-n", namespace, "-f", "-", input=tilejob("shown", copy.deepcopy(GOOD)))
    status = {
        "phase": "Running",
        "total": 2000,
        "done": 840,
        "failed": 0,
        "missing": 1160,
        "ratePerSecond": 41.5,
        "eta": "28s",
        "progress": "42%",
        "tilesSummary": "840/2000",
        "active": {"instanceId": "i-0abc", "address": "127.1.0.4:8888", "generation": 3,
                   "since": "2026-01-01T00:00:00Z"},
        "standby": [{"instanceId": "i-0def", "address": "127.1.0.5:8888", "state": "healthy"}],
        "rotations": 2,
        "rotationsByReason": {"timer": 1, "ban": 1},
        "conditions": [{"type": "Ready", "status": "True", "reason": "ProxyActive", "message": "ok"}],
        # kopf keeps its own handler state here: the schema must not prune it.
        "kopf": {"progress": {"create_fn": {"retries": 1, "success": False}}},
    }
    tilejob_crd.kubectl(
        "patch", "tilejob", "shown", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )
    table = tilejob_crd.kubectl("get", "tj", "shown", "-n", namespace)
    header, row = table.strip().splitlines()
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "TILES", "ACTIVE", "ROTATIONS", "AGE"]
    assert row.split()[:6] == ["shown", "Running", "42%", "840/2000", "i-0abc", "2"]
    wide = tilejob_crd.kubectl("get", "tj", "shown", "-n", namespace, "-o", "wide")
    assert "127.1.0.4:8888" in wide and "28s" in wide

    stored = json.loads(tilejob_crd.kubectl("get", "tj", "shown", "-n", namespace, "-o", "json"))
    assert stored["status"]["kopf"] == status["kopf"]
    assert stored["status"]["active"]["generation"] == 3


def test_status_phase_is_an_enum(tilejob_crd: ControlPlane, namespace: str) -> None:
    tilejob_crd.kubectl("apply", "-n", namespace, "-f", "-", input=tilejob("phased", copy.deepcopy(GOOD)))
    result = kubectl_result(
        tilejob_crd, "patch", "tilejob", "phased", "-n", namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": {"phase": "Exploded"}}),
    )
    assert result.returncode != 0 and "status.phase" in result.stderr, result.stderr



def test_status_with_nulls_and_extra_fields_is_accepted(tilejob_crd: ControlPlane, namespace: str) -> None:
    """The operator writes None for what is not known yet (no active proxy, no ETA) and more fields."""
    tilejob_crd.kubectl("apply", "-n", namespace, "-f", "-", input=tilejob("early", copy.deepcopy(GOOD)))
    status = {
        "phase": "Provisioning", "active": None, "eta": None, "generation": 0, "remaining": 296,
        "standby": [{"instanceId": "i-1", "address": "", "generation": 0, "since": None, "phase": "launching"}],
        "rotationHistory": [{"reason": "ban", "from": "i-0", "to": "i-1", "generation": 1, "at": None}],
        "conditions": [{"type": "Ready", "status": "False", "reason": "NoHealthyProxy", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }
    result = kubectl_result(
        tilejob_crd, "patch", "tilejob", "early", "-n", namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": status}),
    )
    assert result.returncode == 0, result.stderr
    stored = json.loads(tilejob_crd.kubectl("get", "tj", "early", "-n", namespace, "-o", "json"))["status"]
    assert stored["phase"] == "Provisioning" and stored["remaining"] == 296
    assert stored["standby"][0]["phase"] == "launching"
    assert stored["rotationHistory"][0]["reason"] == "ban"
