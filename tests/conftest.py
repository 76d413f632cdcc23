"""Fixtures shared by every tier: the real control plane and the real operator process."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from graft.testing.cluster import FakeKubelet, api_client
from graft.testing.controlplane import ControlPlane, start_control_plane
from graft.testing.operator import OperatorProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + controller-manager + scheduler, with the CRDs installed."""
    cp = start_control_plane(tmp_path_factory.mktemp("control-plane"))
    try:
        cp.kubectl("apply", "-f", str(REPO_ROOT / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                   "crd/finetunejobs.graft.dev", "crd/modelservices.graft.dev")
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def k8s(control_plane: ControlPlane) -> client.ApiClient:
    return api_client(str(control_plane.kubeconfig))


@pytest.fixture(scope="session")
def kubelet(k8s: client.ApiClient) -> FakeKubelet:
    return FakeKubelet(k8s)


@pytest.fixture(scope="session")
def operator_process(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(control_plane, tmp_path_factory.mktemp("operator")).start()
    try:
        yield op
    finally:
        op.stop()
        if os.environ.get("GRAFT_SHOW_OPERATOR_LOG"):
            print(op.log())


@pytest.fixture
def namespace(k8s: client.ApiClient) -> Iterator[str]:
    """A fresh namespace per test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(k8s)
    core.create_namespace({"metadata": {"name": name}})  # type: ignore[arg-type]
    yield name
    core.delete_namespace(name)
