"""What the e2e conftest and tests share: the install's values, and the fakes of what
cannot run here (KubeRay's operator) beside a real local Ray Serve.

A module of its own, not conftest.py, so that tests import it by a unique name.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from graft.testing.cluster import A100_LABELS

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
RELEASE = "graft"
RELEASE_NAMESPACE = "graft-system"

#: One "GPU" per node: each rank is one local CPU process (GRAFT_NPROC_PER_NODE=1).
E2E_POOL: dict[str, Any] = {
    "name": "a100-e2e",
    "nodeSelector": {"nvidia.com/gpu.product": A100_LABELS["nvidia.com/gpu.product"]},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "gpuResource": "nvidia.com/gpu",
    "gpusPerNode": 1,
    "gpuMemoryGiB": 80,
    "pricePerGpuHour": 1.8,
    "maxNodes": 3,
}

#: Helm values of the e2e install; everything else is the chart's default.
CHART_VALUES: dict[str, Any] = {
    "config": {
        "nodePools": [E2E_POOL],
        # the minimum the chart allows: a SIGTERMed tiny trainer needs well under a second
        "terminationGraceSeconds": 10,
        "gangPendingTimeoutSeconds": 60,
        "logFormat": "json",
        "logLevel": "INFO",
    },
}

#: What every process the kubelet starts gets on top of its Pod's environment: one
#: intra-op thread per process on a shared 2-core machine, and progress every second
#: (the trainer's defaults, 5 s lines and 10 s Pod patches, suit real runs of hours).
POD_EXTRA_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GRAFT_PROGRESS_INTERVAL": "1",
    "GRAFT_ANNOTATION_INTERVAL": "1",
    "PYTHONUNBUFFERED": "1",
}


class FakeKubeRayOperator:
    """A fake of KubeRay's Go operator for one RayService: instead of starting a Ray cluster
    in pods it applies the RayService's ``serveConfigV2`` to a local Ray Serve (the call
    KubeRay makes to the head's dashboard) and writes the RayService status KubeRay would
    write from what Serve reports.

    Paths: ``pvc://`` URIs in the config resolve under ``GRAFT_PVC_ROOT`` of the local Ray
    processes (the claims' local directories); each "GPU" is a CPU here, so ``num_gpus``
    becomes 0, as for training.
    """

    def __init__(self, k8s: client.ApiClient, ns: str, serve: LocalServe) -> None:
        self.custom = client.CustomObjectsApi(k8s)
        self.ns = ns
        self.serve = serve

    def get(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            "ray.io", "v1", self.ns, "rayservices", name
        )
        return obj

    def reconcile(self, name: str) -> dict[str, Any]:
        rs = self.get(name)
        config = yaml.safe_load(rs["spec"]["serveConfigV2"])
        for app in config["applications"]:
            for dep in app.get("deployments") or []:
                opts = dep.get("ray_actor_options") or {}
                if opts.get("num_gpus"):
                    opts["num_gpus"] = 0
        self.serve.deploy(config)
        from ray import serve

        apps = serve.status().applications
        workers = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        desired = sum(int(w.get("replicas") or 0) for w in workers)
        running = sum(
            int(d.replica_states.get("RUNNING", 0))
            for a in apps.values()
            for d in a.deployments.values()
        )
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        cluster_name = f"{name}-{uuid.uuid4().hex[:5]}"
        status = {
            "serviceStatus": "Running",
            "numServeEndpoints": 1,
            "observedGeneration": rs["metadata"].get("generation", 1),
            "lastUpdateTime": now,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "NonZeroServeEndpoints",
                    "message": "Number of serve endpoints is greater than 0",
                    "lastTransitionTime": now,
                    "observedGeneration": rs["metadata"].get("generation", 1),
                },
                {
                    "type": "UpgradeInProgress",
                    "status": "False",
                    "reason": "NoPendingCluster",
                    "message": "Active Ray cluster exists and no pending Ray cluster",
                    "lastTransitionTime": now,
                    "observedGeneration": rs["metadata"].get("generation", 1),
                },
            ],
            "activeServiceStatus": {
                "rayClusterName": cluster_name,
                "applicationStatuses": {
                    app_name: {
                        "status": str(a.status),
                        "message": a.message or "",
                        "serveDeploymentStatuses": {
                            dep_name: {"status": str(d.status), "message": d.message or ""}
                            for dep_name, d in a.deployments.items()
                        },
                    }
                    for app_name, a in apps.items()
                },
                "rayClusterStatus": {
                    "state": "ready",
                    "desiredWorkerReplicas": desired,
                    "readyWorkerReplicas": running,
                    "availableWorkerReplicas": running,
                    "minWorkerReplicas": sum(int(w.get("minReplicas") or 0) for w in workers),
                    "maxWorkerReplicas": sum(int(w.get("maxReplicas") or 0) for w in workers),
                    "head": {"serviceName": f"{cluster_name}-head-svc"},
                    "lastUpdateTime": now,
                },
            },
        }
        self.custom.patch_namespaced_custom_object_status(
            "ray.io", "v1", self.ns, "rayservices", name, {"status": status}
        )
        return status


class LocalServe:
    """A real local Ray Serve; ``deploy`` applies a serve config as KubeRay's call would."""

    def __init__(self, port: int, client_: Any) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.client = client_

    def deploy(self, config: dict[str, Any], timeout: float = 180) -> None:
        from ray import serve
        from ray.serve.schema import ServeDeploySchema

        cfg = dict(config)
        cfg["http_options"] = {"host": "127.0.0.1", "port": self.port}
        self.client.deploy_apps(ServeDeploySchema.model_validate(cfg))
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            apps = serve.status().applications
            last = {n: (str(a.status), a.message) for n, a in apps.items()}
            if apps and all(str(a.status) == "RUNNING" for a in apps.values()):
                return
            if any(str(a.status) == "DEPLOY_FAILED" for a in apps.values()):
                raise AssertionError(f"serve deploy failed: {last}")
            time.sleep(0.5)
        raise AssertionError(f"serve apps not RUNNING after {timeout}s: {last}")
