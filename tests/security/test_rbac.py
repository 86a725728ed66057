"""A job's consumers, by their ServiceAccount token on the bench apiserver (real RBAC), reach only
their own proxy ConfigMap and Secret, and write only their ban report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tilehopper.contracts import ProxyAnnouncement, ProxyState, ban_patch
from tilehopper_bench.stack import Bench
from tilehopper_operator import workloads
from tilehopper_operator.workloads import JobRef, Kube, names

pytestmark = pytest.mark.bench


def status_of(call: Callable[[], Any]) -> int:
    try:
        call()
    except ApiException as exc:
        return int(exc.status)
    return 200


def make_job(kube: Kube, namespace: str, name: str, owner: dict[str, Any]) -> JobRef:
    """What the operator writes for one job, through its own builders and Kube.ensure."""
    job = JobRef(namespace=namespace, name=name, uid=f"uid-{name}")
    announcement = ProxyAnnouncement(url="http://127.1.0.9:8888", generation=1, instance_id="i-1",
                                     state=ProxyState.ACTIVE, ban_status_codes=frozenset({403}))
    for kind, body in (
        ("ServiceAccount", workloads.consumer_service_account(job)),
        ("Role", workloads.consumer_role(job)),
        ("RoleBinding", workloads.consumer_role_binding(job)),
        ("Secret", workloads.credentials_secret(job, f"user-{name}", f"password-of-{name}")),
        ("ConfigMap", workloads.proxy_configmap(job, announcement)),
        ("ConfigMap", workloads.ban_configmap(job)),
    ):
        assert kube.ensure(kind, body, owner)
    return job


def test_a_consumer_reads_only_its_own_job_and_writes_only_its_ban_report(
    bench: Bench, unique: str, tmp_path: Path
) -> None:
    admin = config.new_client_from_config(config_file=bench.env["KUBECONFIG"])
    kube = Kube(admin)
    namespace = f"rbac-{unique}"
    kube.core.create_namespace({"metadata": {"name": namespace}})
    try:
        # A stand-in owner, so the objects are adopted the operator's way and the GC keeps them.
        owner = kube.core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
        owner_doc = {"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "owner", "namespace": namespace, "uid": owner.metadata.uid}}
        a = make_job(kube, namespace, "job-a", owner_doc)
        b = make_job(kube, namespace, "job-b", owner_doc)
        kubeconfig = bench.kube.service_account_kubeconfig(namespace, names(a)["consumer"], tmp_path / "consumer-a")
        as_a = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        na, nb = names(a), names(b)

        # Its own job: the Secret, the proxy ConfigMap (get and watch), the ban report (patch).
        secret = as_a.read_namespaced_secret(na["credentials"], namespace)
        assert secret.data and "password" in secret.data
        assert as_a.read_namespaced_config_map(na["proxy"], namespace).data["generation"] == "1"
        assert status_of(lambda: as_a.list_namespaced_config_map(
            namespace, field_selector=f"metadata.name={na['proxy']}", watch=False)) == 200
        assert status_of(lambda: as_a.patch_namespaced_config_map(
            na["bans"], namespace, ban_patch(1, "consumer-a-1", 403, "now"))) == 200
        assert kube.read_bans(a) == {"generation-1": "403 by consumer-a-1 at now"}

        # Nothing of the other job.
        assert status_of(lambda: as_a.read_namespaced_secret(nb["credentials"], namespace)) == 403
        assert status_of(lambda: as_a.read_namespaced_config_map(nb["proxy"], namespace)) == 403
        assert status_of(lambda: as_a.patch_namespaced_config_map(
            nb["bans"], namespace, ban_patch(1, "consumer-a-1", 403, "now"))) == 403

        # No write beyond its ban report: not its proxy ConfigMap, not its Secret, nothing new.
        assert status_of(lambda: as_a.patch_namespaced_config_map(
            na["proxy"], namespace, {"data": {"url": "http://evil:8888"}})) == 403
        assert status_of(lambda: as_a.patch_namespaced_secret(
            na["credentials"], namespace, {"stringData": {"password": "x"}})) == 403
        assert status_of(lambda: as_a.delete_namespaced_config_map(na["bans"], namespace)) == 403
        assert status_of(lambda: as_a.create_namespaced_config_map(
            namespace, {"metadata": {"name": f"new-{unique}"}})) == 403
        assert status_of(lambda: as_a.create_namespaced_secret(
            namespace, {"metadata": {"name": f"new-{unique}"}})) == 403
        assert status_of(lambda: as_a.create_namespaced_pod(
            namespace, {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}})) == 403
        # And no listing of Secrets, which would show every job's credentials at once.
        assert status_of(lambda: as_a.list_namespaced_secret(namespace)) == 403
        assert status_of(lambda: as_a.list_namespace()) == 403
    finally:
        kube.core.delete_namespace(namespace)
