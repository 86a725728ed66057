"""Session-wide bench for the tests: one set of real processes, isolated per test by names.

Every test that needs a stand-in takes the `bench` fixture (or one of its parts). The bench is started
once per session on free loopback ports in a temporary folder, never against a developer's cluster: its
kubeconfig is its own and must point at 127.0.0.1.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tilehopper_bench.stack import Bench, process_env


def _assert_test_cluster(kubeconfig: str) -> None:
    import yaml

    doc = yaml.safe_load(Path(kubeconfig).read_text())
    for cluster in doc.get("clusters", []):
        server = cluster["cluster"]["server"]
        if not server.startswith("https://127."):
            raise RuntimeError(f"refusing to test against a cluster that is not the bench's: {server}")


@pytest.fixture(scope="session")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    workdir = tmp_path_factory.mktemp("bench")
    instance = Bench(workdir)
    instance.start()
    _assert_test_cluster(instance.env["KUBECONFIG"])
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def bench_env(bench: Bench) -> dict[str, str]:
    """os.environ plus the bench's variables: what a subprocess of a test should get."""
    return process_env(bench.env)


@pytest.fixture
def unique() -> str:
    """A short name part unique to this test: namespaces, queues and jobs never collide."""
    return uuid.uuid4().hex[:8]
