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

from graft.api.common import parse_uri, quantity, s3_env
from graft.api.modelservice import ModelService
from graft.builders import naming
from graft.builders.serve_config import (
    API_KEYS_DIR,
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

GCS_PORT = 6379
DASHBOARD_PORT = 8265
METRICS_PORT = 8080
#: The head's ports that KubeRay puts on the head Service. Ray Client (10001) is left out:
#: nothing of Graft's uses it, and it runs arbitrary code for whoever reaches it.
_PORTS = [
    ("gcs-server", GCS_PORT),
    ("dashboard", DASHBOARD_PORT),
    ("serve", SERVE_PORT),
    ("metrics", METRICS_PORT),
]
#: The server image's user: rayproject/ray's "ray" (uid 1000, group users 100).
RAY_UID = 1000
RAY_GID = 100
#: Bump when the rendered pods change in a way running clusters must pick up (for example
#: their security context): it is part of the spec hash, so each cluster rolls once.
POD_LAYOUT = 2
TMP_VOLUME = "tmp"
SHM_VOLUME = "shm"
API_KEYS_VOLUME = "api-keys"
HEAD_RESOURCES = {
    "requests": {"cpu": "1", "memory": "4Gi"},
    "limits": {"cpu": "2", "memory": "8Gi"},
}
#: KubeRay's own default for the autoscaler sidecar, written out so it is ours to see.
AUTOSCALER_RESOURCES = {
    "requests": {"cpu": "500m", "memory": "512Mi"},
    "limits": {"cpu": "500m", "memory": "512Mi"},
}
#: Replica memory when spec.resources.memory is unset: CPU replicas hold a small model;
#: vLLM stages weights in host memory while loading them onto each GPU.
DEFAULT_CPU_REPLICA_MEMORY = "8Gi"
DEFAULT_MEMORY_PER_GPU_GIB = 32
#: Label of the KubeRay operator's pods (its Helm chart's), which call the dashboard.
KUBERAY_OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}
#: Label of the Graft operator's pod (its chart's default name).
GRAFT_OPERATOR_LABELS = {"app.kubernetes.io/name": "graft"}
RAY_TOKEN_KEY = "auth_token"
#: On the RayService: hash of the NetworkPolicy rendered with it (change detection).
ANNOTATION_NETWORK_HASH = "graft.dev/network-hash"
#: The label the apiserver puts on every Namespace (Kubernetes >= 1.21) with its name.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def rayservice_name_for(name: str) -> str:
    """The RayService of the ModelService ``name``. KubeRay refuses a RayService whose name
    is not a DNS-1035 label of at most 47 characters (it names Services after it), while a
    ModelService may be named ``llama.v2`` or ``7b-chat``: those get a rewritten name
    (``naming.dns_label``); a valid name is kept."""
    return naming.dns_label(name, letter_first=True, limit=RAYSERVICE_NAME_MAX)


def rayservice_name(msvc: ModelService) -> str:
    return rayservice_name_for(str(msvc.metadata["name"]))


def ray_token_secret_name(msvc: ModelService) -> str:
    """The Secret (key ``auth_token``) with the Ray cluster's authentication token."""
    return f"{rayservice_name(msvc)}-ray-token"


def network_policy_name(msvc: ModelService) -> str:
    return f"{rayservice_name(msvc)}-ray"


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
        "auth": msvc.spec.auth.model_dump(by_alias=True, mode="json", exclude_none=True),
        "layout": POD_LAYOUT,
    }


def pod_security_context() -> dict[str, Any]:
    """The "restricted" Pod Security Standard, at the pod level."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        # Group-readable claims and Secrets; OnRootMismatch spares a recursive chown of a
        # model directory on every start.
        "fsGroup": RAY_GID,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """Restricted, with a read-only root: Ray writes only under /tmp (an emptyDir) and
    /dev/shm. KubeRay copies it to the init container it injects into workers."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _mebibytes(bytes_: float) -> str:
    return f"{max(64, int(bytes_ // 2**20))}Mi"


def _volumes(
    claim_names: list[str], shm_limit: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # Ray's object store lives in /dev/shm (the container default of 64 MiB is too small);
    # a memory emptyDir counts against the container's memory limit, and the sizeLimit
    # keeps it from taking all of it. /tmp holds Ray's session directory, caches and
    # downloaded weights: everything written, the root filesystem being read-only.
    volumes: list[dict[str, Any]] = [
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm_limit}},
        {"name": TMP_VOLUME, "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
    ]
    for claim in claim_names:
        vol = naming.fit(f"pvc-{claim}", naming.DNS_LABEL_MAX)
        volumes.append(
            {"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": vol, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
    return volumes, mounts


def _env(msvc: ModelService) -> list[dict[str, Any]]:
    # Caches that default to the (read-only) home directory go to /tmp instead.
    return [
        {"name": "GRAFT_PVC_ROOT", "value": PVC_ROOT},
        {"name": "GRAFT_CACHE_DIR", "value": "/tmp/graft-cache"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        {"name": "XDG_CONFIG_HOME", "value": "/tmp/.config"},
        {"name": "TRITON_CACHE_DIR", "value": "/tmp/.triton"},
        *s3_env(msvc.spec.s3),
    ]


def replica_memory(msvc: ModelService) -> str:
    """Memory of a worker pod (one replica): spec.resources.memory or a default."""
    r = msvc.spec.resources
    if r.memory:
        return r.memory
    if r.gpus_per_replica:
        return f"{DEFAULT_MEMORY_PER_GPU_GIB * r.gpus_per_replica}Gi"
    return DEFAULT_CPU_REPLICA_MEMORY


def _worker_resources(msvc: ModelService, pool: NodePool | None) -> dict[str, Any]:
    r = msvc.spec.resources
    # Sized for exactly one Serve replica per pod, so the Ray autoscaler adds one pod per
    # replica and the worker group's min/max replicas are the deployment's.
    cpu = r.cpu or f"{replica_cpus(msvc):g}"
    memory = replica_memory(msvc)
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    requests: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if r.gpus_per_replica:
        assert pool is not None
        limits[pool.gpu_resource] = requests[pool.gpu_resource] = r.gpus_per_replica
    return {"limits": limits, "requests": requests}


def _api_keys(msvc: ModelService) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ref = msvc.spec.auth.api_key_secret_ref
    if ref is None:
        return [], []
    volume = {
        "name": API_KEYS_VOLUME,
        # The key becomes the file the server reads (API_KEYS_FILE); a directory mount,
        # not subPath, so the kubelet's updates of the Secret reach the running pods.
        "secret": {
            "secretName": ref.name,
            "items": [{"key": ref.key, "path": "keys"}],
            "defaultMode": 0o440,
        },
    }
    mount = {"name": API_KEYS_VOLUME, "mountPath": API_KEYS_DIR, "readOnly": True}
    return [volume], [mount]


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
    ports = [{"name": n, "containerPort": p} for n, p in _PORTS]
    head_shm = _mebibytes(quantity(HEAD_RESOURCES["limits"]["memory"]) / 4)
    head_volumes, head_mounts = _volumes(claim_names, head_shm)
    worker_shm = _mebibytes(quantity(replica_memory(msvc)) / 2)
    worker_volumes, worker_mounts = _volumes(claim_names, worker_shm)
    key_volumes, key_mounts = _api_keys(msvc)

    head_pod: dict[str, Any] = {
        "metadata": {"labels": dict(meta_labels)},
        "spec": {
            "securityContext": pod_security_context(),
            "containers": [
                {
                    "name": HEAD_CONTAINER,
                    "image": img,
                    "ports": ports,
                    "env": _env(msvc),
                    "resources": HEAD_RESOURCES,
                    "volumeMounts": head_mounts,
                    "securityContext": container_security_context(),
                }
            ],
            "volumes": head_volumes,
        },
    }
    worker_spec: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "containers": [
            {
                "name": WORKER_CONTAINER,
                "image": img,
                "env": _env(msvc),
                "resources": _worker_resources(msvc, pool),
                "volumeMounts": worker_mounts + key_mounts,
                "securityContext": container_security_context(),
            }
        ],
        "volumes": worker_volumes + key_volumes,
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
        # Ray's token authentication (Ray >= 2.52): GCS, dashboard, Jobs API and Ray Client
        # all ask for the token in this Secret, which the operator creates per
        # ModelService; KubeRay passes it to every Ray container and uses it itself.
        "authOptions": {"mode": "token", "secretName": ray_token_secret_name(msvc)},
        "autoscalerOptions": {
            "resources": AUTOSCALER_RESOURCES,
            "securityContext": container_security_context(),
            "env": _env(msvc),
            # KubeRay shares /tmp/ray between head and sidecar; the rest of /tmp is ours.
            "volumeMounts": [{"name": TMP_VOLUME, "mountPath": "/tmp"}],
        },
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


def build_ray_token_secret(msvc: ModelService, token: str) -> dict[str, Any]:
    """The Secret holding ``token``, the Ray cluster's authentication token.

    The caller draws the token (builders use no randomness) and creates the Secret only
    when it is absent, so the token never changes under a running cluster.
    """
    metadata: dict[str, Any] = {"name": ray_token_secret_name(msvc), "labels": labels(msvc)}
    if "namespace" in msvc.metadata:
        metadata["namespace"] = msvc.metadata["namespace"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "stringData": {RAY_TOKEN_KEY: token},
    }


def build_network_policy(msvc: ModelService, settings: Settings) -> dict[str, Any]:
    """Ingress to the service's Ray pods: everything from its own pods (GCS, raylets,
    object transfers and workers use many ports), the dashboard from the KubeRay operator
    (which deploys the Serve config through it), and the Serve port (the OpenAI endpoint)
    from the ModelService's namespace and those spec.network allows. Nothing else."""
    name = str(msvc.metadata["name"])
    own = {LABEL_MODELSERVICE: naming.label_value(name)}
    ns = msvc.metadata.get("namespace")
    net = msvc.spec.network
    # The Graft operator reads /readyz through the Serve Service (canary reports).
    serve_from: list[dict[str, Any]] = [
        {"podSelector": {}},
        {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(GRAFT_OPERATOR_LABELS)}},
    ]
    for other in net.allow_from_namespaces:
        if other != ns:
            serve_from.append({"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: other}}})
    if net.allow_from_namespace_labels is not None:
        serve_from.append(
            {"namespaceSelector": {"matchLabels": dict(net.allow_from_namespace_labels)}}
        )
    kuberay_ns: dict[str, Any] = (
        {"matchLabels": {NAMESPACE_NAME_LABEL: settings.kuberay_namespace}}
        if settings.kuberay_namespace
        else {}
    )
    metadata: dict[str, Any] = {"name": network_policy_name(msvc), "labels": labels(msvc)}
    if ns is not None:
        metadata["namespace"] = ns
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {
            "podSelector": {"matchLabels": own},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": own}}]},
                {
                    "from": [
                        {
                            "namespaceSelector": kuberay_ns,
                            "podSelector": {"matchLabels": dict(KUBERAY_OPERATOR_LABELS)},
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}],
                },
                {"from": serve_from, "ports": [{"protocol": "TCP", "port": SERVE_PORT}]},
            ],
        },
    }
