"""Render a ModelService as a KubeRay ``RayService`` (ray.io/v1).

The RayService's ``rayClusterConfig`` depends only on what shapes the cluster (base model,
engine, resources, image, node pool, mounted claims); adapters live in ``serveConfigV2``
only. So an adapter change is a Serve config update on the running cluster, while a
base-model or engine change is a new ``graft.dev/spec-hash`` and KubeRay rolls a new
cluster (upgradeStrategy NewCluster: the old one serves until the new one is ready).
"""

from __future__ import annotations

from typing import Any

import yaml

from graft.api.common import parse_uri, s3_env
from graft.api.modelservice import ModelService
from graft.builders import naming
from graft.builders.serve_config import (
    SERVE_PORT,
    ResolvedAdapter,
    build_serve_config,
    replica_cpus,
    resolved_engine,
)
from graft.config import NodePool, Settings

#: Ray in the server image; KubeRay uses it to pick the autoscaler's behaviour.
RAY_VERSION = "2.60.0"
SERVER_APP = "graft-server"
COMPONENT = "modelservice"
LABEL_MODELSERVICE = "graft.dev/modelservice"
#: Where claims named in pvc:// URIs are mounted in Ray pods (GRAFT_PVC_ROOT).
PVC_ROOT = "/mnt/pvc"
WORKER_GROUP = "serve"
HEAD_CONTAINER = "ray-head"
WORKER_CONTAINER = "ray-worker"
#: KubeRay names the cluster ``<rayservice>-<5 random chars>`` and its head Service
#: ``<cluster>-head-svc``, which must be a DNS label (63): 63 - 6 - 9 = 48, minus one spare.
RAYSERVICE_NAME_MAX = 47

_PORTS = [
    ("gcs-server", 6379),
    ("dashboard", 8265),
    ("client", 10001),
    ("serve", SERVE_PORT),
    ("metrics", 8080),
]


def rayservice_name(msvc: ModelService) -> str:
    return naming.fit(str(msvc.metadata["name"]), RAYSERVICE_NAME_MAX)


def serve_service_name(msvc: ModelService) -> str:
    """The Service KubeRay creates in front of the serving pods."""
    return f"{rayservice_name(msvc)}-serve-svc"


def endpoint(msvc: ModelService) -> str:
    """Base URL of the OpenAI-compatible API (what clients pass as ``base_url``)."""
    ns = msvc.metadata.get("namespace", "default")
    return f"http://{serve_service_name(msvc)}.{ns}.svc:{SERVE_PORT}/v1"


def labels(msvc: ModelService) -> dict[str, str]:
    name = str(msvc.metadata["name"])
    return {
        naming.APP_NAME: SERVER_APP,
        naming.APP_INSTANCE: naming.label_value(name),
        naming.APP_COMPONENT: COMPONENT,
        naming.APP_MANAGED_BY: naming.MANAGED_BY,
        naming.APP_PART_OF: naming.PART_OF,
        LABEL_MODELSERVICE: naming.label_value(name),
    }


def image(msvc: ModelService, settings: Settings) -> str:
    return msvc.spec.image or settings.server_image


def claims(msvc: ModelService, adapters: list[ResolvedAdapter]) -> list[str]:
    """PVC claims the pods mount: those of the base model and of the adapters.

    An adapter on a claim that is already mounted changes nothing in the cluster; one on
    a new claim adds a volume, which rolls the cluster once (a pod cannot gain a volume
    in place).
    """
    out: set[str] = set()
    for uri in [msvc.spec.model.base_model.uri, *(a.uri for a in adapters)]:
        scheme, rest = parse_uri(uri)
        if scheme == "pvc":
            out.add(rest.split("/", 1)[0])
    return sorted(out)


def cluster_spec(
    msvc: ModelService,
    adapters: list[ResolvedAdapter],
    settings: Settings,
    pool: NodePool | None,
) -> dict[str, Any]:
    """What the Ray cluster depends on; its hash is the ``graft.dev/spec-hash``.

    Autoscaling bounds are left out: KubeRay and Serve apply them without a new cluster.
    """
    return {
        "baseModel": msvc.spec.model.base_model.uri,
        "engine": resolved_engine(msvc).value,
        "resources": msvc.spec.resources.model_dump(by_alias=True, mode="json"),
        "image": image(msvc, settings),
        "pool": pool.model_dump(by_alias=True, mode="json") if pool else None,
        "claims": claims(msvc, adapters),
    }


def _security_context() -> dict[str, Any]:
    # Restricted profile except the read-only root: Ray writes session state, logs and
    # spill files in several places under its home and /tmp.
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _volumes(claim_names: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # Ray's object store lives in /dev/shm; the container default of 64 MiB is too small.
    volumes: list[dict[str, Any]] = [{"name": "shm", "emptyDir": {"medium": "Memory"}}]
    mounts: list[dict[str, Any]] = [{"name": "shm", "mountPath": "/dev/shm"}]
    for claim in claim_names:
        vol = naming.fit(f"pvc-{claim}", naming.DNS_LABEL_MAX)
        volumes.append(
            {"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": vol, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
    return volumes, mounts


def _env(msvc: ModelService) -> list[dict[str, Any]]:
    return [
        {"name": "GRAFT_PVC_ROOT", "value": PVC_ROOT},
        {"name": "GRAFT_CACHE_DIR", "value": "/tmp/graft-cache"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        *s3_env(msvc.spec.s3),
    ]


def _worker_resources(msvc: ModelService, pool: NodePool | None) -> dict[str, Any]:
    r = msvc.spec.resources
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    # Sized for exactly one Serve replica per pod, so the Ray autoscaler adds one pod per
    # replica and the worker group's min/max replicas are the deployment's.
    cpu = r.cpu or f"{replica_cpus(msvc):g}"
    limits["cpu"] = requests["cpu"] = cpu
    if r.memory:
        limits["memory"] = requests["memory"] = r.memory
    if r.gpus_per_replica:
        assert pool is not None
        limits[pool.gpu_resource] = requests[pool.gpu_resource] = r.gpus_per_replica
    return {"limits": limits, "requests": requests}


def build_rayservice(
    msvc: ModelService,
    adapters: list[ResolvedAdapter],
    settings: Settings,
    *,
    pool: NodePool | None,
) -> dict[str, Any]:
    """The RayService for ``msvc`` serving ``adapters``, with workers on ``pool``.

    ``pool`` is the node pool the reconciler chose (spec.resources.nodePool or the
    smallest that fits); None only for CPU serving (gpusPerReplica 0).
    """
    spec = msvc.spec
    if spec.resources.gpus_per_replica and pool is None:
        raise ValueError("a ModelService with gpusPerReplica > 0 needs a node pool")
    name = rayservice_name(msvc)
    meta_labels = labels(msvc)
    img = image(msvc, settings)
    claim_names = claims(msvc, adapters)
    volumes, mounts = _volumes(claim_names)
    ports = [{"name": n, "containerPort": p} for n, p in _PORTS]

    head_pod: dict[str, Any] = {
        "metadata": {"labels": dict(meta_labels)},
        "spec": {
            "containers": [
                {
                    "name": HEAD_CONTAINER,
                    "image": img,
                    "ports": ports,
                    "env": _env(msvc),
                    "resources": {
                        "requests": {"cpu": "1", "memory": "4Gi"},
                        "limits": {"cpu": "2", "memory": "8Gi"},
                    },
                    "volumeMounts": mounts,
                    "securityContext": _security_context(),
                }
            ],
            "volumes": volumes,
        },
    }
    worker_spec: dict[str, Any] = {
        "containers": [
            {
                "name": WORKER_CONTAINER,
                "image": img,
                "env": _env(msvc),
                "resources": _worker_resources(msvc, pool),
                "volumeMounts": mounts,
                "securityContext": _security_context(),
            }
        ],
        "volumes": volumes,
    }
    if spec.s3 is not None and spec.s3.service_account_name:
        # workload identity for s3:// models and adapters
        head_pod["spec"]["serviceAccountName"] = spec.s3.service_account_name
        worker_spec["serviceAccountName"] = spec.s3.service_account_name
    if pool is not None:
        if pool.node_selector:
            worker_spec["nodeSelector"] = dict(pool.node_selector)
        if pool.tolerations:
            worker_spec["tolerations"] = [dict(t) for t in pool.tolerations]
    a = spec.autoscaling
    cluster: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "headGroupSpec": {
            # No CPUs or GPUs for Ray tasks on the head: replicas always land on workers,
            # which is what lets the worker group scale to zero.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0", "num-cpus": "0"},
            "template": head_pod,
        },
        "workerGroupSpecs": [
            {
                "groupName": WORKER_GROUP,
                "replicas": a.min_replicas,
                "minReplicas": a.min_replicas,
                "maxReplicas": a.max_replicas,
                "rayStartParams": {},
                "template": {"metadata": {"labels": dict(meta_labels)}, "spec": worker_spec},
            }
        ],
    }
    serve_config = build_serve_config(msvc, adapters)
    digest = naming.spec_hash(cluster_spec(msvc, adapters, settings, pool))
    metadata: dict[str, Any] = {
        "name": name,
        "labels": meta_labels,
        "annotations": {naming.ANNOTATION_SPEC_HASH: digest},
    }
    if "namespace" in msvc.metadata:
        metadata["namespace"] = msvc.metadata["namespace"]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": cluster,
        },
    }
