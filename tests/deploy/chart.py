"""Paths of the deploy files and small runners for helm and kubectl, shared by tests/deploy."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tilehopper"
CRD_FILE = CHART / "crds" / "tilejobs.tilehopper.dev.yaml"
EXAMPLES = REPO / "deploy" / "examples"
IAM_POLICY = REPO / "deploy" / "iam-policy.json"


class Helm:
    """The bench's helm binary with its own config/cache/data folders (never the user's)."""

    def __init__(self, binary: Path, home: Path, env: dict[str, str] | None = None) -> None:
        self.binary = binary
        self.env = dict(
            os.environ,
            HELM_CACHE_HOME=str(home / "cache"),
            HELM_CONFIG_HOME=str(home / "config"),
            HELM_DATA_HOME=str(home / "data"),
            **(env or {}),
        )

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=self.env, timeout=120
        )
        if check and out.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}")
        return out

    def template(
        self, *, namespace: str = "tilehopper", release: str = "th", sets: Iterable[str] = (),
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        args = ["template", release, str(CHART), f"--namespace={namespace}"]
        for value in sets:
            args.append(f"--set={value}")
        return self.run(*args, check=check)

    def render(self, **kwargs: Any) -> list[dict[str, Any]]:
        """The rendered manifests as objects (templates only; the CRD is in crds/)."""
        return [doc for doc in yaml.safe_load_all(self.template(**kwargs).stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objects
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or -> valueFrom for variables taken from a Secret or the downward API."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def kubectl_result(
    plane: Any, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """kubectl against a ControlPlane, returning the outcome: rejections are what tests look at."""
    return subprocess.run(
        [str(plane.binaries["kubectl"]), *args],
        input=input, capture_output=True, text=True, env=dict(os.environ, **plane.env), timeout=60,
    )
