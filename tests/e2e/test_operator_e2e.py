"""The product's whole path on the bench: chart → operator (under its ServiceAccount) → proxies in
moto with real tinyproxies → generator and consumers run from the operator's own pod templates →
tiles on disk → cleanup. The same path `make demo` takes, at a smaller size.
"""

from __future__ import annotations

import base64
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tilehopper import contracts
from tilehopper_bench import scenario
from tilehopper_bench.stack import Bench
from tilehopper_bench.tileimage import tile_identity
from tilehopper_operator import aws

pytestmark = [pytest.mark.bench, pytest.mark.slow]

NAMESPACE = "tilehopper-e2e"


@pytest.fixture(scope="module")
def deployment(bench: Bench, tmp_path_factory: pytest.TempPathFactory) -> Iterator[scenario.Deployment]:
    workdir = tmp_path_factory.mktemp("e2e")
    dep = scenario.Deployment(bench, NAMESPACE, workdir / "tiles", workdir)
    dep.install()
    dep.start_runner()
    try:
        yield dep
    finally:
        dep.stop()


@pytest.fixture(autouse=True)
def _fresh_tile_server(bench: Bench) -> None:
    bench.tiles.configure(ban_after_requests=0, ban_after_seconds=0, latency_ms=0)
    bench.tiles.reset()


def _job_instances(bench: Bench, uid: str) -> list[dict[str, Any]]:
    answer = scenario.ec2(bench).describe_instances(Filters=aws.tag_filters(uid))
    return [i for r in answer["Reservations"] for i in r["Instances"]]


def _status(job: dict[str, Any]) -> dict[str, Any]:
    return job.get("status") or {}


def _phase_is(*phases: str):  # noqa: ANN202 - a predicate for wait_job
    return lambda job: _status(job).get("phase") in phases


def _rotations(job: dict[str, Any], reason: str) -> int:
    return int((_status(job).get("rotationsByReason") or {}).get(reason, 0))


def _square(x: int, y: int, zoom: int, width: int, height: int) -> dict[str, Any]:
    return {"square": {"x": x, "y": y, "zoom": zoom, "width": width, "height": height}}


def _assert_tiles(tiles_dir: Path, x: int, y: int, zoom: int, width: int, height: int) -> None:
    for tx in range(x, x + width):
        for ty in range(y, y + height):
            path = tiles_dir / contracts.tile_filename(tx, ty, zoom)
            assert path.is_file(), f"missing {path.name}"
            assert tile_identity(path.read_bytes()) == (tx, ty, zoom), f"{path.name} is not that tile"
    leftovers = [p.name for p in tiles_dir.iterdir() if not contracts.TILE_FILE_RE.match(p.name)]
    assert not [n for n in leftovers if n != ".gitkeep"], f"temp files left: {leftovers[:5]}"


def _wait_gone(dep: scenario.Deployment, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while dep.get_job(name) is not None:
        assert time.monotonic() < deadline, f"TileJob {name} still there after {timeout}s"
        time.sleep(1)


def _wait_no_kube_leftovers(dep: scenario.Deployment, name: str, timeout: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        left = scenario.kube_leftovers(dep, name)
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(1)


def test_lifecycle_rotates_by_timer_and_ban_and_leaves_nothing(deployment: scenario.Deployment, bench: Bench) -> None:
    dep, name = deployment, "life"
    x, y, zoom, width, height = 2000, 1300, 12, 40, 30  # 1,200 tiles
    # One download at a time from a slow server: the job outlives several rotations.
    bench.tiles.configure(latency_ms=50)
    dep.apply(scenario.tilejob(name, url_template=bench.env["TILE_URL"], tiles=_square(x, y, zoom, width, height),
                               rotate_every="10s", replicas=1, threads=1))
    # Timer rotations first; then a tile server that bans after a handful of requests.
    dep.wait_job(name, lambda j: _rotations(j, "timer") >= 3, timeout=240)
    bench.tiles.configure(latency_ms=50, ban_after_requests=60)
    dep.wait_job(name, lambda j: _rotations(j, "ban") >= 2, timeout=240)
    bench.tiles.configure(latency_ms=0, ban_after_requests=0)
    job = dep.wait_job(name, _phase_is("Completed", "Failed"), timeout=300)
    status = _status(job)
    assert status["phase"] == "Completed", status
    assert status["total"] == width * height
    assert status["done"] == width * height and status["failed"] == 0
    assert status["progress"] == "100%" and status["tilesSummary"] == f"{width * height}/{width * height}"
    _assert_tiles(dep.tiles_dir, x, y, zoom, width, height)

    # Every generation was served by a proxy that really answered with tiles.
    uid = job["metadata"]["uid"]
    instances = {i["InstanceId"]: i for i in _job_instances(bench, uid)}
    sources = bench.tiles.stats()["sources"]
    for rotation in status["rotationHistory"]:
        address = instances[rotation["to"]]["PrivateIpAddress"]
        assert sources.get(address, {}).get("codes", {}).get("200", 0) > 0, (rotation, address)
    assert "127.0.0.1" not in sources, "a request went to the tile server directly, not through a proxy"
    # One instance per slot: nothing launched twice.
    slots = Counter(aws.tags_of(i).get(contracts.TAG_SLOT) for i in instances.values())
    assert max(slots.values()) == 1, slots
    assert scenario.aws_leftovers(bench, uid) == dict.fromkeys(scenario.aws_leftovers(bench, uid), 0)

    # The printer columns say what the status says.
    table = dep.kubectl("get", "tj", name, "-n", dep.namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "PROGRESS", "TILES", "ACTIVE", "ROTATIONS", "AGE"]
    row = table[1].split()
    assert row[:4] == [name, "Completed", "100%", f"{width * height}/{width * height}"]
    # A completed job has no active proxy: that column is empty, so count from the end.
    assert int(row[-2]) == status["rotations"] >= 5

    # No credential in any log: pods (operator, generator, consumers) and the proxies.
    secret = dep.kubectl("get", "secret", f"{name}-proxy-credentials", "-n", dep.namespace,
                         "-o", "jsonpath={.data.password}").stdout
    password = base64.b64decode(secret).decode()
    logs = dep.all_logs() + "".join(p.read_text(errors="replace") for p in bench.workdir.rglob("*.log"))
    assert password and password not in logs

    dep.delete_job(name)
    _wait_gone(dep, name)
    assert not any(_wait_no_kube_leftovers(dep, name).values())
    assert not any(scenario.aws_leftovers(bench, uid).values())


def test_delete_mid_run_removes_everything(deployment: scenario.Deployment, bench: Bench) -> None:
    dep, name = deployment, "cut"
    bench.tiles.configure(latency_ms=50)
    dep.apply(scenario.tilejob(name, url_template=bench.env["TILE_URL"], tiles=_square(100, 100, 10, 40, 40),
                               replicas=1, threads=2))
    job = dep.wait_job(name, lambda j: _status(j).get("phase") == "Running" and _status(j).get("active"), timeout=120)
    uid = job["metadata"]["uid"]
    assert len([i for i in _job_instances(bench, uid) if i["State"]["Name"] != "terminated"]) >= 1
    dep.delete_job(name)
    _wait_gone(dep, name)
    assert not any(scenario.aws_leftovers(bench, uid).values())
    assert not any(_wait_no_kube_leftovers(dep, name).values())


def test_operator_killed_mid_rotation_resumes_without_duplicates(deployment: scenario.Deployment, bench: Bench) -> None:
    dep, name = deployment, "crash"
    bench.tiles.configure(latency_ms=50)  # one download at a time: the job outlives both kills
    dep.apply(scenario.tilejob(name, url_template=bench.env["TILE_URL"], tiles=_square(300, 300, 10, 30, 30),
                               rotate_every="10s", replicas=1, threads=1))

    def launching(job: dict[str, Any]) -> bool:
        pool_state = _status(job).get("pool") or {}
        return any(i["phase"] in ("launching", "booting", "checking") for i in pool_state.get("instances", []))

    kills = 0
    for _ in range(2):
        # At a launch (the start, then the one that follows a rotation): SIGKILL, as a crash would.
        dep.wait_job(name, lambda j: launching(j) and _status(j).get("generation", 0) >= kills, timeout=120, interval=0.2)
        pid = dep.operator_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        kills += 1
        # The podrunner restarts the container, as a kubelet would.
        deadline = time.monotonic() + 60
        while dep.operator_pid() in (None, pid):
            assert time.monotonic() < deadline, "operator not restarted"
            time.sleep(0.2)
        dep.wait_job(name, lambda j: (_status(j).get("rotations") or 0) >= kills, timeout=120)
    job = dep.wait_job(name, _phase_is("Completed", "Failed"), timeout=300)
    assert _status(job)["phase"] == "Completed"
    uid = job["metadata"]["uid"]
    instances = _job_instances(bench, uid)
    slots = Counter(aws.tags_of(i).get(contracts.TAG_SLOT) for i in instances)
    assert max(slots.values()) == 1, f"a slot was launched twice: {slots}"
    assert not any(scenario.aws_leftovers(bench, uid).values())
    _assert_tiles(dep.tiles_dir, 300, 300, 10, 30, 30)
    dep.delete_job(name)


def test_job_deleted_while_operator_down_is_cleaned_when_it_returns(deployment: scenario.Deployment, bench: Bench) -> None:
    dep, name = deployment, "ghost"
    bench.tiles.configure(latency_ms=50)
    dep.apply(scenario.tilejob(name, url_template=bench.env["TILE_URL"], tiles=_square(500, 500, 10, 40, 40),
                               replicas=1, threads=2))
    job = dep.wait_job(name, lambda j: bool(_status(j).get("active")), timeout=120)
    uid = job["metadata"]["uid"]
    dep.scale_operator(0)
    deadline = time.monotonic() + 60
    while dep.operator_pid() is not None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    dep.kubectl("delete", "tilejob", name, "-n", dep.namespace, "--wait=false")
    time.sleep(2)
    held = dep.get_job(name)
    assert held is not None and held["metadata"].get("deletionTimestamp"), "the finalizer must hold the job"
    assert any(scenario.aws_leftovers(bench, uid).values()), "nothing cleaned while the operator is down"
    dep.scale_operator(1)
    _wait_gone(dep, name, timeout=180)
    assert not any(scenario.aws_leftovers(bench, uid).values())


def test_orphans_of_a_vanished_job_are_swept(deployment: scenario.Deployment, bench: Bench) -> None:
    uid = f"vanished-{uuid.uuid4().hex[:8]}"
    job_aws = aws.JobAws(aws.JobIdentity(uid, deployment.namespace, "vanished"), ec2=scenario.ec2(bench))
    job_aws.ensure_security_group(vpc_id=bench.env["TILEHOPPER_BENCH_VPC_ID"], allowed_cidrs=["127.0.0.0/8"], port=8888)
    assert scenario.aws_leftovers(bench, uid)["security_groups"] == 1
    deadline = time.monotonic() + 90  # the bench's operator sweeps every 10 s
    while any(scenario.aws_leftovers(bench, uid).values()):
        assert time.monotonic() < deadline, "orphan not swept"
        time.sleep(1)


def test_two_jobs_in_parallel_stay_apart(deployment: scenario.Deployment, bench: Bench) -> None:
    dep = deployment
    shapes = {"alpha": (700, 700, 11, 20, 15), "beta": (900, 900, 11, 20, 15)}
    for name, shape in shapes.items():
        dep.apply(scenario.tilejob(name, url_template=bench.env["TILE_URL"], tiles=_square(*shape), replicas=1, threads=4))
    uids = {}
    for name, shape in shapes.items():
        job = dep.wait_job(name, _phase_is("Completed", "Failed"), timeout=240)
        assert _status(job)["phase"] == "Completed"
        assert _status(job)["done"] == shape[3] * shape[4]
        _assert_tiles(dep.tiles_dir, *shape)
        uids[name] = job["metadata"]["uid"]
    # Each job's instances carry its own name; neither touched the other's.
    for name, uid in uids.items():
        instances = _job_instances(bench, uid)
        assert instances and all(aws.tags_of(i)[contracts.TAG_JOB] == f"{dep.namespace}/{name}" for i in instances)
        assert not any(scenario.aws_leftovers(bench, uid).values())
    for name in shapes:
        dep.delete_job(name)
