"""Render tests of charts/graft (helm-unittest style, with `helm template` and PyYAML)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm import CHART_DIR, NAMESPACE, REPO_ROOT, HelmError, find, lint, notes, one, render

from graft.config import NodePool, Settings, load_settings

#: Tests that run helm; the others (schema, docs) run without it.
needs_helm = pytest.mark.usefixtures("helm")

Docs = list[dict[str, Any]]

SINGLE_NS = {"watchNamespace": "team-a"}
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)


@pytest.fixture(scope="module")
def default_docs(helm: Path) -> Docs:
    return render()


def container(docs: Docs) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(docs: Docs) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container(docs)["env"]}


def grants(rules: list[dict[str, Any]], group: str, resource: str) -> set[str]:
    return {
        verb
        for r in rules
        if group in r["apiGroups"] and resource in r["resources"]
        for verb in r["verbs"]
    }


def graft_rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc.get("rules", []) if "graft.dev" in r["apiGroups"]]


# --- lint -------------------------------------------------------------------------------


@needs_helm
@pytest.mark.parametrize(
    "values",
    [
        {},
        SINGLE_NS,
        {
            "crds": {"enabled": False},
            "rbac": {"create": False},
            "serviceAccount": {"create": False, "name": "ops"},
        },
    ],
    ids=["defaults", "single-namespace", "minimal"],
)
def test_helm_lint(values: dict[str, Any]) -> None:
    lint(values)


# --- switches, table-driven -------------------------------------------------------------


def _no_graft_cluster_role(docs: Docs) -> None:
    assert not find(docs, "ClusterRole")
    assert not find(docs, "ClusterRoleBinding")
    assert not find(docs, "Role")
    assert not find(docs, "RoleBinding")
    # The operator still runs, under the named existing account.
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    assert not find(docs, "ServiceAccount")


def _single_namespace(docs: Docs) -> None:
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == "team-a"
    assert grants(role["rules"], "graft.dev", "finetunejobs") >= {"get", "list", "watch", "patch"}
    assert grants(role["rules"], "", "pods") == {"list", "watch", "create", "delete"}
    binding = one(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == "team-a"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "graft", "namespace": NAMESPACE}
    ]
    assert env_of(docs)["GRAFT_WATCH_NAMESPACES"] == "team-a"
    # Only the cluster-scoped reads remain cluster-wide: no Graft resources, no namespaces.
    (cluster_role,) = find(docs, "ClusterRole")
    assert not graft_rules(cluster_role)
    assert grants(cluster_role["rules"], "", "nodes") == {"get", "list", "watch"}
    assert not grants(cluster_role["rules"], "", "namespaces")
    assert not grants(cluster_role["rules"], "", "pods")
    assert grants(cluster_role["rules"], "apiextensions.k8s.io", "customresourcedefinitions") == {
        "list",
        "watch",
    }


def _cluster_wide(docs: Docs) -> None:
    assert not find(docs, "Role")
    assert not find(docs, "RoleBinding")
    assert "GRAFT_WATCH_NAMESPACES" not in env_of(docs)
    rules = [r for cr in find(docs, "ClusterRole") for r in cr["rules"]]
    assert grants(rules, "", "namespaces") == {"list", "watch"}
    assert grants(rules, "graft.dev", "finetunejobs") == {"get", "list", "watch", "patch"}
    assert grants(rules, "graft.dev", "modelservices/status") == {"patch"}
    assert grants(rules, "graft.dev", "finetunejobs/finalizers") == {"update"}
    assert grants(rules, "", "services") == {"create", "patch", "delete"}
    assert grants(rules, "", "configmaps") == {"get", "create", "patch", "delete"}
    assert grants(rules, "", "events") == {"create"}
    assert grants(rules, "events.k8s.io", "events") == {"create"}
    assert grants(rules, "ray.io", "rayservices") == {"get", "list", "watch", "create", "patch"}
    assert not grants(rules, "ray.io", "rayservices/status")
    # Least privilege: Secrets created (each ModelService's Ray token) and read one by
    # name (the API-key Secret a ModelService names), never listed or watched;
    # no wildcards, no kueue.
    assert grants(rules, "", "secrets") == {"get", "create"}
    assert grants(rules, "networking.k8s.io", "networkpolicies") == {"create", "patch"}
    for r in rules:
        assert "*" not in r["verbs"] + r["resources"] + r["apiGroups"], r
        assert "kueue.x-k8s.io" not in r["apiGroups"]
    for binding in find(docs, "ClusterRoleBinding"):
        assert binding["subjects"][0]["namespace"] == NAMESPACE


def _no_crds(docs: Docs) -> None:
    assert not find(docs, "CustomResourceDefinition")


def _crds_kept(docs: Docs) -> None:
    crds = find(docs, "CustomResourceDefinition")
    assert {c["metadata"]["name"] for c in crds} == {
        "finetunejobs.graft.dev",
        "modelservices.graft.dev",
    }
    for crd in crds:
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def _crds_not_kept(docs: Docs) -> None:
    crds = find(docs, "CustomResourceDefinition")
    assert len(crds) == 2
    for crd in crds:
        assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})


def _no_service_monitor(docs: Docs) -> None:
    assert not find(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]


def _service_monitor(docs: Docs) -> None:
    sm = one(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["interval"] == "15s"
    svc = one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


def _metrics_off(docs: Docs) -> None:
    assert not find(docs, "Service")
    assert not find(docs, "ServiceMonitor")
    assert env_of(docs)["GRAFT_METRICS_PORT"] == "0"
    assert [p["name"] for p in container(docs)["ports"]] == ["health"]


def _image_digest(docs: Docs) -> None:
    image = container(docs)["image"]
    assert image == "registry.local/graft/operator@sha256:" + "a" * 64


def _image_default_tag(docs: Docs) -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert container(docs)["image"] == f"ghcr.io/graft-dev/graft-operator:{chart['appVersion']}"


def _operator_pod_placement(docs: Docs) -> None:
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"pool": "system"}
    assert spec["tolerations"] == [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert one(docs, "ServiceAccount")["imagePullSecrets"] == [{"name": "regcred"}]


CASES: list[tuple[str, dict[str, Any], Callable[[Docs], None]]] = [
    (
        "does not create a ClusterRole for graft.dev when rbac.create is false",
        {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}},
        _no_graft_cluster_role,
    ),
    (
        "uses Role/RoleBinding and sets GRAFT_WATCH_NAMESPACES when watchNamespace is set",
        SINGLE_NS,
        _single_namespace,
    ),
    ("uses ClusterRoles with least privilege by default", {}, _cluster_wide),
    ("no CRDs when crds.enabled is false", {"crds": {"enabled": False}}, _no_crds),
    ("CRDs carry helm.sh/resource-policy: keep when crds.keep", {}, _crds_kept),
    ("CRDs are not kept when crds.keep is false", {"crds": {"keep": False}}, _crds_not_kept),
    ("no ServiceMonitor by default", {}, _no_service_monitor),
    (
        "ServiceMonitor only when enabled",
        {
            "metrics": {
                "serviceMonitor": {
                    "enabled": True,
                    "interval": "15s",
                    "labels": {"release": "prom"},
                }
            }
        },
        _service_monitor,
    ),
    ("metrics off: no Service, port 0", {"metrics": {"enabled": False}}, _metrics_off),
    (
        "image digest wins over the tag",
        {"image": {"repository": "registry.local/graft/operator", "digest": "sha256:" + "a" * 64}},
        _image_digest,
    ),
    ("image tag defaults to appVersion", {}, _image_default_tag),
    (
        "operator pod placement and pull secrets",
        {
            "nodeSelector": {"pool": "system"},
            "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
            "imagePullSecrets": [{"name": "regcred"}],
        },
        _operator_pod_placement,
    ),
]


@needs_helm
@pytest.mark.parametrize(("values", "check"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_switch(values: dict[str, Any], check: Callable[[Docs], None]) -> None:
    check(render(values))


# --- defaults ---------------------------------------------------------------------------


def test_restricted_security_context_by_default(default_docs: Docs) -> None:
    pod = one(default_docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_deployment_shape(default_docs: Docs) -> None:
    dep = one(default_docs, "Deployment")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    c = container(default_docs)
    assert c["command"] == ["graft-operator"]
    env = env_of(default_docs)
    assert env["GRAFT_CONFIG"] == "/etc/graft/config.yaml"
    assert env["GRAFT_METRICS_PORT"] == "8080"
    assert env["GRAFT_HEALTH_PORT"] == "8081"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert "checksum/config" in dep["spec"]["template"]["metadata"]["annotations"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_standard_labels_everywhere(default_docs: Docs) -> None:
    for doc in default_docs:
        labels = doc["metadata"]["labels"]
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, f"{doc['kind']} {doc['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/part-of"] == "graft"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


@needs_helm
@pytest.mark.parametrize(
    ("values", "expected", "absent"),
    [
        (
            {},
            ["cluster-wide", "a100-80g: 8 x nvidia.com/gpu", "cpu: CPU only", "resource-policy"],
            ["-n team-a"],
        ),
        (
            {**SINGLE_NS, "crds": {"enabled": False}},
            ['only "team-a"', "kubectl get ftj,msvc -n team-a", "crds.enabled is false"],
            ["resource-policy"],
        ),
    ],
    ids=["defaults", "single-namespace-no-crds"],
)
def test_notes(values: dict[str, Any], expected: list[str], absent: list[str]) -> None:
    text = notes(values)
    for needle in expected:
        assert needle in text
    for needle in absent:
        assert needle not in text


# --- the settings file ------------------------------------------------------------------


def _settings_from(docs: Docs, tmp_path: Path) -> Settings:
    cm = one(docs, "ConfigMap")
    mount = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}["config"]
    assert env_of(docs)["GRAFT_CONFIG"] == f"{mount}/config.yaml"
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    return load_settings({"GRAFT_CONFIG": str(path)})


def test_rendered_config_loads_and_yields_the_a100_pool(default_docs: Docs, tmp_path: Path) -> None:
    settings = _settings_from(default_docs, tmp_path)
    pool = settings.pool("a100-80g")
    assert pool == NodePool(
        name="a100-80g",
        nodeSelector={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        gpuResource="nvidia.com/gpu",
        gpusPerNode=8,
        gpuMemoryGiB=80,
        pricePerGpuHour=1.8,
    )
    cpu = settings.pool("cpu")
    assert cpu is not None and cpu.gpus_per_node == 0
    assert settings.watch_namespaces == []


@needs_helm
def test_rendered_config_carries_every_setting(tmp_path: Path) -> None:
    values = {
        "config": {
            "nodePools": [
                {"name": "h100", "gpusPerNode": 8, "maxNodes": 4, "gpuResource": "nvidia.com/gpu"}
            ],
            "trainerImage": "registry.local/trainer:1",
            "serverImage": "registry.local/server:1",
            "terminationGraceSeconds": 600,
            "gangPendingTimeoutSeconds": 120,
            "logFormat": "plain",
            "logLevel": "DEBUG",
        }
    }
    s = _settings_from(render(values), tmp_path)
    assert [p.name for p in s.node_pools] == ["h100"]
    assert s.node_pools[0].max_nodes == 4
    assert (s.trainer_image, s.server_image) == (
        "registry.local/trainer:1",
        "registry.local/server:1",
    )
    assert (s.termination_grace_seconds, s.gang_pending_timeout_seconds) == (600, 120)
    assert (s.log_format, s.log_level) == ("plain", "DEBUG")


# --- the schema -------------------------------------------------------------------------

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())


@needs_helm
@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"watchNamespaces": "x"}, "watchNamespaces"),
        ({"rbac": {"crate": True}}, "crate"),
        ({"crds": {"enabled": "yes"}}, "enabled"),
        ({"config": {"nodePool": []}}, "nodePool"),
        ({"config": {"nodePools": [{"name": "a", "gpusPerNodes": 8}]}}, "gpusPerNodes"),
        ({"config": {"nodePools": [{"name": "A100_80G"}]}}, "name"),
        ({"config": {"nodePools": [{"name": "big", "gpusPerNode": 17}]}}, "gpusPerNode"),
        ({"config": {"nodePools": [{"gpusPerNode": 8}]}}, "name"),
        ({"config": {"logLevel": "TRACE"}}, "logLevel"),
        ({"securityContext": {"readOnlyRootFileSystem": True}}, "readOnlyRootFileSystem"),
        ({"metrics": {"serviceMonitor": {"enable": True}}}, "enable"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else None,
)
def test_a_typo_in_values_is_rejected_by_the_schema(values: dict[str, Any], needle: str) -> None:
    with pytest.raises(HelmError) as err:
        render(values)
    assert "schema" in err.value.stderr
    assert needle in err.value.stderr


@needs_helm
@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"serviceAccount": {"create": False}}, "serviceAccount.name is required"),
        ({"metrics": {"port": 8081}}, "metrics.port and health.port must differ"),
    ],
    ids=["no-service-account-name", "port-clash"],
)
def test_inconsistent_values_fail_with_a_message(values: dict[str, Any], needle: str) -> None:
    with pytest.raises(HelmError) as err:
        render(values)
    assert needle in err.value.stderr


def _objects(node: Any, path: str = "$") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        if "properties" in node:
            out.append((path, node))
        for k, v in node.items():
            out += _objects(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _objects(v, f"{path}[{i}]")
    return out


def test_schema_closes_every_object_level() -> None:
    objects = _objects(SCHEMA)
    assert len(objects) > 20
    for path, node in objects:
        assert node.get("additionalProperties") is False, path


def test_schema_matches_the_operator_settings() -> None:
    """The chart feeds exactly what graft.config reads: no key it would refuse or ignore."""
    config = SCHEMA["properties"]["config"]["properties"]
    aliases = {f.alias for f in Settings.model_fields.values()}
    # Ports and the namespace list travel as GRAFT_* variables set by the chart itself.
    assert set(config) == aliases - {"watchNamespaces", "metricsPort", "healthPort"}
    pool = config["nodePools"]["items"]["properties"]
    assert set(pool) == {f.alias or name for name, f in NodePool.model_fields.items()}


def _values_doc() -> Any:
    spec = importlib.util.spec_from_file_location(
        "values_doc", REPO_ROOT / "charts" / "values_doc.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["values_doc"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


values_doc = _values_doc()


def test_values_yaml_documents_every_value() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    documented = values_doc.parse_comments((CHART_DIR / "values.yaml").read_text())

    def leaves(node: Any, prefix: str = "") -> list[str]:
        if isinstance(node, dict) and node:
            return [p for k, v in node.items() for p in leaves(v, f"{prefix}{k}.")]
        return [prefix.rstrip(".")]

    def ok(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1))

    missing = [p for p in leaves(values) if not ok(p)]
    assert not missing, f"values without a `# --` comment: {missing}"

    def in_schema(path: str) -> bool:
        node = SCHEMA
        for part in path.split("."):
            if "$ref" in node:
                node = SCHEMA["definitions"][node["$ref"].split("/")[-1]]
            props = node.get("properties", {})
            if part not in props:
                return isinstance(node.get("additionalProperties"), dict)
            node = props[part]
        return True

    unknown = [p for p in leaves(values) if not in_schema(p)]
    assert not unknown, f"values the schema does not declare: {unknown}"


def test_helm_values_md_is_generated_from_values_yaml() -> None:
    expected = values_doc.render((CHART_DIR / "values.yaml").read_text())
    actual = (REPO_ROOT / "docs" / "helm-values.md").read_text()
    assert actual == expected, "run: python charts/values_doc.py > docs/helm-values.md"


# --- CRDs -------------------------------------------------------------------------------


def _without_chart_metadata(crd: dict[str, Any]) -> dict[str, Any]:
    crd = json.loads(json.dumps(crd))
    meta = crd["metadata"]
    meta.pop("annotations", None)
    meta["labels"] = {
        k: v for k, v in meta.get("labels", {}).items() if k == "app.kubernetes.io/part-of"
    }
    return crd


def test_crds_in_the_chart_equal_crds_dir(default_docs: Docs) -> None:
    rendered = {
        c["metadata"]["name"]: _without_chart_metadata(c)
        for c in find(default_docs, "CustomResourceDefinition")
    }
    source = {
        p.name.removesuffix(".yaml"): yaml.safe_load(p.read_text())
        for p in sorted((REPO_ROOT / "crds").glob("*.yaml"))
    }
    assert rendered.keys() == source.keys()
    for name, crd in source.items():
        assert rendered[name] == crd, f"{name}: chart CRD differs from crds/{name}.yaml"
    chart_copy = sorted(p.name for p in (CHART_DIR / "files" / "crds").glob("*.yaml"))
    assert chart_copy == sorted(p.name for p in (REPO_ROOT / "crds").glob("*.yaml"))
    for p in (CHART_DIR / "files" / "crds").glob("*.yaml"):
        assert p.read_text() == (REPO_ROOT / "crds" / p.name).read_text()
    assert not (CHART_DIR / "crds").exists(), "crds/ would install unconditionally"
