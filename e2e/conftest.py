"""The whole system for e2e tests: a real control plane, the operator as the Helm chart
installs it, fake A100 nodes, and a process kubelet that runs their Pods for real.

What differs from a cluster, and why:
- no container runtime or kubelet here: ``graft.testing.process_kubelet.ProcessKubelet``
  runs each Pod's command as a local process and writes Pod status like a kubelet;
- the operator runs as a local process (``graft-operator``, as the chart's Deployment
  runs it) with the settings file the chart renders into its ConfigMap and the token of
  the ServiceAccount the chart creates, so the chart's RBAC is what it is allowed to do;
- each "GPU" is one CPU process: the node pool has ``gpusPerNode: 1`` and the trainer
  runs one process per Pod, on gloo.
"""

from __future__ import annotations

import base64
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from e2e_support import (
    CHART_VALUES,
    POD_EXTRA_ENV,
    RELEASE,
    RELEASE_NAMESPACE,
    REPO_ROOT,
    SHARED,
    install_kuberay_crds,
)
from kubernetes import client

from graft.testing.cluster import FakeKubelet, api_client, wait_for
from graft.testing.controlplane import ControlPlane, ControlPlaneError, start_control_plane
from graft.testing.operator import OperatorProcess
from graft.testing.process_kubelet import ProcessKubelet


def _load_helm() -> ModuleType:
    """tests/chart/helm.py, loaded under a name of its own (it is not a package)."""
    path = REPO_ROOT / "tests" / "chart" / "helm.py"
    spec = importlib.util.spec_from_file_location("graft_e2e_chart_helm", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def chart() -> list[dict[str, Any]]:
    """The chart rendered with the e2e values (`helm template`)."""
    helm = _load_helm()
    try:
        docs: list[dict[str, Any]] = helm.render(
            CHART_VALUES, release=RELEASE, namespace=RELEASE_NAMESPACE
        )
    except helm.HelmUnavailable as e:
        pytest.skip(f"no helm binary: {e}")
    return docs


def _of_kind(docs: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") in kinds]


@pytest.fixture(scope="session")
def control_plane(
    tmp_path_factory: pytest.TempPathFactory, chart: list[dict[str, Any]]
) -> Iterator[ControlPlane]:
    """A real control plane with the chart's CRDs, namespace, ServiceAccount and RBAC."""
    try:
        cp = start_control_plane(tmp_path_factory.mktemp("control-plane"))
    except ControlPlaneError as e:
        pytest.skip(str(e))
    try:
        crds = _of_kind(chart, "CustomResourceDefinition")
        assert {c["metadata"]["name"] for c in crds} >= {
            "finetunejobs.graft.dev",
            "modelservices.graft.dev",
        }
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(crds))
        cp.kubectl("create", "namespace", RELEASE_NAMESPACE)
        rbac = _of_kind(
            chart, "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"
        )
        cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
        cp.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            *(f"crd/{c['metadata']['name']}" for c in crds),
        )
        if SHARED.is_dir():
            # before the operator starts: it watches RayServices from the start
            install_kuberay_crds(cp, tmp_path_factory.mktemp("kuberay-crds"))
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def k8s(control_plane: ControlPlane) -> client.ApiClient:
    return api_client(str(control_plane.kubeconfig))


def _service_account_kubeconfig(
    cp: ControlPlane, k8s: client.ApiClient, sa_name: str, dest: Path
) -> Path:
    """A kubeconfig with the token the control plane issued to the chart's ServiceAccount
    (what the operator pod would find mounted)."""
    core = client.CoreV1Api(k8s)

    def token() -> str | None:
        sa = core.read_namespaced_service_account(sa_name, RELEASE_NAMESPACE)
        for ref in sa.secrets or []:
            secret = core.read_namespaced_secret(ref.name, RELEASE_NAMESPACE)
            raw = (secret.data or {}).get("token")
            if raw:
                return base64.b64decode(raw).decode()
        return None

    tok: str = wait_for(f"a token for ServiceAccount {sa_name}", token, timeout=60)
    dest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "e2e",
                        "cluster": {
                            "server": cp.server,
                            "certificate-authority": str(cp.ca_file),
                        },
                    }
                ],
                "users": [{"name": sa_name, "user": {"token": tok}}],
                "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": sa_name}}],
                "current-context": "e2e",
            }
        )
    )
    return dest


@pytest.fixture(scope="session")
def operator(
    control_plane: ControlPlane,
    k8s: client.ApiClient,
    chart: list[dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """`graft-operator` as the chart's Deployment runs it: its env, its settings file, its
    ServiceAccount."""
    work = tmp_path_factory.mktemp("operator")
    (deployment,) = _of_kind(chart, "Deployment")
    pod_spec = deployment["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    assert container["command"] == ["graft-operator"]
    config_maps = {c["metadata"]["name"]: c for c in _of_kind(chart, "ConfigMap") if "data" in c}
    config_volume = next(v for v in pod_spec["volumes"] if v["name"] == "config")
    settings_cm = config_maps[config_volume["configMap"]["name"]]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    rel = Path(env["GRAFT_CONFIG"]).relative_to(mount["mountPath"])
    settings_file = work / "etc-graft" / rel
    settings_file.parent.mkdir(parents=True)
    settings_file.write_text(settings_cm["data"][str(rel)])
    kubeconfig = _service_account_kubeconfig(
        control_plane, k8s, pod_spec["serviceAccountName"], work / "sa-kubeconfig"
    )
    chart_env = {
        k: v for k, v in env.items() if k not in ("GRAFT_METRICS_PORT", "GRAFT_HEALTH_PORT")
    }
    op = OperatorProcess(
        control_plane,
        work,
        extra_env={
            **chart_env,
            "GRAFT_CONFIG": str(settings_file),
            "KUBECONFIG": str(kubeconfig),
            "POD_NAMESPACE": RELEASE_NAMESPACE,
        },
    )
    # OperatorProcess fills in test defaults; the chart's settings file must win here.
    for k in ("GRAFT_NODE_POOLS", "GRAFT_TERMINATION_GRACE_SECONDS"):
        op.env.pop(k, None)
    op.start()
    try:
        yield op
    finally:
        op.stop()
        if os.environ.get("GRAFT_SHOW_OPERATOR_LOG"):
            print(op.log())


@pytest.fixture(scope="session")
def fake_nodes(k8s: client.ApiClient) -> FakeKubelet:
    """Node objects and claims (FakeKubelet's helpers); the process kubelet runs the Pods."""
    return FakeKubelet(k8s)


@pytest.fixture(scope="session")
def process_kubelet(
    control_plane: ControlPlane, k8s: client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessKubelet]:
    kubelet = ProcessKubelet(
        k8s,
        control_plane.kubeconfig,
        tmp_path_factory.mktemp("kubelet"),
        extra_env=POD_EXTRA_ENV,
    ).start()
    try:
        yield kubelet
    finally:
        kubelet.stop()
