"""Fixtures of the deploy tests: the bench's helm and kubectl, and a control plane of their own.

The binaries come from the bench (built from the Go modules pinned in tools/bench-bin). The control
plane is started once for the tests in this folder that need an apiserver; it is the bench's own
(127.0.0.1), never a developer's cluster.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.chart import CRD_FILE, Helm
from tilehopper_bench import kube


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    # A shell that sourced .bench/env names the built binaries' folder; else build or find them.
    folder = os.environ.get("TILEHOPPER_BENCH_BIN")
    binary = Path(folder) / "helm" if folder else kube.ensure_binaries()["helm"]
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kube.ControlPlane]:
    plane = kube.ControlPlane(tmp_path_factory.mktemp("deploy-kube"))
    plane.start()
    try:
        assert plane.server.startswith("https://127."), plane.server
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def cluster_helm(helm: Helm, control_plane: kube.ControlPlane) -> Helm:
    """helm pointed at the bench's apiserver."""
    return Helm(helm.binary, Path(helm.env["HELM_CACHE_HOME"]).parent, env=control_plane.env)


@pytest.fixture(scope="session")
def tilejob_crd(control_plane: kube.ControlPlane) -> kube.ControlPlane:
    """The control plane with the chart's CRD file applied and established."""
    control_plane.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/tilejobs.tilehopper.dev"
    )
    return control_plane


@pytest.fixture
def namespace(control_plane: kube.ControlPlane) -> str:
    name = f"deploy-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    return name

