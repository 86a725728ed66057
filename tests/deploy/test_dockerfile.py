"""The Dockerfile, checked without docker (there is none here): pinned base, non-root, entry points.

The chart's operator Deployment and the operator's pod templates run the image's three commands;
each must be a console script of pyproject.toml whose module and function exist.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from typing import Any

from tests.deploy.chart import REPO

DOCKERFILE = REPO / "Dockerfile"
ENTRY_POINTS = ("tilehopper-operator", "tilehopper-generator", "tilehopper-consumer")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def build_args() -> dict[str, str]:
    return dict(
        arg.split("=", 1) for word, arg in instructions() if word == "ARG" and "=" in arg
    )


def test_base_image_is_pinned_python_311_slim() -> None:
    args = build_args()
    bases = [arg.split()[0] for word, arg in instructions() if word == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        # A full patch version and a Debian release: the same bytes next month.
        assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", image), image


def test_runs_as_a_numeric_non_root_user() -> None:
    users = [arg for word, arg in instructions() if word == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    # The chart's operator pod runs as this same uid.
    assert int(uid) == 10001


def test_installs_the_project_not_editable() -> None:
    runs = " ".join(arg for word, arg in instructions() if word == "RUN")
    assert "pip wheel" in runs or "pip install ." in runs
    assert " -e " not in runs and "--editable" not in runs


def test_copies_every_package_folder_pyproject_builds() -> None:
    copied = {arg.split()[0].rstrip("/") for word, arg in instructions() if word == "COPY" and "--from" not in arg}
    package_dirs = pyproject()["tool"]["setuptools"]["package-dir"].values()
    tops = {Path(path).parts[0] for path in package_dirs}
    assert tops <= copied, tops - copied
    assert "pyproject.toml" in copied
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert not (copied & ignored), copied & ignored


def test_entry_points_exist() -> None:
    scripts = pyproject()["project"]["scripts"]
    package_dirs = pyproject()["tool"]["setuptools"]["package-dir"]
    for name in ENTRY_POINTS:
        assert name in scripts, name
        module, _, function = scripts[name].partition(":")
        package, _, rest = module.partition(".")
        path = REPO / package_dirs[package] / (rest.replace(".", "/") + ".py" if rest else "__init__.py")
        assert path.is_file(), f"{name}: {path.relative_to(REPO)} is missing"
        defined = {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}
        assert function in defined, f"{name}: {module} defines no {function}()"


def test_default_command_is_an_entry_point() -> None:
    (cmd,) = [arg for word, arg in instructions() if word == "CMD"]
    assert cmd.strip('[]"') in ENTRY_POINTS
