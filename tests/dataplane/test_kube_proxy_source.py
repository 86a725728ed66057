"""The consumer's Kubernetes proxy source against the bench's real kube-apiserver."""

from __future__ import annotations

import base64
import queue
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tilehopper.contracts import (
    ProxyAnnouncement,
    ProxyState,
    ban_configmap_name,
    banned_generations,
    proxy_configmap_name,
    proxy_secret_name,
)
from tilehopper_consumer.proxy import KubernetesProxySource, ProxyView

pytestmark = pytest.mark.bench


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tilehopper_bench import kube

    control_plane = kube.ControlPlane(tmp_path_factory.mktemp("kube-proxy-source"))
    control_plane.start()
    try:
        yield control_plane
    finally:
        control_plane.stop()


def announcement(generation: int, url: str, state: str = ProxyState.ACTIVE) -> dict[str, str]:
    return ProxyAnnouncement(url=url, generation=generation, instance_id=f"i-{generation}", state=state,
                             ban_status_codes=frozenset({403})).to_data()


def test_watch_secret_and_ban_report(plane: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes import client, config

    monkeypatch.setenv("KUBECONFIG", str(plane.kubeconfig))
    api = client.CoreV1Api(config.new_client_from_config(config_file=str(plane.kubeconfig)))
    namespace, job = f"ps-{uuid.uuid4().hex[:8]}", "riga"
    api.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    secret = {"username": base64.b64encode(b"proxyuser").decode(), "password": base64.b64encode(b"s3cret-pw").decode()}
    api.create_namespaced_secret(namespace, client.V1Secret(metadata=client.V1ObjectMeta(name=proxy_secret_name(job)),
                                                            data=secret))
    api.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=proxy_configmap_name(job)), data=announcement(1, "http://127.0.1.1:8888")))

    views: queue.Queue[ProxyView] = queue.Queue()
    source = KubernetesProxySource(namespace=namespace, job=job)
    source.start(views.put)
    try:
        first = views.get(timeout=10)
        assert (first.generation, first.url, first.usable) == (1, "http://127.0.1.1:8888", True)
        assert (first.username, first.password) == ("proxyuser", "s3cret-pw")

        api.patch_namespaced_config_map(proxy_configmap_name(job), namespace,
                                        {"data": announcement(2, "http://127.0.1.2:8888")})
        second = views.get(timeout=10)
        assert (second.generation, second.url) == (2, "http://127.0.1.2:8888")

        api.patch_namespaced_config_map(proxy_configmap_name(job), namespace,
                                        {"data": announcement(3, "", ProxyState.PAUSED)})
        assert not views.get(timeout=10).usable

        # The ban ConfigMap does not exist yet: the first report creates it, the rest merge.
        source.report_ban(generation=2, status=403, reporter="pod-a")
        source.report_ban(generation=2, status=403, reporter="pod-b")
        bans = api.read_namespaced_config_map(ban_configmap_name(job), namespace).data
        assert banned_generations(bans) == {2}
        assert len(bans) == 1
    finally:
        source.stop()
        api.delete_namespace(namespace)
