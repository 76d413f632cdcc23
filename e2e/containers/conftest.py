"""The real-kubelet tier (``make e2e-containers``): the same control plane, but Pods run in
containers from the built images, under v1.20.2 kubelets on dockershim.

What this host provides in place of a cluster's infrastructure (graft.testing.docker_nodes):
three nodes (a kubelet and a Docker daemon each, on bridges the test creates), one
kube-proxy for the host, Debian's dnsmasq fed from the API as cluster DNS, and hostPath
PersistentVolumes under one directory as the shared storage the claims need. KubeRay's
CRDs come from ``../shared`` (the serving test skips without them; KubeRay's operator is
faked by ``graft.testing.fake_kuberay``). The operator is installed with Helm from its
image. Each node has one "GPU": an extended resource advertised on its status (no device
plugin), and the trainer runs on the CPU, on gloo.

Needs root, Docker and the images from ``make images``; skipped otherwise, unless
``GRAFT_E2E_CONTAINERS=require`` (then missing pieces fail the run).
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from containers_support import CLAIMS, IMAGES, NODES, POOL, RELEASE, RELEASE_NS, TAG
from e2e_support import SHARED, install_kuberay_crds
from kubernetes import client

from graft.testing.cluster import A100_LABELS, api_client, wait_for
from graft.testing.controlplane import ControlPlane, ControlPlaneError, find_assets
from graft.testing.docker_nodes import (
    ApiDnsmasq,
    BridgeNetwork,
    DockerNode,
    HostKubeProxy,
    NodeSetupError,
    node_binaries,
    node_ready,
    pause_image_tar,
    save_images,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_helm() -> ModuleType:
    """tests/chart/helm.py (the pinned helm binary and its home), under a name of its own."""
    path = REPO_ROOT / "tests" / "chart" / "helm.py"
    spec = importlib.util.spec_from_file_location("graft_e2ec_chart_helm", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helm = _load_helm()


def _unavailable(why: str) -> None:
    if os.environ.get("GRAFT_E2E_CONTAINERS") == "require":
        pytest.fail(why)
    pytest.skip(why)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("GRAFT_E2E_CONTAINERS"):
        return
    skip = pytest.mark.skip(reason="the real-kubelet tier runs with `make e2e-containers`")
    for item in items:
        if "e2e/containers" in str(item.path):
            item.add_marker(skip)


def _docker_image_exists(ref: str) -> bool:
    r = subprocess.run(["docker", "image", "inspect", ref], capture_output=True, check=False)
    return r.returncode == 0


@pytest.fixture(scope="session")
def host_ready() -> Path:
    """Root, Docker with the built images, and the node binaries (built once)."""
    if os.geteuid() != 0:
        _unavailable("the real-kubelet tier needs root (bridges, iptables, dockerd)")
    for tool in ("dockerd", "docker", "ip", "iptables", "dnsmasq"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} is missing: `apt-get install docker.io iproute2 dnsmasq-base`")
    r = subprocess.run(["bash", str(REPO_ROOT / "hack" / "start-docker.sh")], check=False)
    if r.returncode != 0:
        _unavailable("no Docker daemon could be started (hack/start-docker.sh)")
    missing = [ref for ref in IMAGES.values() if not _docker_image_exists(ref)]
    if missing:
        _unavailable(f"images {missing} are not built: run `make images` first")
    try:
        return node_binaries()
    except NodeSetupError as e:
        _unavailable(str(e))
        raise


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short, root-owned paths: dockerd's and the kubelet's socket paths have length limits.
    d = Path("/tmp/graft-e2ec")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(mode=0o755)
    return d


@pytest.fixture(scope="session")
def network(host_ready: Path) -> Iterator[BridgeNetwork]:
    net = BridgeNetwork(nodes=len(NODES))
    try:
        net.up()
    except NodeSetupError as e:
        net.down()
        _unavailable(str(e))
    try:
        yield net
    finally:
        net.down()


@pytest.fixture(scope="session")
def control_plane(network: BridgeNetwork, workdir: Path) -> Iterator[ControlPlane]:
    try:
        cp = ControlPlane(
            assets=find_assets(),
            state_dir=workdir / "cp",
            address=network.host,
            real_nodes=True,
        )
        cp.start()
    except ControlPlaneError as e:
        _unavailable(str(e))
        raise
    try:
        if SHARED.is_dir():
            # before the operator starts: it watches RayServices from the start
            (workdir / "kuberay-crds").mkdir(exist_ok=True)
            install_kuberay_crds(cp, workdir / "kuberay-crds")
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def k8s(control_plane: ControlPlane) -> client.ApiClient:
    return api_client(str(control_plane.kubeconfig))


@pytest.fixture(scope="session")
def nodes(
    host_ready: Path,
    network: BridgeNetwork,
    control_plane: ControlPlane,
    k8s: client.ApiClient,
    workdir: Path,
) -> Iterator[dict[str, DockerNode]]:
    """Three Ready A100 "nodes", DNS and kube-proxy."""
    dns = ApiDnsmasq(k8s, network.host, workdir / "dns")
    proxy = HostKubeProxy(control_plane, workdir / "proxy")
    made: dict[str, DockerNode] = {}
    pause = pause_image_tar(host_ready, workdir / "pause.tar")
    try:
        dns.start()
        proxy.start(host_ready, NODES[0])
        for i, name in enumerate(NODES, start=1):
            made[name] = DockerNode(
                name,
                i,
                network,
                control_plane,
                workdir / f"n{i}",
                labels=dict(A100_LABELS),
                extended={"nvidia.com/gpu": "1"},
            )
            made[name].start_docker()
        images = save_images(list(IMAGES.values()), workdir / "images.tar")
        with cf.ThreadPoolExecutor(len(made)) as pool:
            list(pool.map(lambda n: n.load_images(images, pause), made.values()))
        images.unlink()
        for node in made.values():
            node.start_kubelet(host_ready, network.host)
        core = client.CoreV1Api(k8s)
        for node in made.values():
            wait_for(f"node {node.name} Ready", lambda n=node: node_ready(core, n.name), 120)
            node.advertise(core)
        yield made
    finally:
        for node in made.values():
            node.stop()
        proxy.stop()
        dns.stop()


@pytest.fixture(scope="session")
def operator_release(
    control_plane: ControlPlane, nodes: dict[str, DockerNode], k8s: client.ApiClient
) -> str:
    """`helm install` of the chart with the built operator image; returns its node."""
    values = {
        "image": {
            "repository": IMAGES["operator"].split(":")[0],
            "tag": TAG,
            "pullPolicy": "Never",
        },
        "config": {
            "nodePools": [POOL],
            "terminationGraceSeconds": 10,
            "gangPendingTimeoutSeconds": 90,
            "logFormat": "json",
        },
    }
    r = subprocess.run(
        [
            str(helm.helm_bin()),
            "install",
            RELEASE,
            str(REPO_ROOT / "charts" / "graft"),
            "--namespace",
            RELEASE_NS,
            "--create-namespace",
            "--kubeconfig",
            str(control_plane.kubeconfig),
            "--wait",
            "--timeout",
            "180s",
            "-f",
            "-",
        ],
        input=yaml.safe_dump(values),
        capture_output=True,
        text=True,
        env=helm.helm_env(),
        check=False,
    )
    core = client.CoreV1Api(k8s)
    if r.returncode != 0:
        pods = core.list_namespaced_pod(RELEASE_NS).items
        raise AssertionError(f"helm install failed: {r.stderr}\npods: {[p.status for p in pods]}")
    (pod,) = core.list_namespaced_pod(RELEASE_NS).items
    # the chart's pod runs restricted: non-root (65532), read-only root, no capabilities
    node = nodes[pod.spec.node_name]
    (cid,) = node.docker(
        "ps", "-q", "--filter", f"label=io.kubernetes.pod.uid={pod.metadata.uid}",
        "--filter", "label=io.kubernetes.container.name=operator",
    ).split()  # fmt: skip
    assert node.docker("exec", cid, "id", "-u").strip() == "65532"
    seen = node.docker(
        "inspect", cid, "--format", "{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}}"
    )
    assert seen.split() == ["true", "[ALL]"], seen
    return str(pod.spec.node_name)


@pytest.fixture(scope="session")
def claims_namespace(
    k8s: client.ApiClient, operator_release: str, workdir: Path
) -> Iterator[tuple[str, Path]]:
    """A namespace with the claims in CLAIMS, on hostPath volumes under one shared
    directory (as NFS would share them between nodes); the gang test trains into it and
    the serving test serves from it."""
    ns = f"e2ec-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(k8s)
    core.create_namespace({"metadata": {"name": ns}})  # type: ignore[arg-type]
    root = workdir / "claims" / ns
    for claim in CLAIMS:
        d = root / claim
        d.mkdir(parents=True)
        d.chmod(0o777)  # the trainer runs as uid 65532; hostPath ignores fsGroup
        pv = f"{ns}-{claim}"
        core.create_persistent_volume(
            {  # type: ignore[arg-type]
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": "10Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "hostPath": {"path": str(d), "type": "Directory"},
                    "storageClassName": "",
                    "claimRef": {"namespace": ns, "name": claim},
                },
            }
        )
        core.create_namespaced_persistent_volume_claim(
            ns,
            {  # type: ignore[arg-type]
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "resources": {"requests": {"storage": "10Gi"}},
                    "storageClassName": "",
                    "volumeName": pv,
                },
            },
        )
    yield ns, root
    core.delete_namespace(ns)
