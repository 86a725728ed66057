"""The bench's control plane behaves like a real cluster where the operator relies on it.

One ControlPlane per module (starting one takes seconds); every test uses its own names, so the tests
do not depend on each other's order.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tilehopper_bench import kube

pytestmark = pytest.mark.bench

GROUP, VERSION, PLURAL = "bench.tilehopper.test", "v1", "widgets"
FINALIZER = f"{GROUP}/hold"

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1, "maximum": 10},
                                    "colour": {"type": "string", "enum": ["red", "blue"]},
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not running; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kube.ControlPlane]:
    control_plane = kube.ControlPlane(tmp_path_factory.mktemp("kube"))
    control_plane.start()
    pids = {name: proc.pid for name, proc in control_plane.procs.items()}
    try:
        yield control_plane
    finally:
        # Stop it the way `make bench-down` does (a fresh object reading the pid files), then make
        # sure by our own handles, so a bug in the first path never leaves a process behind.
        kube.ControlPlane(control_plane.workdir).stop()
        left = [name for name, pid in pids.items() if _alive(pid)]
        control_plane.stop()
        assert not left, f"still running after stop via pid files: {left}"


@pytest.fixture(scope="module")
def api(plane: kube.ControlPlane) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(plane.kubeconfig))


@pytest.fixture(scope="module")
def widgets(api: client.ApiClient) -> client.CustomObjectsApi:
    extensions = client.ApiextensionsV1Api(api)
    extensions.create_custom_resource_definition(WIDGET_CRD)
    _eventually(
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in extensions.read_custom_resource_definition(f"{PLURAL}.{GROUP}").status.conditions
            or []
        ),
        what="CRD established",
    )
    return client.CustomObjectsApi(api)


def _eventually(check: Callable[[], Any], *, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.2)


def _gone(read: Callable[[], Any]) -> bool:
    try:
        read()
    except ApiException as error:
        if error.status == 404:
            return True
        raise
    return False


def _status_of(call: Callable[[], Any]) -> int:
    try:
        call()
    except ApiException as error:
        return int(error.status)
    return 200


def _widget(name: str, spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": name, **metadata},
        "spec": spec,
    }


def test_binaries_report_the_pinned_versions(plane: kube.ControlPlane) -> None:
    kubernetes_version = kube.pinned_version("k8s.io/kubernetes")
    reported = json.loads(plane.kubectl("version", "--output=json"))
    assert reported["serverVersion"]["gitVersion"] == kubernetes_version
    assert reported["clientVersion"]["gitVersion"] == kubernetes_version
    versions = kube.versions(plane.binaries)
    assert kube.pinned_version("helm.sh/helm/v4") in versions["helm"]
    assert kube.pinned_version("go.etcd.io/etcd/server/v3").lstrip("v") in versions["etcd"]


def test_env_points_at_the_admin_kubeconfig_and_the_built_binaries(plane: kube.ControlPlane) -> None:
    assert plane.env["KUBECONFIG"] == str(plane.kubeconfig)
    bin_dir = Path(plane.env["TILEHOPPER_BENCH_BIN"])
    assert {path.name for path in bin_dir.iterdir()} >= set(kube.BINARIES)
    assert "PATH" not in plane.env
    # The admin is system:masters, so it may do anything.
    assert plane.kubectl("auth", "can-i", "*", "*", "--all-namespaces").strip() == "yes"


def test_custom_object_create_patch_watch_and_finalized_delete(
    widgets: client.CustomObjectsApi,
) -> None:
    namespace, name = "default", "held"
    created = widgets.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, _widget(name, {"size": 2}, finalizers=[FINALIZER])
    )
    widgets.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": {"size": 5, "colour": "blue"}}
    )
    seen = []
    for event in watch.Watch().stream(
        widgets.list_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        resource_version=created["metadata"]["resourceVersion"],
        timeout_seconds=20,
    ):
        seen.append((event["type"], event["object"]["spec"]))
        if event["type"] == "MODIFIED":
            break
    assert seen == [("MODIFIED", {"size": 5, "colour": "blue"})]

    def read() -> dict[str, Any]:
        return dict(widgets.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))

    widgets.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    held = read()
    assert held["metadata"]["deletionTimestamp"]
    assert held["metadata"]["finalizers"] == [FINALIZER]
    time.sleep(1)  # the finalizer really holds it, not just for a moment
    assert read()["metadata"]["finalizers"] == [FINALIZER]

    widgets.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"finalizers": None}}
    )
    _eventually(lambda: _gone(read), what="widget deleted once its finalizer is removed")


@pytest.mark.parametrize(
    "spec",
    [{"size": 11}, {"size": 0}, {"size": "big"}, {"size": 3, "colour": "green"}, {"colour": "red"}],
    ids=["too-big", "too-small", "not-a-number", "colour-not-in-enum", "size-missing"],
)
def test_schema_rejects_a_bad_widget(widgets: client.CustomObjectsApi, spec: dict[str, Any]) -> None:
    with pytest.raises(ApiException) as rejected:
        widgets.create_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, _widget("bad", spec)
        )
    assert rejected.value.status == 422


def test_schema_accepts_a_good_widget(widgets: client.CustomObjectsApi) -> None:
    widgets.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, _widget("good", {"size": 10, "colour": "red"})
    )
    widgets.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "good")


def _owned_by(items: list[Any], owner_uid: str) -> list[Any]:
    return [
        item
        for item in items
        if any(ref.uid == owner_uid for ref in item.metadata.owner_references or [])
    ]


def test_deployment_gets_a_replicaset_and_pods(api: client.ApiClient) -> None:
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    labels = {"app": "bench-deployment"}
    deployment = apps.create_namespaced_deployment(
        "default",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "bench-deployment"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    # Never pulled: the bench has no kubelet, Pods only get created.
                    "spec": {"containers": [{"name": "main", "image": "registry.invalid/none:1"}]},
                },
            },
        },
    )
    replica_sets = _eventually(
        lambda: _owned_by(
            apps.list_namespaced_replica_set("default", label_selector="app=bench-deployment").items,
            deployment.metadata.uid,
        ),
        what="ReplicaSet owned by the Deployment",
    )
    assert len(replica_sets) == 1
    pods = _eventually(
        lambda: (
            found
            if len(
                found := _owned_by(
                    core.list_namespaced_pod("default", label_selector="app=bench-deployment").items,
                    replica_sets[0].metadata.uid,
                )
            )
            == 2
            else None
        ),
        what="two Pods owned by the ReplicaSet",
    )
    # No scheduler and no kubelet: the Pods exist and stay Pending.
    assert {pod.status.phase for pod in pods} == {"Pending"}
    apps.delete_namespaced_deployment(
        "bench-deployment", "default", propagation_policy="Foreground"
    )


def test_job_gets_a_pod(api: client.ApiClient) -> None:
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    batch.create_namespaced_job(
        "default",
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "bench-job"},
            "spec": {
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "main", "image": "registry.invalid/none:1"}],
                    }
                }
            },
        },
    )
    _eventually(
        lambda: core.list_namespaced_pod(
            "default", label_selector="batch.kubernetes.io/job-name=bench-job"
        ).items,
        what="Pod of the Job",
    )
    batch.delete_namespaced_job("bench-job", "default", propagation_policy="Background")


def test_deleting_an_owner_deletes_its_dependents(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    owner = core.create_namespaced_config_map(
        "default", {"metadata": {"name": "gc-owner"}, "data": {"role": "owner"}}
    )
    core.create_namespaced_config_map(
        "default",
        {
            "metadata": {
                "name": "gc-dependent",
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "name": "gc-owner",
                        "uid": owner.metadata.uid,
                    }
                ],
            },
            "data": {"role": "dependent"},
        },
    )
    core.create_namespaced_config_map("default", {"metadata": {"name": "gc-bystander"}})
    core.delete_namespaced_config_map("gc-owner", "default")
    _eventually(
        lambda: _gone(lambda: core.read_namespaced_config_map("gc-dependent", "default")),
        what="dependent collected after its owner was deleted",
    )
    # Only the dependent went: the garbage collector is not just deleting everything.
    assert core.read_namespaced_config_map("gc-bystander", "default").metadata.name
    core.delete_namespaced_config_map("gc-bystander", "default")


def test_service_account_token_authenticates_and_rbac_decides(
    plane: kube.ControlPlane, api: client.ApiClient, tmp_path: Path
) -> None:
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    namespace = "rbac-check"
    core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})

    kubeconfig = plane.service_account_kubeconfig(namespace, "reader", tmp_path / "reader")
    as_reader = config.new_client_from_config(config_file=str(kubeconfig))
    review = client.AuthenticationV1Api(as_reader).create_self_subject_review({})
    assert review.status.user_info.username == f"system:serviceaccount:{namespace}:reader"

    reader = client.CoreV1Api(as_reader)
    assert _status_of(lambda: reader.list_namespaced_config_map(namespace)) == 403

    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "read-configmaps"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader-reads-configmaps"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "read-configmaps",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    # The RBAC authorizer reads roles through an informer: a grant takes effect a moment later.
    _eventually(
        lambda: _status_of(lambda: reader.list_namespaced_config_map(namespace)) == 200,
        what="list allowed after Role + RoleBinding",
    )
    # Exactly what was granted: not other verbs, resources or namespaces.
    assert _status_of(lambda: reader.list_namespaced_secret(namespace)) == 403
    assert _status_of(lambda: reader.list_namespaced_config_map("default")) == 403
    assert (
        _status_of(
            lambda: reader.create_namespaced_config_map(namespace, {"metadata": {"name": "nope"}})
        )
        == 403
    )
    core.delete_namespace(namespace)


def test_helm_installs_and_uninstalls_a_chart(plane: kube.ControlPlane, tmp_path: Path) -> None:
    chart = tmp_path / "probe-chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        # The constraint proves the server reports a real version, not v0.0.0-master.
        'apiVersion: v2\nname: probe-chart\nversion: 0.1.0\nkubeVersion: ">=1.30.0-0"\n'
    )
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-probe\n"
        "data:\n  answer: {{ .Values.answer | quote }}\n"
    )
    (chart / "values.yaml").write_text("answer: '42'\n")
    env = dict(
        os.environ,
        **plane.env,
        HELM_CACHE_HOME=str(tmp_path / "helm-cache"),
        HELM_CONFIG_HOME=str(tmp_path / "helm-config"),
        HELM_DATA_HOME=str(tmp_path / "helm-data"),
    )
    helm = str(plane.binaries["helm"])

    def run(*args: str) -> None:
        subprocess.run([helm, *args], env=env, check=True, capture_output=True, timeout=120)

    run("install", "probe", str(chart), "--namespace=default", "--wait", "--timeout=60s")
    made = json.loads(plane.kubectl("get", "configmap", "probe-probe", "--output=json"))
    assert made["data"] == {"answer": "42"}
    run("uninstall", "probe", "--namespace=default", "--wait")
    assert "NotFound" in subprocess.run(
        [str(plane.binaries["kubectl"]), "get", "configmap", "probe-probe"],
        env=env,
        capture_output=True,
        text=True,
    ).stderr
