"""The Helm chart: lint, render with default and other values, the schema, and a real install.

Rendering needs only the bench's helm binary; the install tests (marked bench) run it against the
bench's own apiserver, which validates every manifest for real.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import fields
from typing import Any

import pytest
import yaml

from tests.deploy.chart import CHART, CRD_FILE, REPO, Helm, container_env, find, kubectl_result, one
from tilehopper import contracts
from tilehopper_bench.kube import ControlPlane
from tilehopper_operator.config import PREFIX, OperatorConfig
from tilehopper_operator.workloads import JobRef, consumer_role

RELEASE, NAMESPACE = "th", "tilehopper"
FULLNAME = f"{RELEASE}-tilehopper"
OPERATOR_SA = f"{FULLNAME}-operator"


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(objects, "Deployment", f"{FULLNAME}-operator")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def default_render(helm: Helm) -> list[dict[str, Any]]:
    return helm.render(namespace=NAMESPACE, release=RELEASE)


def test_lint_is_clean(helm: Helm) -> None:
    out = helm.run("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in out.stdout
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


def test_crd_ships_in_crds_folder_untemplated() -> None:
    # Helm installs crds/ verbatim, and the tests apply this same file: no template syntax allowed.
    assert "{{" not in CRD_FILE.read_text()
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [CRD_FILE.name]


def test_default_render_has_every_part(default_render: list[dict[str, Any]]) -> None:
    kinds = sorted({o["kind"] for o in default_render})
    assert kinds == sorted([
        "ClusterRole", "ClusterRoleBinding", "Deployment", "RoleBinding", "Secret", "Service",
        "ServiceAccount", "StatefulSet",
    ])
    sts = one(default_render, "StatefulSet", f"{FULLNAME}-rabbitmq")
    image = sts["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("rabbitmq:3.13.") and image.endswith("-management")  # pinned patch tag


def test_every_object_has_the_recommended_labels(default_render: list[dict[str, Any]]) -> None:
    for obj in default_render:
        labels = obj["metadata"]["labels"]
        for key in ("name", "instance", "version", "managed-by", "component", "part-of"):
            assert f"app.kubernetes.io/{key}" in labels, (obj["kind"], obj["metadata"]["name"], key)
        assert labels["app.kubernetes.io/instance"] == RELEASE


def test_pods_run_non_root_read_only_without_capabilities(default_render: list[dict[str, Any]]) -> None:
    for kind in ("Deployment", "StatefulSet"):
        for workload in find(default_render, kind):
            pod = workload["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] > 0
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for container in pod["containers"]:
                ctx = container["securityContext"]
                assert ctx["allowPrivilegeEscalation"] is False
                assert ctx["capabilities"] == {"drop": ["ALL"]}
                assert "resources" in container
    operator = operator_container(default_render)
    assert operator["securityContext"]["readOnlyRootFilesystem"] is True
    # The same uid as the image's USER.
    deployment = one(default_render, "Deployment", f"{FULLNAME}-operator")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def test_operator_runs_its_entry_point_with_the_typed_config(default_render: list[dict[str, Any]]) -> None:
    container = operator_container(default_render)
    assert container["command"] == ["tilehopper-operator"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "tilehopper-operator" in scripts

    env = container_env(container)
    # Every TILEHOPPER_* the chart sets is a field of the operator's typed config, so none is
    # silently ignored.
    known = {PREFIX + f.name.upper() for f in fields(OperatorConfig)}
    chart_settings = {name for name in env if name.startswith(PREFIX)}
    assert chart_settings <= known, chart_settings - known
    assert env["TILEHOPPER_NAMESPACE_SCOPE"] == NAMESPACE
    assert env["TILEHOPPER_IMAGE"] == f"tilehopper:{yaml.safe_load((CHART / 'Chart.yaml').read_text())['appVersion']}"
    assert env["TILEHOPPER_TILES_HOSTPATH"] == "/tiles" and env["TILEHOPPER_TILES_PVC"] == ""
    assert env["TILEHOPPER_AMQP_URL"] == {"secretKeyRef": {"name": f"{FULLNAME}-amqp", "key": "url"}}
    # No AWS keys configured: the SDK's default chain, no Secret reference at all.
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} & set(env)


def test_bundled_broker_url_points_at_its_service(default_render: list[dict[str, Any]]) -> None:
    secret = one(default_render, "Secret", f"{FULLNAME}-amqp")["stringData"]
    host = f"{FULLNAME}-rabbitmq.{NAMESPACE}.svc"
    assert secret["url"] == f"amqp://tilehopper:{secret['password']}@{host}:5672/%2F"
    assert secret["apiUrl"] == f"http://tilehopper:{secret['password']}@{host}:15672"
    assert len(secret["password"]) >= 24
    sts = one(default_render, "StatefulSet", f"{FULLNAME}-rabbitmq")
    env = container_env(sts["spec"]["template"]["spec"]["containers"][0])
    assert env["RABBITMQ_DEFAULT_PASS"] == {"secretKeyRef": {"name": f"{FULLNAME}-amqp", "key": "password"}}


def rules_of(objects: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return one(objects, "ClusterRole", name)["rules"]


def test_rbac_is_least_privilege(default_render: list[dict[str, Any]]) -> None:
    for role in find(default_render, "ClusterRole") + find(default_render, "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
            assert not {"bind", "escalate", "impersonate"} & set(rule["verbs"]), rule
    # Only the operator's account is bound to anything; the chart binds no consumer account.
    for binding in find(default_render, "ClusterRoleBinding") + find(default_render, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": NAMESPACE}]
    assert [sa["metadata"]["name"] for sa in find(default_render, "ServiceAccount")] == [OPERATOR_SA]
    # The namespaced powers (Secrets, Deployments, Roles) are bound in the served namespace only.
    cluster_bound = {b["roleRef"]["name"] for b in find(default_render, "ClusterRoleBinding")}
    assert cluster_bound == {f"{FULLNAME}-operator-cluster"}
    cluster_resources = {r for rule in rules_of(default_render, f"{FULLNAME}-operator-cluster") for r in rule["resources"]}
    assert cluster_resources == {"customresourcedefinitions", "namespaces"}
    for rule in rules_of(default_render, f"{FULLNAME}-operator-cluster"):
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
    (binding,) = find(default_render, "RoleBinding")
    assert binding["metadata"]["namespace"] == NAMESPACE


def test_operator_can_grant_every_permission_of_the_consumer_role(default_render: list[dict[str, Any]]) -> None:
    # The apiserver refuses to let the operator create a Role granting more than it holds.
    held = rules_of(default_render, f"{FULLNAME}-operator")
    role = consumer_role(JobRef(namespace=NAMESPACE, name="job", uid="u"))
    for wanted in role["rules"]:
        for resource in wanted["resources"]:
            for verb in wanted["verbs"]:
                assert any(
                    resource in rule["resources"] and verb in rule["verbs"]
                    and set(wanted["apiGroups"]) <= set(rule["apiGroups"])
                    for rule in held
                ), (resource, verb)


def test_each_comment_explains_a_rule() -> None:
    text = (CHART / "templates" / "rbac.yaml").read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("- apiGroups:"):
            before = [ln.strip() for ln in lines[max(0, i - 3):i]]
            # Either a comment right above, or the rule continues the previous commented group.
            assert any(ln.startswith("#") for ln in before) or "verbs:" in lines[i - 1], line


def test_external_rabbitmq_deploys_no_broker(helm: Helm) -> None:
    url, api = "amqp://u:p@broker.example.internal:5672/%2F", "http://u:p@broker.example.internal:15672"
    objects = helm.render(sets=[f"rabbitmq.external.url={url}", f"rabbitmq.external.apiUrl={api}"])
    assert not find(objects, "StatefulSet")
    assert not [s for s in find(objects, "Service") if "rabbitmq" in s["metadata"]["name"]]
    secret = one(objects, "Secret", f"{RELEASE}-tilehopper-amqp")["stringData"]
    assert secret == {"url": url, "apiUrl": api}


def test_external_rabbitmq_from_an_existing_secret(helm: Helm) -> None:
    objects = helm.render(sets=["rabbitmq.external.existingSecret=my-broker"])
    assert not find(objects, "StatefulSet") and not find(objects, "Secret")
    env = container_env(operator_container(objects))
    assert env["TILEHOPPER_AMQP_URL"] == {"secretKeyRef": {"name": "my-broker", "key": "url"}}


def test_pvc_mode(helm: Helm) -> None:
    objects = helm.render(sets=["tiles.mode=pvc", "tiles.pvc.size=50Gi", "tiles.pvc.accessModes={ReadWriteMany}"])
    pvc = one(objects, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    env = container_env(operator_container(objects))
    assert env["TILEHOPPER_TILES_PVC"] == pvc["metadata"]["name"]
    assert env["TILEHOPPER_TILES_HOSTPATH"] == ""

    existing = helm.render(sets=["tiles.mode=pvc", "tiles.pvc.existingClaim=my-tiles"])
    assert not find(existing, "PersistentVolumeClaim")
    assert container_env(operator_container(existing))["TILEHOPPER_TILES_PVC"] == "my-tiles"


def test_irsa_role_annotates_the_account_and_uses_no_keys(helm: Helm) -> None:
    arn = "arn:aws:iam::123456789012:role/tilehopper-operator"
    objects = helm.render(sets=[f"aws.irsaRoleArn={arn}"])
    sa = one(objects, "ServiceAccount", OPERATOR_SA)
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": arn}
    env = container_env(operator_container(objects))
    assert not [name for name in env if name.startswith("AWS_") and name != "AWS_DEFAULT_REGION"]
    assert not [s for s in find(objects, "Secret") if s["metadata"]["name"].endswith("-aws")]


def test_access_keys_become_a_secret_the_operator_reads(helm: Helm) -> None:
    objects = helm.render(sets=[
        "aws.accessKeyId=AKIAIOSFODNN7EXAMPLE", "aws.secretAccessKey=wJalrXUtnFEMI",
        "aws.endpointUrl=http://127.0.0.1:5000",
    ])
    secret = one(objects, "Secret", f"{FULLNAME}-aws")
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI"}
    env = container_env(operator_container(objects))
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": f"{FULLNAME}-aws", "key": "AWS_ACCESS_KEY_ID", "optional": True}}
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:5000"
    # The original project's key names are read from the same Secret when a user's Secret has them.
    assert env["AWS_SERVER_PUBLIC_KEY"]["secretKeyRef"]["name"] == f"{FULLNAME}-aws"


def test_existing_aws_secret_is_referenced_not_made(helm: Helm) -> None:
    objects = helm.render(sets=["aws.existingSecret=aws-creds"])
    assert not [s for s in find(objects, "Secret") if s["metadata"]["name"].endswith("-aws")]
    env = container_env(operator_container(objects))
    assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "aws-creds"


def test_more_namespaces_get_role_bindings(helm: Helm) -> None:
    objects = helm.render(sets=["jobs.namespaces={maps,tiles}"])
    bound = sorted(b["metadata"]["namespace"] for b in find(objects, "RoleBinding"))
    assert bound == sorted([NAMESPACE, "maps", "tiles"])
    assert container_env(operator_container(objects))["TILEHOPPER_NAMESPACE_SCOPE"] == f"{NAMESPACE},maps,tiles"


def test_all_namespaces_binds_cluster_wide(helm: Helm) -> None:
    objects = helm.render(sets=["jobs.allNamespaces=true"])
    assert not find(objects, "RoleBinding")
    assert {b["roleRef"]["name"] for b in find(objects, "ClusterRoleBinding")} == {
        f"{FULLNAME}-operator", f"{FULLNAME}-operator-cluster"
    }
    assert container_env(operator_container(objects))["TILEHOPPER_NAMESPACE_SCOPE"] == ""


@pytest.mark.parametrize(
    ("value", "mentions"),
    [
        ("tiles.mode=nfs", "mode"),
        ("tiles.hostPath=tiles", "hostPath"),
        ("rabbitmq.external.url=ftp://broker", "url"),
        ("operator.logLevel=loud", "logLevel"),
        ("operator.addressMode=internal", "addressMode"),
        ("operator.subnetId=my-subnet", "subnetId"),
        ("operator.env.HTTP_PROXY=x", "HTTP_PROXY"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("jobs.namespaces={Bad_Namespace}", "namespaces"),
        ("aws.irsaRoleArn=role/tilehopper", "irsaRoleArn"),
        ("rabbitmq.auth.password=short", "password"),
        ("surprise=1", "surprise"),
    ],
)
def test_schema_rejects_bad_values(helm: Helm, value: str, mentions: str) -> None:
    result = helm.template(sets=[value], check=False)
    assert result.returncode != 0, f"accepted {value}"
    assert "schema" in result.stderr.lower() and mentions in result.stderr, result.stderr


@pytest.mark.parametrize(
    "values",
    [
        ["aws.existingSecret=creds", "aws.accessKeyId=AKIAIOSFODNN7EXAMPLE", "aws.secretAccessKey=x"],
        ["aws.existingSecret=creds", "aws.irsaRoleArn=arn:aws:iam::123456789012:role/r"],
        ["aws.accessKeyId=AKIAIOSFODNN7EXAMPLE"],
    ],
    ids=["secret-and-keys", "secret-and-role", "key-without-secret-key"],
)
def test_schema_rejects_conflicting_aws_credentials(helm: Helm, values: list[str]) -> None:
    result = helm.template(sets=values, check=False)
    assert result.returncode != 0, f"accepted {values}"


# --- On the bench's apiserver ---------------------------------------------------------------

NON_DEFAULT = [
    "rabbitmq.external.url=amqp://u:p@broker:5672/%2F",
    "rabbitmq.external.apiUrl=http://u:p@broker:15672",
    "tiles.mode=pvc",
    "aws.irsaRoleArn=arn:aws:iam::123456789012:role/tilehopper",
    "operator.addressMode=private",
]


@pytest.mark.bench
def test_install_into_the_bench_apiserver(cluster_helm: Helm, control_plane: ControlPlane, namespace: str) -> None:
    out = cluster_helm.run("install", RELEASE, str(CHART), f"--namespace={namespace}")
    # NOTES.txt tells the next commands.
    assert "kubectl apply" in out.stdout and "kubectl get tilejobs" in out.stdout
    listed = control_plane.kubectl(
        "get", "deployments,statefulsets,services,serviceaccounts,secrets,rolebindings", "-n", namespace,
        "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name",
    ).split()
    for expected in (
        f"deployment.apps/{FULLNAME}-operator", f"statefulset.apps/{FULLNAME}-rabbitmq",
        f"service/{FULLNAME}-rabbitmq", f"serviceaccount/{OPERATOR_SA}", f"secret/{FULLNAME}-amqp",
        f"rolebinding.rbac.authorization.k8s.io/{FULLNAME}-operator",
    ):
        assert expected in listed, listed
    # The CRD came from crds/ (or was there already) and is served.
    assert "tilejobs" in control_plane.kubectl("api-resources", "--api-group=tilehopper.dev", "-o", "name")

    # The password survives an upgrade: the broker's data stays readable.
    before = control_plane.kubectl("get", "secret", f"{FULLNAME}-amqp", "-n", namespace, "-o", "jsonpath={.data.password}")
    cluster_helm.run("upgrade", RELEASE, str(CHART), f"--namespace={namespace}")
    after = control_plane.kubectl("get", "secret", f"{FULLNAME}-amqp", "-n", namespace, "-o", "jsonpath={.data.password}")
    assert before and before == after
    cluster_helm.run("uninstall", RELEASE, f"--namespace={namespace}")


@pytest.mark.bench
def test_non_default_manifests_pass_server_side_validation(
    helm: Helm, control_plane: ControlPlane, namespace: str
) -> None:
    rendered = helm.template(namespace=namespace, release="nd", sets=NON_DEFAULT + [f"jobs.namespaces={{{namespace}}}"]).stdout
    result = kubectl_result(control_plane, "apply", "--dry-run=server", "-f", "-", input=rendered)
    assert result.returncode == 0, result.stderr
    assert "persistentvolumeclaim/nd-tilehopper-tiles created (server dry run)" in result.stdout


def can_i(plane: ControlPlane, who: str, verb: str, resource: str, namespace: str) -> bool:
    out = kubectl_result(plane, "auth", "can-i", verb, resource, "-n", namespace, f"--as={who}")
    return out.stdout.strip() == "yes"


@pytest.mark.bench
def test_operator_account_holds_what_it_needs_and_no_more(
    cluster_helm: Helm, control_plane: ControlPlane, namespace: str
) -> None:
    release = "rbac"
    cluster_helm.run(
        "install", release, str(CHART), f"--namespace={namespace}",
        "--set=rabbitmq.external.url=amqp://u:p@broker:5672/%2F",
    )
    operator = f"system:serviceaccount:{namespace}:{release}-tilehopper-operator"
    for verb, resource in [
        ("watch", "tilejobs.tilehopper.dev"), ("patch", "tilejobs.tilehopper.dev/status"),
        ("create", "secrets"), ("create", "deployments.apps"), ("patch", "deployments.apps/scale"),
        ("create", "jobs.batch"), ("create", "serviceaccounts"), ("create", "roles.rbac.authorization.k8s.io"),
        ("create", "events"),
    ]:
        assert can_i(control_plane, operator, verb, resource, namespace), (verb, resource)
    for verb, resource, where in [
        ("get", "secrets", "kube-system"),  # not bound outside the served namespaces
        ("create", "pods", namespace),
        ("delete", "namespaces", namespace),
        ("create", "clusterroles.rbac.authorization.k8s.io", namespace),
        ("bind", "clusterroles.rbac.authorization.k8s.io", namespace),
    ]:
        assert not can_i(control_plane, operator, verb, resource, where), (verb, resource, where)

    # For real: acting as the operator, create a job's consumer Role. The apiserver allows it only
    # because the operator holds every permission that Role grants.
    role = consumer_role(JobRef(namespace=namespace, name="riga", uid="u"))
    body = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", **role}
    created = kubectl_result(control_plane, "create", f"--as={operator}", "-f", "-", input=json.dumps(body))
    assert created.returncode == 0, created.stderr
    cluster_helm.run("uninstall", release, f"--namespace={namespace}")


def test_kind_config_mounts_the_repo_tiles_at_the_chart_default() -> None:
    kind = yaml.safe_load((REPO / "deploy" / "kind-config.yaml").read_text())
    mounts = [m for node in kind["nodes"] for m in node.get("extraMounts", [])]
    default_host_path = yaml.safe_load((CHART / "values.yaml").read_text())["tiles"]["hostPath"]
    assert {"hostPath": "./tiles", "containerPath": default_host_path} in mounts


def test_crd_file_is_the_one_the_chart_ships() -> None:
    doc = yaml.safe_load(CRD_FILE.read_text())
    assert doc["metadata"]["name"] == f"{contracts.TILEJOB_PLURAL}.{contracts.API_GROUP}"
    assert doc["spec"]["names"]["kind"] == contracts.TILEJOB_KIND
    assert doc["spec"]["names"]["shortNames"] == ["tj"]
    assert [v["name"] for v in doc["spec"]["versions"]] == [contracts.API_VERSION]


# Keywords a structural CRD schema may use. A typo, or a flow-style description with a comma in it
# (which YAML splits into a new key), shows up here as an unknown one.
SCHEMA_KEYWORDS = {
    "type", "description", "properties", "required", "items", "default", "minimum", "maximum",
    "minItems", "maxItems", "maxLength", "pattern", "enum", "nullable", "additionalProperties",
    "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


def test_crd_schema_uses_only_known_keywords() -> None:
    def walk(node: dict[str, Any], path: str) -> None:
        assert set(node) <= SCHEMA_KEYWORDS, (path, set(node) - SCHEMA_KEYWORDS)
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}[{key}]")

    doc = yaml.safe_load(CRD_FILE.read_text())
    walk(doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")


def test_crd_has_no_yaml11_boolean_keys() -> None:
    # The apiserver's YAML reader takes a bare y/n/yes/no/on/off as a boolean: "y" must be quoted.
    import re

    text = CRD_FILE.read_text()
    assert not re.search(r"^\s*(y|n|yes|no|on|off):", text, re.MULTILINE | re.IGNORECASE)
    assert not re.search(r"\[[^\]]*\b(y|n)\b[^\]\"']*\]", text.replace('"y"', "")), "bare y in a list"
