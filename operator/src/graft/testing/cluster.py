"""Fake nodes and a fake kubelet for tests on a control plane that has no kubelet.

``FakeKubelet`` is a stand-in for what cannot run here (a real kubelet): it writes Pod and
Node status the way a kubelet would, so the real scheduler, garbage collector and the
operator see the same objects they would see on a real cluster.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, config

A100_LABELS = {
    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
    "nvidia.com/gpu.memory": "81920",
    "graft.dev/test-pool": "a100-80g",
}
A100_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
CPU_LABELS = {"graft.dev/test-pool": "cpu"}

#: Node pools matching the fake nodes, as the operator's GRAFT_NODE_POOLS would list them.
TEST_NODE_POOLS: list[dict[str, Any]] = [
    {
        "name": "a100-80g",
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "gpuResource": "nvidia.com/gpu",
        "gpusPerNode": 8,
        "gpuMemoryGiB": 80,
        "pricePerGpuHour": 2.0,
        "maxNodes": 4,
    },
    {
        "name": "cpu",
        "nodeSelector": {"graft.dev/test-pool": "cpu"},
        "gpusPerNode": 0,
        "pricePerGpuHour": 0,
    },
]


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_client(kubeconfig: str) -> client.ApiClient:
    api: client.ApiClient = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    return api


def wait_for(
    what: str, probe: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


class FakeKubelet:
    """Writes Node and Pod status as kubelets would (a mock: no kubelet runs here)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)

    # -- nodes -----------------------------------------------------------------------
    def add_node(
        self,
        name: str,
        *,
        labels: dict[str, str],
        gpus: int = 0,
        gpu_resource: str = "nvidia.com/gpu",
        cpu: str = "96",
        memory: str = "1024Gi",
        taints: list[dict[str, str]] | None = None,
    ) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {**labels, "kubernetes.io/hostname": name}},
            "spec": {"taints": taints or []},
        }
        self.core.create_node(body)  # type: ignore[arg-type]
        self.set_node_ready(
            name, True, gpus=gpus, gpu_resource=gpu_resource, cpu=cpu, memory=memory
        )

    def add_a100_nodes(self, count: int, prefix: str = "a100") -> list[str]:
        names = [f"{prefix}-{i}" for i in range(count)]
        for n in names:
            self.add_node(n, labels=A100_LABELS, gpus=8, taints=[A100_TAINT])
        return names

    def add_cpu_nodes(self, count: int, prefix: str = "cpu") -> list[str]:
        names = [f"{prefix}-{i}" for i in range(count)]
        for n in names:
            self.add_node(n, labels=CPU_LABELS, cpu="16", memory="64Gi")
        return names

    def set_node_ready(
        self,
        name: str,
        ready: bool,
        *,
        gpus: int | None = None,
        gpu_resource: str = "nvidia.com/gpu",
        cpu: str = "96",
        memory: str = "1024Gi",
    ) -> None:
        status: dict[str, Any] = {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "Unknown",
                    "reason": "KubeletReady" if ready else "NodeStatusUnknown",
                    "message": "fake kubelet" if ready else "Kubelet stopped posting node status.",
                    "lastHeartbeatTime": _now(),
                    "lastTransitionTime": _now(),
                }
            ],
        }
        if gpus is not None:
            cap = {"cpu": cpu, "memory": memory, "pods": "110"}
            if gpus:
                cap[gpu_resource] = str(gpus)
            status["capacity"] = cap
            status["allocatable"] = cap
        self.core.patch_node_status(name, {"status": status})

    def delete_node(self, name: str) -> None:
        self.core.delete_node(name)

    # -- storage ---------------------------------------------------------------------
    def add_bound_claim(self, namespace: str, claim: str, size: str = "100Gi") -> None:
        """A PersistentVolumeClaim bound to a pre-made PersistentVolume.

        The scheduler only places Pods whose claims are Bound; the PV is pre-bound through
        claimRef and the controller-manager's binder completes the binding.
        """
        pv = f"pv-{namespace}-{claim}"[:63]
        self.core.create_persistent_volume(
            {  # type: ignore[arg-type]
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": size},
                    "accessModes": ["ReadWriteMany"],
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": "graft-test",
                    "hostPath": {"path": f"/tmp/graft-test-pv/{pv}"},
                    "claimRef": {"namespace": namespace, "name": claim},
                },
            }
        )
        self.core.create_namespaced_persistent_volume_claim(
            namespace,
            {  # type: ignore[arg-type]
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "graft-test",
                    "volumeName": pv,
                    "resources": {"requests": {"storage": size}},
                },
            },
        )

    # -- pods ------------------------------------------------------------------------
    def pods(self, namespace: str, selector: str) -> list[Any]:
        return list(self.core.list_namespaced_pod(namespace, label_selector=selector).items)

    def run_pod(self, namespace: str, name: str) -> None:
        """Mark a bound pod Running with all containers started."""
        pod = self.core.read_namespaced_pod(name, namespace)
        assert pod.spec is not None
        containers = [c.name for c in pod.spec.containers]
        self.core.patch_namespaced_pod_status(
            name,
            namespace,
            {
                "status": {
                    "phase": "Running",
                    "startTime": _now(),
                    "conditions": [
                        {"type": "Ready", "status": "True", "lastTransitionTime": _now()}
                    ],
                    "containerStatuses": [
                        {
                            "name": c,
                            "ready": True,
                            "restartCount": 0,
                            "image": "graft",
                            "imageID": "",
                            "state": {"running": {"startedAt": _now()}},
                        }
                        for c in containers
                    ],
                }
            },
        )

    def finish_pod(
        self,
        namespace: str,
        name: str,
        exit_code: int,
        message: dict[str, Any] | str | None = None,
        reason: str | None = None,
    ) -> None:
        """Mark a pod's containers terminated with ``exit_code`` (and a termination message)."""
        pod = self.core.read_namespaced_pod(name, namespace)
        assert pod.spec is not None
        text = json.dumps(message) if isinstance(message, dict) else (message or "")
        term = {
            "exitCode": exit_code,
            "finishedAt": _now(),
            "startedAt": _now(),
            "reason": reason or ("Completed" if exit_code == 0 else "Error"),
        }
        if text:  # an empty string in a list item is refused by the 1.20 apiserver
            term["message"] = text
        self.core.patch_namespaced_pod_status(
            name,
            namespace,
            {
                "status": {
                    "phase": "Succeeded" if exit_code == 0 else "Failed",
                    "containerStatuses": [
                        {
                            "name": c.name,
                            "ready": False,
                            "restartCount": 0,
                            "image": "graft",
                            "imageID": "",
                            "state": {"terminated": term},
                        }
                        for c in pod.spec.containers
                    ],
                }
            },
        )

    def confirm_deletions(self, namespace: str) -> int:
        """Finish graceful deletions, as a kubelet does once the containers have exited."""
        done = 0
        for pod in self.core.list_namespaced_pod(namespace).items:
            assert pod.metadata is not None and pod.metadata.name is not None
            if pod.metadata.deletion_timestamp is None:
                continue
            try:
                self.core.delete_namespaced_pod(
                    pod.metadata.name, namespace, grace_period_seconds=0
                )
                done += 1
            except client.ApiException as e:
                if e.status != 404:
                    raise
        return done

    def force_delete_pods(self, namespace: str) -> None:
        """Delete every pod at once: no kubelet is here to confirm a graceful deletion."""
        for pod in self.core.list_namespaced_pod(namespace).items:
            assert pod.metadata is not None and pod.metadata.name is not None
            try:
                self.core.delete_namespaced_pod(
                    pod.metadata.name, namespace, grace_period_seconds=0
                )
            except client.ApiException as e:
                if e.status != 404:
                    raise

    def evict_pod(self, namespace: str, name: str) -> None:
        """Mark a pod Failed with reason Evicted, as the kubelet does under node pressure."""
        self.core.patch_namespaced_pod_status(
            name,
            namespace,
            {
                "status": {
                    "phase": "Failed",
                    "reason": "Evicted",
                    "message": "The node was low on resource: memory.",
                }
            },
        )
