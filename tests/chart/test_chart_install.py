"""`helm install` into a real control plane: CRDs established, RBAC as promised."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helm import install, uninstall

from graft.testing.cluster import wait_for
from graft.testing.controlplane import ControlPlane, start_control_plane

pytestmark = pytest.mark.integration


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[ControlPlane]:
    """A cluster of its own: the chart must install the CRDs itself (no controllers needed)."""
    cp = start_control_plane(tmp_path / "cp", controllers=False)
    try:
        yield cp
    finally:
        cp.stop()


def established(cp: ControlPlane, crd: str) -> bool:
    out = cp.kubectl(
        "get",
        f"crd/{crd}",
        "-o",
        'jsonpath={.status.conditions[?(@.type=="Established")].status}',
        check=False,
    ).stdout
    return out == "True"


def can(cp: ControlPlane, sa: str, verb: str, resource: str, ns: str | None = None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as=system:serviceaccount:{sa}"]
    args += ["-n", ns] if ns else ["--all-namespaces"]
    return cp.kubectl(*args, check=False).stdout.strip() == "yes"


def test_install_cluster_wide_then_uninstall_keeps_crds(
    helm: Path, fresh_cluster: ControlPlane
) -> None:
    cp = fresh_cluster
    out = install(cp.kubeconfig, {}, release="graft", namespace="graft-system")
    assert "graft" in out
    for crd in ("finetunejobs.graft.dev", "modelservices.graft.dev"):
        wait_for(f"{crd} established", lambda crd=crd: established(cp, crd), timeout=60)
    cp.kubectl("get", "deployment", "-n", "graft-system", "graft")
    sa = "graft-system:graft"
    assert can(cp, sa, "create", "pods")
    assert can(cp, sa, "patch", "finetunejobs.graft.dev/status")
    # KubeRay's CRD is not installed here, so can-i cannot resolve it: read the rule
    roles = json.loads(cp.kubectl("get", "clusterroles", "-o", "json").stdout)["items"]
    ray_rules = [
        r
        for role in roles
        for r in role.get("rules") or []
        if "ray.io" in (r.get("apiGroups") or []) and "rayservices" in (r.get("resources") or [])
    ]
    assert ray_rules and "create" in ray_rules[0]["verbs"]
    assert can(cp, sa, "watch", "nodes")
    assert not can(cp, sa, "list", "secrets") and not can(cp, sa, "watch", "secrets")
    uninstall(cp.kubeconfig, release="graft", namespace="graft-system")
    assert established(cp, "finetunejobs.graft.dev"), "crds.keep=true must keep the CRDs"


def test_install_single_namespace(helm: Path, fresh_cluster: ControlPlane) -> None:
    cp = fresh_cluster
    cp.kubectl("create", "namespace", "ml")
    install(cp.kubeconfig, {"watchNamespace": "ml"}, release="graft", namespace="graft-system")
    wait_for("CRDs", lambda: established(cp, "finetunejobs.graft.dev"), timeout=60)
    sa = "graft-system:graft"
    assert can(cp, sa, "create", "pods", "ml")
    assert not can(cp, sa, "create", "pods", "default")
    assert can(cp, sa, "watch", "nodes")
