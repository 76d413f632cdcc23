"""The operator image runs the chart's pod and reconciles a FineTuneJob to pods.

The chart is installed into the test control plane with `--set image.repository/tag` of
the built image; its Deployment's pod template (settings, ConfigMap, /tmp emptyDir,
restricted security context) then runs in Docker on the host network, with the chart's
ServiceAccount token mounted where a pod finds it. No kubelet: the Deployment's own pod
stays Pending and the container stands in for it.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from dockerpod import DockerPod, write_service_account
from helm import install
from kubernetes import client

from graft.testing.cluster import TEST_NODE_POOLS, FakeKubelet, wait_for
from graft.testing.controlplane import ControlPlane, free_port

pytestmark = pytest.mark.integration


def _sa_token(core: client.CoreV1Api, namespace: str, account: str) -> str:
    """The ServiceAccount's token: the legacy token Secret Kubernetes 1.20 creates for it."""
    import base64

    def token() -> str | None:
        for s in core.list_namespaced_secret(namespace).items:
            ann = s.metadata.annotations or {}
            if (
                s.type == "kubernetes.io/service-account-token"
                and ann.get("kubernetes.io/service-account.name") == account
            ):
                return base64.b64decode(s.data["token"]).decode()
        return None

    return wait_for(f"token of {namespace}/{account}", token, timeout=60)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def test_operator_image_runs_the_chart_pod_and_makes_trainer_pods(
    operator_image: str,
    control_plane: ControlPlane,
    k8s: client.ApiClient,
    kubelet: FakeKubelet,
    tmp_path: Path,
) -> None:
    repo, tag = operator_image.rsplit(":", 1)
    release_ns = f"graft-img-{uuid.uuid4().hex[:6]}"
    health, metrics = free_port(), free_port()
    values: dict[str, Any] = {
        "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
        "config": {"nodePools": TEST_NODE_POOLS},
        "health": {"port": health},
        "metrics": {"port": metrics},
        "crds": {"enabled": False},
    }
    control_plane.kubectl("create", "namespace", release_ns)
    install(control_plane.kubeconfig, values, release="graft", namespace=release_ns)
    apps = client.AppsV1Api(k8s)
    core = client.CoreV1Api(k8s)
    dep = k8s.sanitize_for_serialization(apps.read_namespaced_deployment("graft", release_ns))
    template = dep["spec"]["template"]
    assert template["spec"]["containers"][0]["image"] == operator_image
    pod = {"metadata": {"name": "graft-docker", "namespace": release_ns}, "spec": template["spec"]}
    cms = {
        v["configMap"]["name"]: core.read_namespaced_config_map(
            v["configMap"]["name"], release_ns
        ).data
        for v in template["spec"]["volumes"]
        if "configMap" in v
    }
    account = template["spec"]["serviceAccountName"]
    write_service_account(
        tmp_path, _sa_token(core, release_ns, account), control_plane.ca_file, release_ns
    )
    op = DockerPod(pod, tmp_path, config_maps=cms, api_server=control_plane.server)
    # the chart's pod: non-root, read-only root, nothing but what it mounts is writable
    argv = op.argv()
    assert "--read-only" in argv and "--cap-drop=ALL" in argv
    op.start()
    try:
        wait_for("operator container healthy", lambda: _healthy(health) or None, timeout=90)
        assert op.exec("id", "-u").strip() == "65532"
        ns = f"img-{uuid.uuid4().hex[:6]}"
        core.create_namespace({"metadata": {"name": ns}})  # type: ignore[arg-type]
        nodes = kubelet.add_cpu_nodes(1, prefix=f"img-cpu-{ns}")
        custom = client.CustomObjectsApi(k8s)
        job = {
            "apiVersion": "graft.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "tiny"},
            "spec": {
                "baseModel": {"uri": "pvc://models/tiny"},
                "stages": [
                    {"type": "SFT", "dataset": {"uri": "pvc://data/sft.jsonl", "format": "alpaca"}}
                ],
                "output": {"uri": "pvc://models/out"},
                "resources": {"nodePool": "cpu", "nodes": 1, "cpu": "1", "memory": "1Gi"},
            },
        }
        for claim in ("models", "data"):
            kubelet.add_bound_claim(ns, claim)
        custom.create_namespaced_custom_object("graft.dev", "v1alpha1", ns, "finetunejobs", job)
        pods = wait_for(
            "trainer pod bound to the CPU node",
            lambda: (
                [p for p in core.list_namespaced_pod(ns).items if p.spec.node_name in nodes] or None
            ),
            timeout=90,
        )
        assert pods[0].metadata.name == "tiny-a1-r0"
        status = wait_for(
            "FineTuneJob status from the containerised operator",
            lambda: (
                custom.get_namespaced_custom_object(
                    "graft.dev", "v1alpha1", ns, "finetunejobs", "tiny"
                )
                .get("status", {})
                .get("phase")
            ),
            timeout=60,
        )
        assert status in ("Pending", "Running")
        # SIGTERM reaches PID 1 (the operator) and it stops inside the grace period
        t0 = time.monotonic()
        op.stop(timeout=int(template["spec"].get("terminationGracePeriodSeconds", 30)))
        took = time.monotonic() - t0
        state = op.state()
        assert state["ExitCode"] == 0, (state, op.logs()[-3000:])
        assert took < 20, f"the operator took {took:.0f}s to stop on SIGTERM"
        for n in nodes:
            kubelet.delete_node(n)
    finally:
        logs = op.logs()
        op.remove()
        print(logs[-4000:])
