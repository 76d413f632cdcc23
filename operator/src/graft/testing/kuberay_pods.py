"""Fake KubeRay's pod assembly: the head and worker PodSpecs KubeRay makes from a RayService.

KubeRay's Go operator cannot run here. This follows its ``ray-operator/controllers/ray/
common/pod.go`` at the commit whose CRDs the tests validate against (feeaf72), for what
changes a pod's security: the containers and volumes it injects. Tests check those pods
against the "restricted" profile and dry-run them on the real apiserver.
"""

from __future__ import annotations

import copy
from typing import Any


def kuberay_pods(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The head and worker PodSpecs as fake KubeRay assembles them from a RayService.

    KubeRay's Go operator cannot run here; this follows its pod.go at the pinned commit
    (feeaf72): with in-tree autoscaling it adds an ``autoscaler`` sidecar to the head
    (resources, securityContext, env and volumeMounts from ``autoscalerOptions``) and a
    ``ray-logs`` emptyDir at /tmp/ray shared by the two; with ENABLE_INIT_CONTAINER_INJECTION
    (its default) workers get a ``wait-gcs-ready`` init container with the Ray container's
    securityContext, env and mounts and 200m/256Mi; /dev/shm is added only when absent.
    """
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = copy.deepcopy(cluster["headGroupSpec"]["template"]["spec"])
    opts = cluster.get("autoscalerOptions") or {}
    sidecar = {
        "name": "autoscaler",
        "image": head["containers"][0]["image"],
        "resources": opts.get(
            "resources",
            {
                "limits": {"cpu": "500m", "memory": "512Mi"},
                "requests": {"cpu": "500m", "memory": "512Mi"},
            },
        ),
        "env": list(opts.get("env") or []),
        "volumeMounts": list(opts.get("volumeMounts") or []),
    }
    if "securityContext" in opts:
        sidecar["securityContext"] = opts["securityContext"]
    head["containers"].append(sidecar)
    for c in (head["containers"][0], sidecar):
        if not any(m["mountPath"] == "/tmp/ray" for m in c.get("volumeMounts") or []):
            c.setdefault("volumeMounts", []).append({"name": "ray-logs", "mountPath": "/tmp/ray"})
    if not any(v["name"] == "ray-logs" for v in head["volumes"]):
        head["volumes"].append({"name": "ray-logs", "emptyDir": {}})
    worker = copy.deepcopy(cluster["workerGroupSpecs"][0]["template"]["spec"])
    ray = worker["containers"][0]
    worker.setdefault("initContainers", []).append(
        {
            "name": "wait-gcs-ready",
            "image": ray["image"],
            "securityContext": copy.deepcopy(ray.get("securityContext")),
            "env": ray.get("env"),
            "volumeMounts": ray.get("volumeMounts"),
            "resources": {
                "limits": {"cpu": "200m", "memory": "256Mi"},
                "requests": {"cpu": "200m", "memory": "256Mi"},
            },
        }
    )
    for spec in (head, worker):
        c = spec["containers"][0]
        if not any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"]):
            spec["volumes"].append({"name": "shared-mem", "emptyDir": {"medium": "Memory"}})
    return {"head": head, "worker": worker}
