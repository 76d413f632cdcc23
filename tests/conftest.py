"""Fixtures shared by every tier: the real control plane and the real operator process."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from graft.testing.cluster import FakeKubelet, api_client, wait_for
from graft.testing.controlplane import ControlPlane, start_control_plane
from graft.testing.operator import OperatorProcess

NodeFactory = Callable[..., list[str]]
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
KUBERAY = SHARED / "thirdparty" / "kuberay"


#: ``--cpu-hogs N`` (or GRAFT_TEST_CPU_HOGS=N): N processes that spin on the CPU for the
#: whole session, so that the tests run as on a busy node (``make test-under-load``).
HOG = "while True:\n    pass\n"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-hogs",
        type=int,
        default=int(os.environ.get("GRAFT_TEST_CPU_HOGS") or 0),
        help="busy processes to run beside the tests (default GRAFT_TEST_CPU_HOGS or 0)",
    )


@pytest.fixture(scope="session", autouse=True)
def cpu_hogs(request: pytest.FixtureRequest) -> Iterator[int]:
    count = int(request.config.getoption("--cpu-hogs"))
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(count)]
    try:
        yield count
    finally:
        for h in hogs:
            h.kill()
            h.wait()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + controller-manager + scheduler, with the CRDs installed."""
    cp = start_control_plane(tmp_path_factory.mktemp("control-plane"))
    try:
        cp.kubectl("apply", "-f", str(REPO_ROOT / "crds"))
        cp.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/finetunejobs.graft.dev",
            "crd/modelservices.graft.dev",
        )
        if KUBERAY.is_dir():
            # KubeRay's current CRDs need three edits to install on 1.20 (no CEL, ...):
            # ../shared/envtest/downlevel_crd.py makes them, into a temp dir (never the repo).
            out = tmp_path_factory.mktemp("kuberay-crds")
            crds = [str(p) for p in sorted(KUBERAY.glob("*.yaml"))]
            script = str(SHARED / "envtest" / "downlevel_crd.py")
            subprocess.run([sys.executable, script, str(out), *crds], check=True)
            cp.kubectl("apply", "--server-side", "-f", str(out))
            # kubectl wait errors while a fresh CRD has no conditions yet: poll instead
            wait_for(
                "KubeRay CRDs established",
                lambda: all(
                    "True"
                    in cp.kubectl(
                        "get",
                        f"crd/{c}.ray.io",
                        "-o",
                        'jsonpath={.status.conditions[?(@.type=="Established")].status}',
                        check=False,
                    ).stdout
                    for c in ("rayservices", "rayclusters")
                ),
                timeout=60,
            )
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
def nodes(kubelet: FakeKubelet) -> Iterator[NodeFactory]:
    """Fake nodes for one test, deleted afterwards so tests do not share capacity."""
    made: list[str] = []
    tag = uuid.uuid4().hex[:5]

    def factory(a100: int = 0, cpu: int = 0) -> list[str]:
        names = kubelet.add_a100_nodes(a100, prefix=f"a100-{tag}-{len(made)}") if a100 else []
        names += kubelet.add_cpu_nodes(cpu, prefix=f"cpu-{tag}-{len(made)}") if cpu else []
        made.extend(names)
        return names

    yield factory
    for n in made:
        try:
            kubelet.delete_node(n)
        except client.ApiException as e:
            if e.status != 404:
                raise


@pytest.fixture
def namespace(k8s: client.ApiClient) -> Iterator[str]:
    """A fresh namespace per test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(k8s)
    core.create_namespace({"metadata": {"name": name}})  # type: ignore[arg-type]
    yield name
    # Jobs first (else the operator sees their pods vanish and starts new attempts),
    # then pods at once: no kubelet is here to confirm a graceful deletion.
    custom = client.CustomObjectsApi(k8s)
    for plural in ("finetunejobs", "modelservices"):
        custom.delete_collection_namespaced_custom_object("graft.dev", "v1alpha1", name, plural)
    FakeKubelet(k8s).force_delete_pods(name)
    core.delete_namespace(name)
