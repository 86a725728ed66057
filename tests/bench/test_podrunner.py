"""The podrunner plays the kubelet: the controllers' Pods run as local processes with real RBAC.

One ControlPlane and one PodRunner per module; each test works in its own namespace. The pure
helpers (expansion, path rewriting) have plain unit tests at the top.
"""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from kubernetes import client, config

from tilehopper_bench import kube, procs
from tilehopper_bench.podrunner import (
    PodRunner,
    expand,
    field_value,
    resolve_executable,
    rewrite_paths,
)

MANAGED = {"app.kubernetes.io/managed-by": "tilehopper"}
# hostPath volumes in these tests name this folder; the runner maps it into the test's tmp dir.
HOST_ROOT = "/tilehopper-bench-host"


# ---------------------------------------------------------------------------------------------
# Pure helpers


def test_expand_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$$(A) $(MISSING) $A $", env) == "$(A) $(MISSING) $A $"


def test_rewrite_paths_replaces_whole_mount_prefixes_only() -> None:
    mounts = {"/tiles": Path("/host/t"), "/tiles/cache": Path("/host/c")}
    assert rewrite_paths("--out=/tiles/z20 /tiles", mounts) == "--out=/host/t/z20 /host/t"
    assert rewrite_paths("/tiles/cache/x", mounts) == "/host/c/x"
    assert rewrite_paths("/tilesets /data/tiles", mounts) == "/tilesets /data/tiles"


def test_field_value_answers_for_the_bench_node() -> None:
    pod = {"metadata": {"name": "p", "namespace": "n", "labels": {"k": "v"}}, "spec": {}}
    assert field_value(pod, "metadata.name") == "p"
    assert field_value(pod, "spec.serviceAccountName") == "default"
    assert field_value(pod, "status.podIP") == "127.0.0.1"
    assert field_value(pod, "metadata.labels['k']") == "v"


def test_console_scripts_resolve_next_to_python_first(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    script = tmp_path / "bin" / "tilehopper-consumer"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    fake_python = str(tmp_path / "bin" / "python")
    assert resolve_executable("tilehopper-consumer", python=fake_python) == str(script)
    assert resolve_executable("/usr/local/bin/tilehopper-consumer", python=fake_python) == str(script)
    with pytest.raises(FileNotFoundError):
        resolve_executable("no-such-entry-point-anywhere", python=fake_python)


# ---------------------------------------------------------------------------------------------
# Against the real control plane

bench = pytest.mark.bench


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kube.ControlPlane]:
    control_plane = kube.ControlPlane(tmp_path_factory.mktemp("kube"))
    control_plane.start()
    try:
        yield control_plane
    finally:
        control_plane.stop()


@pytest.fixture(scope="module")
def host_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("host")


@pytest.fixture(scope="module")
def runner(
    plane: kube.ControlPlane, host_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PodRunner]:
    pod_runner = PodRunner(
        plane.kubeconfig, tmp_path_factory.mktemp("podrunner"), host_paths={HOST_ROOT: host_root}
    )
    pod_runner.start()
    try:
        yield pod_runner
    finally:
        pod_runner.stop()
    assert pod_runner.processes() == {}


@pytest.fixture(scope="module")
def api(plane: kube.ControlPlane) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(plane.kubeconfig))


@pytest.fixture
def namespace(api: client.ApiClient) -> str:
    name = f"pr-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    return name


def _container(script: str, *args: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "main",
        "image": "tilehopper:bench",
        "command": [sys.executable, "-c", textwrap.dedent(script)],
        "args": list(args),
        **extra,
    }


def _host_volume(name: str, sub: str) -> dict[str, Any]:
    return {"name": name, "hostPath": {"path": f"{HOST_ROOT}/{sub}", "type": "DirectoryOrCreate"}}


def _field(path: str) -> dict[str, Any]:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def _key_ref(kind: str, name: str, key: str) -> dict[str, Any]:
    return {"valueFrom": {kind: {"name": name, "key": key}}}


def _pod(api: client.ApiClient, namespace: str, name: str) -> client.V1Pod:
    return client.CoreV1Api(api).read_namespaced_pod(name, namespace)


def _pods(api: client.ApiClient, namespace: str) -> list[client.V1Pod]:
    return list(client.CoreV1Api(api).list_namespaced_pod(namespace).items)


@bench
def test_job_writes_to_its_host_path_and_completes(
    runner: PodRunner, api: client.ApiClient, namespace: str, host_root: Path
) -> None:
    write = """
        import sys
        open(sys.argv[1], "w").write("tile bytes")
        print(1)
    """
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "writer"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": MANAGED},
                "spec": {
                    "restartPolicy": "Never",
                    "volumes": [_host_volume("tiles", "job")],
                    "containers": [
                        _container(
                            write,
                            "$(OUT_FILE)",
                            env=[{"name": "OUT_FILE", "value": "/tiles/out.txt"}],
                            volumeMounts=[{"name": "tiles", "mountPath": "/tiles"}],
                        )
                    ],
                },
            },
        },
    }
    batch = client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, job)

    def complete() -> bool:
        status = batch.read_namespaced_job_status("writer", namespace).status
        return any(c.type == "Complete" and c.status == "True" for c in status.conditions or [])

    procs.wait_for(complete, timeout=60, what="Job writer Complete")
    assert (host_root / "job" / "out.txt").read_text() == "tile bytes"
    [pod] = _pods(api, namespace)
    assert pod.spec.node_name == "bench"
    assert pod.status.phase == "Succeeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    # The Job controller could take its tracking finalizer off the finished Pod.
    procs.wait_for(
        lambda: not _pod(api, namespace, pod.metadata.name).metadata.finalizers,
        timeout=30,
        what="job-tracking finalizer removed",
    )
    log = runner.log_dir / f"{namespace}_{pod.metadata.name}_main.log"
    assert log.read_text().strip() == "1"


@bench
def test_env_and_service_account_reach_the_process(
    runner: PodRunner, plane: kube.ControlPlane, api: client.ApiClient, namespace: str, host_root: Path
) -> None:
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}}
    )
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": {"mode": "fast", "color": "blue"}}
    )
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "worker"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "read-configmaps"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "worker-reads-configmaps"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "read-configmaps",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "worker", "namespace": namespace}],
        },
    )
    report = """
        import json, os, sys
        from kubernetes import client, config
        config.load_kube_config()
        core = client.CoreV1Api()
        names = ["PASSWORD", "MODE", "CFG_color", "POD_NAME", "POD_NS", "SA", "POD_IP", "GREETING",
                 "OUT", "KUBECONFIG", "TILEHOPPER_RUNNER_ONLY"]
        out = {"env": {k: os.environ.get(k) for k in names}}
        out["configmaps"] = len(core.list_namespaced_config_map(os.environ["POD_NS"]).items)
        try:
            core.list_namespaced_secret(os.environ["POD_NS"])
            out["secrets"] = "allowed"
        except client.ApiException as error:
            out["secrets"] = error.status
        review = client.AuthenticationV1Api().create_self_subject_review(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        out["user"] = review.status.user_info.username
        json.dump(out, open(os.environ["OUT"], "w"))
    """
    pod = {
        "metadata": {"name": "reporter", "labels": MANAGED},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": "worker",
            "volumes": [_host_volume("out", "env")],
            "containers": [
                _container(
                    report,
                    envFrom=[{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
                    env=[
                        {"name": "PASSWORD", **_key_ref("secretKeyRef", "creds", "password")},
                        {"name": "MODE", **_key_ref("configMapKeyRef", "settings", "mode")},
                        {"name": "POD_NAME", **_field("metadata.name")},
                        {"name": "POD_NS", **_field("metadata.namespace")},
                        {"name": "SA", **_field("spec.serviceAccountName")},
                        {"name": "POD_IP", **_field("status.podIP")},
                        {"name": "GREETING", "value": "hello $(POD_NAME)"},
                        {"name": "OUT", "value": "/out/report.json"},
                    ],
                    volumeMounts=[{"name": "out", "mountPath": "/out"}],
                )
            ],
        },
    }
    core.create_namespaced_pod(namespace, pod)
    result = host_root / "env" / "report.json"
    procs.wait_for(result.exists, timeout=60, what="report.json from the pod")
    procs.wait_for(
        lambda: core.read_namespaced_pod_status("reporter", namespace).status.phase == "Succeeded",
        timeout=30,
        what="reporter Succeeded",
    )
    out = json.loads(result.read_text())
    env = out["env"]
    assert env["PASSWORD"] == "s3cret"
    assert env["MODE"] == "fast"
    assert env["CFG_color"] == "blue"
    assert (env["POD_NAME"], env["POD_NS"], env["SA"], env["POD_IP"]) == (
        "reporter", namespace, "worker", "127.0.0.1"
    )
    assert env["GREETING"] == "hello reporter"
    assert env["OUT"] == str(host_root / "env" / "report.json")
    assert env["KUBECONFIG"] != str(plane.kubeconfig)
    # The ServiceAccount's own RBAC: its Role lets it list ConfigMaps and nothing else.
    assert out["user"] == f"system:serviceaccount:{namespace}:worker"
    assert out["configmaps"] >= 1
    assert out["secrets"] == 403


@bench
def test_deployment_replicas_run_and_scale_to_zero_sends_sigterm(
    runner: PodRunner, api: client.ApiClient, namespace: str, host_root: Path
) -> None:
    consumer = """
        import os, pathlib, signal, sys, time
        folder, name = pathlib.Path(sys.argv[1]), os.environ["POD_NAME"]
        def stop(*_):
            (folder / f"{name}.term").write_text("SIGTERM")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        (folder / f"{name}.pid").write_text(str(os.getpid()))
        while True:
            time.sleep(0.1)
    """
    labels = {**MANAGED, "app.kubernetes.io/name": "consumer"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "consumer"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 20,
                    "volumes": [_host_volume("state", "deploy")],
                    "containers": [
                        _container(
                            consumer,
                            "/state",
                            env=[{"name": "POD_NAME", **_field("metadata.name")}],
                            volumeMounts=[{"name": "state", "mountPath": "/state"}],
                        )
                    ],
                },
            },
        },
    }
    apps = client.AppsV1Api(api)
    apps.create_namespaced_deployment(namespace, deployment)
    folder = host_root / "deploy"
    procs.wait_for(
        lambda: apps.read_namespaced_deployment_status("consumer", namespace).status.ready_replicas == 2,
        timeout=60,
        what="2 ready replicas",
    )
    # Ready comes at process start, the pid file a moment later.
    procs.wait_for(lambda: len(list(folder.glob("*.pid"))) == 2, timeout=30, what="2 pid files")
    pid_files = sorted(folder.glob("*.pid"))
    pids = [int(path.read_text()) for path in pid_files]
    assert all(_alive(pid) for pid in pids)
    names = {path.stem for path in pid_files}
    assert names == {pod.metadata.name for pod in _pods(api, namespace)}
    assert len([key for key in runner.processes() if key.startswith(f"{namespace}/")]) == 2

    apps.patch_namespaced_deployment_scale("consumer", namespace, {"spec": {"replicas": 0}})
    procs.wait_for(lambda: not _pods(api, namespace), timeout=60, what="consumer pods gone")
    assert {path.stem for path in folder.glob("*.term")} == names
    assert not any(_alive(pid) for pid in pids)


@bench
def test_always_restarts_a_crashing_container_and_counts(
    runner: PodRunner, api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    pod = {
        "metadata": {"name": "crasher", "labels": MANAGED},
        "spec": {"containers": [_container("import sys; sys.exit(3)")]},
    }
    core.create_namespaced_pod(namespace, pod)

    def restarted_twice() -> bool:
        [status] = core.read_namespaced_pod_status("crasher", namespace).status.container_statuses
        return status.restart_count >= 2 and status.last_state.terminated.exit_code == 3

    procs.wait_for(restarted_twice, timeout=60, what="crasher restarted twice")
    core.delete_namespaced_pod("crasher", namespace)
    procs.wait_for(lambda: not _pods(api, namespace), timeout=30, what="crasher gone")


@bench
def test_on_failure_restarts_in_place_until_the_job_completes(
    runner: PodRunner, api: client.ApiClient, namespace: str
) -> None:
    flaky = """
        import pathlib, sys
        marker = pathlib.Path(sys.argv[1]) / "tried"
        if not marker.exists():
            marker.write_text("once")
            sys.exit(1)
    """
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "flaky"},
        "spec": {
            "backoffLimit": 3,
            "template": {
                "metadata": {"labels": MANAGED},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "volumes": [{"name": "scratch", "emptyDir": {}}],
                    "containers": [
                        _container(
                            flaky, "/scratch", volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}]
                        )
                    ],
                },
            },
        },
    }
    batch = client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, job)

    def complete() -> bool:
        status = batch.read_namespaced_job_status("flaky", namespace).status
        return any(c.type == "Complete" and c.status == "True" for c in status.conditions or [])

    procs.wait_for(complete, timeout=60, what="Job flaky Complete")
    [pod] = _pods(api, namespace)  # the same Pod: restarted in place, not replaced
    [status] = pod.status.container_statuses
    assert status.restart_count == 1
    assert status.state.terminated.exit_code == 0


@bench
def test_force_deleted_pod_has_its_process_stopped(
    runner: PodRunner, api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "sleeper", "labels": MANAGED},
            "spec": {"containers": [_container("import time; time.sleep(3600)")]},
        },
    )
    key = f"{namespace}/sleeper/main"
    procs.wait_for(lambda: key in runner.processes(), timeout=30, what="sleeper running")
    pid = runner.processes()[key].pid
    core.delete_namespaced_pod("sleeper", namespace, grace_period_seconds=0)
    procs.wait_for(lambda: not _alive(pid), timeout=30, what="sleeper's process stopped")
    # The runner forgets the process once it has reaped it, a moment after the kill.
    procs.wait_for(lambda: key not in runner.processes(), timeout=10, what="sleeper forgotten")


@bench
def test_unknown_entry_point_fails_a_never_pod(
    runner: PodRunner, api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    container = {"name": "main", "image": "tilehopper:bench", "command": ["tilehopper-no-such-command"]}
    pod = {
        "metadata": {"name": "broken", "labels": MANAGED},
        "spec": {"restartPolicy": "Never", "containers": [container]},
    }
    core.create_namespaced_pod(namespace, pod)
    procs.wait_for(
        lambda: core.read_namespaced_pod_status("broken", namespace).status.phase == "Failed",
        timeout=30,
        what="broken Failed",
    )
    [status] = core.read_namespaced_pod_status("broken", namespace).status.container_statuses
    assert status.state.terminated.exit_code == 128
    assert status.state.terminated.reason == "StartError"


@bench
def test_cli_runs_until_sigterm_and_leaves_no_process(
    plane: kube.ControlPlane, api: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    """The CLI form, with its own selector (so the module's runner ignores these Pods)."""
    selector = f"bench-test={namespace}"
    workdir = tmp_path / "cli"
    pid = 0
    cli = procs.start(
        "podrunner-cli",
        [sys.executable, "-m", "tilehopper_bench.podrunner", "--kubeconfig", str(plane.kubeconfig),
         "--workdir", str(workdir), "--namespace", namespace, "--selector", selector],
        log_dir=tmp_path,
        # The runner's own environment must not leak into its Pods.
        env={"KUBECONFIG": str(plane.kubeconfig), "TILEHOPPER_RUNNER_ONLY": "1"},
    )  # fmt: skip
    try:
        sleeper = """
            import json, os, sys, time
            json.dump(dict(os.environ), open(sys.argv[1] + ".partial", "w"))
            os.rename(sys.argv[1] + ".partial", sys.argv[1])
            time.sleep(3600)
        """
        env_dump = tmp_path / "env.json"
        pod = {
            "metadata": {"name": "sleeper", "labels": {"bench-test": namespace}},
            "spec": {"containers": [_container(sleeper, str(env_dump))]},
        }
        client.CoreV1Api(api).create_namespaced_pod(namespace, pod)
        procs.wait_for(env_dump.exists, timeout=60, what="sleeper started", proc=cli)
        seen = json.loads(env_dump.read_text())
        assert "TILEHOPPER_RUNNER_ONLY" not in seen
        assert seen["KUBECONFIG"] != str(plane.kubeconfig)
        pid = int((workdir / "pids" / f"{namespace}_sleeper_main.pid").read_text())
        assert _alive(pid)
    finally:
        cli.stop(sig=signal.SIGTERM, timeout=30)
    assert cli.popen is not None and cli.popen.returncode == 0, cli.tail()
    assert not _alive(pid)
