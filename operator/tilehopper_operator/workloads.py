"""The Kubernetes objects the operator writes for a TileJob, and the one place that writes them.

Every object is adopted by its TileJob (kopf.adopt: owner reference, labels, namespace), so deleting
the TileJob lets the garbage collector remove them all; only AWS needs the finalizer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException

from tilehopper import contracts
from tilehopper.contracts import ProxyAnnouncement
from tilehopper_operator.config import OperatorConfig
from tilehopper_operator.spec import JobSpec

log = logging.getLogger(__name__)

TILES_MOUNT = "/tiles"
CONSUMER = "consumer"
GENERATOR = "generator"


@dataclass(frozen=True)
class JobRef:
    namespace: str
    name: str
    uid: str

    @property
    def queue(self) -> str:
        return contracts.queue_name(self.namespace, self.name)


def names(job: JobRef) -> dict[str, str]:
    return {
        "proxy": contracts.proxy_configmap_name(job.name),
        "bans": contracts.ban_configmap_name(job.name),
        "credentials": contracts.proxy_secret_name(job.name),
        "amqp": f"{job.name}-amqp",
        "consumer": f"{job.name}-consumer",
        "consumers": f"{job.name}-consumers",
        "generator": f"{job.name}-generator",
    }


def _meta(job: JobRef, name: str, role: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": {
            contracts.LABEL_JOB: job.name,
            contracts.LABEL_ROLE: role,
            contracts.LABEL_MANAGED_BY: contracts.MANAGED_BY,
            "app.kubernetes.io/name": "tilehopper",
            "app.kubernetes.io/component": role,
            "app.kubernetes.io/instance": job.name,
        },
    }


def proxy_configmap(job: JobRef, announcement: ProxyAnnouncement) -> dict[str, Any]:
    return {"metadata": _meta(job, names(job)["proxy"], "proxy"), "data": announcement.to_data()}


def ban_configmap(job: JobRef) -> dict[str, Any]:
    return {"metadata": _meta(job, names(job)["bans"], "ban-report"), "data": {}}


def credentials_secret(job: JobRef, username: str, password: str) -> dict[str, Any]:
    return {
        "metadata": _meta(job, names(job)["credentials"], "proxy-credentials"),
        "type": "Opaque",
        "stringData": {contracts.SECRET_USERNAME: username, contracts.SECRET_PASSWORD: password},
    }


def amqp_secret(job: JobRef, url: str) -> dict[str, Any]:
    return {"metadata": _meta(job, names(job)["amqp"], "amqp"), "type": "Opaque", "stringData": {"url": url}}


def consumer_service_account(job: JobRef) -> dict[str, Any]:
    return {"metadata": _meta(job, names(job)["consumer"], CONSUMER), "automountServiceAccountToken": True}


def consumer_role(job: JobRef) -> dict[str, Any]:
    """Each job's consumers read only their proxy ConfigMap and Secret and patch only their ban report."""
    n = names(job)
    return {
        "metadata": _meta(job, n["consumer"], CONSUMER),
        "rules": [
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [n["proxy"]],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [n["credentials"]], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [n["bans"]], "verbs": ["patch"]},
        ],
    }


def consumer_role_binding(job: JobRef) -> dict[str, Any]:
    n = names(job)
    return {
        "metadata": _meta(job, n["consumer"], CONSUMER),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n["consumer"]},
        "subjects": [{"kind": "ServiceAccount", "name": n["consumer"], "namespace": job.namespace}],
    }


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _amqp_env(job: JobRef) -> dict[str, Any]:
    return {"name": "AMQP_URL", "valueFrom": {"secretKeyRef": {"name": names(job)["amqp"], "key": "url"}}}


def _tiles_volume(config: OperatorConfig) -> dict[str, Any]:
    if config.tiles_pvc:
        return {"name": "tiles", "persistentVolumeClaim": {"claimName": config.tiles_pvc}}
    if config.tiles_hostpath:
        return {"name": "tiles", "hostPath": {"path": config.tiles_hostpath, "type": "DirectoryOrCreate"}}
    return {"name": "tiles", "emptyDir": {}}


def generator_job(job: JobRef, spec: JobSpec, config: OperatorConfig) -> dict[str, Any]:
    meta = _meta(job, names(job)["generator"], GENERATOR)
    return {
        "metadata": meta,
        "spec": {
            "backoffLimit": 3,
            "template": {
                "metadata": {"labels": meta["labels"]},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "automountServiceAccountToken": False,  # the generator never talks to Kubernetes
                    "containers": [{
                        "name": GENERATOR,
                        "image": config.image,
                        "imagePullPolicy": config.image_pull_policy,
                        "command": ["tilehopper-generator"],
                        "env": [
                            _amqp_env(job),
                            {"name": "TILEHOPPER_QUEUE", "value": job.queue},
                            {"name": "TILEHOPPER_TILES", "value": json.dumps(spec.tiles, sort_keys=True)},
                        ],
                        "securityContext": _security_context(),
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                      "limits": {"memory": "256Mi"}},
                    }],
                },
            },
        },
    }


def consumer_deployment(job: JobRef, spec: JobSpec, config: OperatorConfig, replicas: int) -> dict[str, Any]:
    n = names(job)
    meta = _meta(job, n["consumers"], CONSUMER)
    selector = {contracts.LABEL_JOB: job.name, contracts.LABEL_ROLE: CONSUMER}
    return {
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": meta["labels"]},
                "spec": {
                    "serviceAccountName": n["consumer"],
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": CONSUMER,
                        "image": config.image,
                        "imagePullPolicy": config.image_pull_policy,
                        "command": ["tilehopper-consumer"],
                        "env": [
                            _amqp_env(job),
                            {"name": "TILEHOPPER_QUEUE", "value": job.queue},
                            {"name": "TILEHOPPER_NAMESPACE", "value": job.namespace},
                            {"name": "TILEHOPPER_JOB", "value": job.name},
                            {"name": "TILEHOPPER_THREADS", "value": str(spec.threads)},
                            {"name": "TILEHOPPER_URL_TEMPLATE", "value": spec.url_template},
                            {"name": "TILEHOPPER_TILES_DIR", "value": TILES_MOUNT},
                            {"name": "TILEHOPPER_BAN_STATUS_CODES",
                             "value": ",".join(str(c) for c in sorted(spec.proxy.ban_status_codes))},
                            {"name": "TILEHOPPER_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        ],
                        "volumeMounts": [{"name": "tiles", "mountPath": TILES_MOUNT}],
                        "securityContext": _security_context(),
                        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"},
                                      "limits": {"memory": "512Mi"}},
                    }],
                    "volumes": [_tiles_volume(config)],
                },
            },
        },
    }


# --- Writing ----------------------------------------------------------------------------------

_CREATE = {
    "ConfigMap": lambda api, ns, body: api.core.create_namespaced_config_map(ns, body),
    "Secret": lambda api, ns, body: api.core.create_namespaced_secret(ns, body),
    "ServiceAccount": lambda api, ns, body: api.core.create_namespaced_service_account(ns, body),
    "Role": lambda api, ns, body: api.rbac.create_namespaced_role(ns, body),
    "RoleBinding": lambda api, ns, body: api.rbac.create_namespaced_role_binding(ns, body),
    "Job": lambda api, ns, body: api.batch.create_namespaced_job(ns, body),
    "Deployment": lambda api, ns, body: api.apps.create_namespaced_deployment(ns, body),
}
_API_VERSION = {"ConfigMap": "v1", "Secret": "v1", "ServiceAccount": "v1", "Job": "batch/v1",
                "Deployment": "apps/v1", "Role": "rbac.authorization.k8s.io/v1",
                "RoleBinding": "rbac.authorization.k8s.io/v1"}


class Kube:
    """The typed API clients the operator uses (created once, after kopf logged in)."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)

    def ensure(self, kind: str, body: dict[str, Any], owner: dict[str, Any]) -> bool:
        """Create an object adopted by the TileJob; an existing one is left as it is. True if created."""
        body = {"apiVersion": _API_VERSION[kind], "kind": kind, **body}
        kopf.adopt(body, owner=owner)
        try:
            _CREATE[kind](self, body["metadata"]["namespace"], body)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    def publish_proxy(self, job: JobRef, announcement: ProxyAnnouncement) -> None:
        self.core.patch_namespaced_config_map(
            names(job)["proxy"], job.namespace, {"data": announcement.to_data()}
        )

    def read_bans(self, job: JobRef) -> dict[str, str]:
        try:
            cm = self.core.read_namespaced_config_map(names(job)["bans"], job.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise
        return dict(cm.data or {})

    def prune_bans(self, job: JobRef, keys: list[str]) -> None:
        """Drop old generations' reports (a JSON merge patch with null removes a key)."""
        if keys:
            self.core.patch_namespaced_config_map(
                names(job)["bans"], job.namespace, {"data": {k: None for k in keys}}
            )

    def scale_consumers(self, job: JobRef, replicas: int) -> None:
        try:
            self.apps.patch_namespaced_deployment_scale(
                names(job)["consumers"], job.namespace, {"spec": {"replicas": replicas}}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def generator_state(self, job: JobRef) -> str:
        """'succeeded', 'failed', 'running' or 'absent', from the Job's status."""
        try:
            status = self.batch.read_namespaced_job_status(names(job)["generator"], job.namespace).status
        except ApiException as exc:
            if exc.status == 404:
                return "absent"
            raise
        for cond in status.conditions or []:
            if cond.status == "True" and cond.type in ("Complete", "SuccessCriteriaMet"):
                return "succeeded"
            if cond.status == "True" and cond.type in ("Failed", "FailureTarget"):
                return "failed"
        return "running"

    def read_credentials(self, job: JobRef) -> tuple[str, str] | None:
        import base64

        try:
            secret = self.core.read_namespaced_secret(names(job)["credentials"], job.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = secret.data or {}
        return (
            base64.b64decode(data[contracts.SECRET_USERNAME]).decode(),
            base64.b64decode(data[contracts.SECRET_PASSWORD]).decode(),
        )
