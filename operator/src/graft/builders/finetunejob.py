"""Desired children of a FineTuneJob: the config ConfigMap, the gang Service, the rank Pods.

Pure: the typed job, its placement, the pool and the settings in; plain dicts out. Every
child carries ``graft.dev/spec-hash`` (see :func:`graft.builders.naming.with_spec_hash`).
Owner references are not set here: the caller adds a controller reference with
``kopf.adopt`` before applying, so deletion of the job garbage-collects every child.

What a trainer Pod gets is fixed by docs/runtime-contract.md.
"""

from __future__ import annotations

import json
import math
from typing import Any

from graft.api.common import parse_uri, quantity, s3_env
from graft.api.finetunejob import FineTuneJob, FineTuneJobSpec, Placement
from graft.builders import naming
from graft.builders.trainer_children import heartbeat_interval, heartbeat_timeout
from graft.config import NodePool, Settings
from graft.placement import estimate_params_billion, parallelism

CONFIG_DIR = "/etc/graft"
CONFIG_FILE = "job.json"
PVC_ROOT = "/mnt/pvc"
TERMINATION_LOG = "/dev/termination-log"
MASTER_PORT = 29500
TRAINER_COMMAND = ["python", "-m", "graft.runtime.train"]
TRAINER_CONTAINER = "trainer"
COMPONENT_TRAINER = "trainer"
COMPONENT_CONFIG = "config"
COMPONENT_GANG = "gang"
COMPONENT_IDENTITY = "identity"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_COUNT = "kueue.x-k8s.io/pod-group-total-count"
HOSTNAME_KEY = "kubernetes.io/hostname"
#: UID and GID the trainer runs as (the "nonroot" user of images/trainer).
TRAINER_UID = 65532
#: Size limit of the writable /tmp (HOME of the trainer user; library caches).
TMP_SIZE = "8Gi"


def job_name(job: FineTuneJob) -> str:
    name = job.metadata.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("FineTuneJob has no metadata.name")
    return name


def job_namespace(job: FineTuneJob) -> str:
    ns = job.metadata.get("namespace")
    return ns if isinstance(ns, str) and ns else "default"


def checkpoint_uri(spec: FineTuneJobSpec) -> str:
    """Where checkpoints go: ``spec.checkpoint.uri``, else ``<output.uri>/checkpoints``."""
    if spec.checkpoint.uri:
        return spec.checkpoint.uri
    return spec.output.uri.rstrip("/") + "/checkpoints"


def pvc_claim(uri: str) -> str | None:
    """The claim of a ``pvc://<claim>/<path>`` URI; None for other schemes."""
    scheme, rest = parse_uri(uri)
    if scheme != "pvc":
        return None
    return rest.split("/", 1)[0]


def storage_uris(spec: FineTuneJobSpec) -> list[tuple[str, str]]:
    """Every storage URI of the spec with the field that holds it (camelCase path)."""
    out = [("spec.baseModel.uri", spec.base_model.uri)]
    out += [(f"spec.stages[{i}].dataset.uri", s.dataset.uri) for i, s in enumerate(spec.stages)]
    if spec.evaluation:
        out += [
            (f"spec.evaluation.datasets[{i}].uri", d.uri)
            for i, d in enumerate(spec.evaluation.datasets)
        ]
    if spec.checkpoint.uri:
        out.append(("spec.checkpoint.uri", spec.checkpoint.uri))
    out.append(("spec.output.uri", spec.output.uri))
    return out


def pvc_claims(spec: FineTuneJobSpec) -> dict[str, bool]:
    """Every claim the job reads or writes, sorted, mapped to "written by the trainer".

    Claims holding only the base model and datasets are mounted read-only.
    """
    inputs = [spec.base_model.uri, *(s.dataset.uri for s in spec.stages)]
    inputs += [d.uri for d in spec.evaluation.datasets] if spec.evaluation else []
    outputs = [checkpoint_uri(spec), spec.output.uri]
    claims: dict[str, bool] = {}
    for uri, written in [*((u, False) for u in inputs), *((u, True) for u in outputs)]:
        claim = pvc_claim(uri)
        if claim is not None:
            claims[claim] = claims.get(claim, False) or written
    return dict(sorted(claims.items()))


def _volume_name(claim: str) -> str:
    # Claim names are DNS subdomains (dots, 253 characters); volume names are DNS labels.
    return naming.dns_label(f"pvc-{claim}")


def resolved_spec(job: FineTuneJob, placement: Placement, settings: Settings) -> dict[str, Any]:
    """The spec the trainer sees: checkpoint URI and parallelism resolved, camelCase.

    Still a valid FineTuneJobSpec, so the trainer parses it with the same model.
    """
    spec = job.spec
    pool = settings.pool(placement.node_pool)
    resources = spec.resources
    if pool is not None:
        params = estimate_params_billion(spec.base_model.uri, job.metadata.get("annotations") or {})
        resources = resources.model_copy(
            update={"parallelism": parallelism(spec, placement, pool, params_billion=params)}
        )
    resolved = spec.model_copy(
        update={
            "checkpoint": spec.checkpoint.model_copy(update={"uri": checkpoint_uri(spec)}),
            "resources": resources,
        }
    )
    return resolved.wire()


def job_config(
    job: FineTuneJob,
    placement: Placement,
    attempt: int,
    resume_from: str | None,
    settings: Settings,
) -> dict[str, Any]:
    """The content of job.json (docs/runtime-contract.md)."""
    return {
        "name": job_name(job),
        "namespace": job_namespace(job),
        "attempt": attempt,
        "resumeFrom": resume_from or None,
        "spec": resolved_spec(job, placement, settings),
    }


#: Largest job.json the operator renders: a ConfigMap holds at most 1 MiB, and the spec
#: also travels in the job's own object (etcd's request limit is 1.5 MiB).
CONFIG_MAX_BYTES = 256 * 1024


def config_json(
    job: FineTuneJob,
    placement: Placement,
    attempt: int,
    resume_from: str | None,
    settings: Settings,
) -> str:
    """job.json, compact (no indentation: the size limit is on bytes)."""
    config = job_config(job, placement, attempt, resume_from, settings)
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def build_config_map(
    job: FineTuneJob,
    placement: Placement,
    attempt: int,
    resume_from: str | None,
    settings: Settings,
) -> dict[str, Any]:
    """The ``<job>-config`` ConfigMap holding job.json.

    It changes with every attempt (attempt, resumeFrom), so the caller applies it before
    creating the attempt's Pods; it is mounted as a directory, not with subPath, so a
    running Pod also sees updates.
    """
    name = job_name(job)
    content = config_json(job, placement, attempt, resume_from, settings)
    return naming.with_spec_hash(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": naming.config_map_name(name),
                "namespace": job_namespace(job),
                "labels": naming.trainer_labels(name, component=COMPONENT_CONFIG),
            },
            "data": {CONFIG_FILE: content + "\n"},
        }
    )


def build_gang_service(job: FineTuneJob) -> dict[str, Any]:
    """The headless ``<job>-gang`` Service that gives each rank a stable DNS name.

    publishNotReadyAddresses: ranks must resolve rank 0 before any of them is ready.
    The selector spans attempts (the Service outlives them); the reconciler starts a new
    attempt only after the old attempt's Pods are gone, so ``<job>-r0`` never resolves to
    two Pods.
    """
    name = job_name(job)
    return naming.with_spec_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": naming.gang_service_name(name),
                "namespace": job_namespace(job),
                "labels": naming.trainer_labels(name, component=COMPONENT_GANG),
            },
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": naming.job_selector(name),
                "ports": [
                    {
                        "name": "rendezvous",
                        "port": MASTER_PORT,
                        "targetPort": MASTER_PORT,
                        "protocol": "TCP",
                    }
                ],
            },
        }
    )


def trainer_account_name(job: str) -> str:
    """The ServiceAccount, Role and RoleBinding of a job's trainer pods."""
    return naming.child_name(job, "trainer", limit=naming.DNS_SUBDOMAIN_MAX)


def pod_account_name(job: FineTuneJob) -> str:
    """The account the ranks run as: the job's own, or spec.s3.serviceAccountName (workload
    identity), which the job's Role is then bound to as well."""
    s3 = job.spec.s3
    if s3 is not None and s3.service_account_name:
        return s3.service_account_name
    return trainer_account_name(job_name(job))


def build_trainer_identity(
    job: FineTuneJob, placement: Placement, attempt: int
) -> list[dict[str, Any]]:
    """ServiceAccount + Role + RoleBinding that let the job's ranks update its progress
    Lease and nothing else.

    Rank 0 reports progress and its heartbeat on the Lease; the Role names exactly that
    Lease (``resourceNames``) and grants nothing on Pods: a pod that could patch itself
    could change its labels, owners and finalizers (trainer code is user code).
    """
    name = job_name(job)
    ns = job_namespace(job)
    account = trainer_account_name(name)
    labels = naming.trainer_labels(name, component=COMPONENT_IDENTITY)
    meta = {"name": account, "namespace": ns, "labels": labels}
    return [
        naming.with_spec_hash({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}),
        naming.with_spec_hash(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": meta,
                "rules": [
                    {
                        "apiGroups": ["coordination.k8s.io"],
                        "resources": ["leases"],
                        "verbs": ["get", "update", "patch"],
                        "resourceNames": [naming.progress_lease_name(name)],
                    }
                ],
            }
        ),
        naming.with_spec_hash(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": meta,
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": account,
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": a, "namespace": ns}
                    for a in dict.fromkeys([account, pod_account_name(job)])
                ],
            }
        ),
    ]


def trainer_env(
    job: FineTuneJob,
    placement: Placement,
    attempt: int,
    rank: int,
    resume_from: str | None,
    *,
    heartbeat_interval: int,
) -> list[dict[str, Any]]:
    """Environment of one rank, in the order of docs/runtime-contract.md."""
    name = job_name(job)

    def var(key: str, value: str | int) -> dict[str, Any]:
        return {"name": key, "value": str(value)}

    def field(key: str, path: str) -> dict[str, Any]:
        return {"name": key, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    return [
        var("GRAFT_JOB_CONFIG", f"{CONFIG_DIR}/{CONFIG_FILE}"),
        var("GRAFT_JOB_NAME", name),
        var("GRAFT_ATTEMPT", attempt),
        var("GRAFT_RESUME_FROM", resume_from or ""),
        var("GRAFT_NNODES", placement.nodes),
        var("GRAFT_NODE_RANK", rank),
        var("GRAFT_NPROC_PER_NODE", max(placement.gpus_per_node, 1)),
        var("MASTER_ADDR", naming.master_addr(name, job_namespace(job))),
        var("MASTER_PORT", MASTER_PORT),
        var("GRAFT_PVC_ROOT", PVC_ROOT),
        var("GRAFT_CHECKPOINT_URI", checkpoint_uri(job.spec)),
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        var("GRAFT_PROGRESS_LEASE", naming.progress_lease_name(name)),
        var("GRAFT_HEARTBEAT_INTERVAL_SECONDS", heartbeat_interval),
        var("GRAFT_TERMINATION_LOG", TERMINATION_LOG),
        var("OMP_NUM_THREADS", threads_per_process(job, placement)),
        *s3_env(job.spec.s3),
    ]


def threads_per_process(job: FineTuneJob, placement: Placement) -> int:
    """Intra-op threads per trainer process: the rank's CPU limit shared by its processes.

    PyTorch sizes its thread pool by the node's cores, not the container's CPU limit; with
    more threads than the limit allows, the CFS quota throttles every step (measured with the
    real-kubelet e2e: 500m per rank on 2 cores, about 30 s per step of a tiny model instead
    of under a second).
    """
    gpus = placement.gpus_per_node
    cpu = quantity(job.spec.resources.cpu or default_cpu(gpus))
    return max(1, math.floor(cpu / max(gpus, 1)))


def default_cpu(gpus_per_node: int) -> str:
    """CPU per rank when spec.resources.cpu is unset: 4 per GPU (data loading,
    tokenization), 2 for a CPU-only rank."""
    return str(4 * gpus_per_node) if gpus_per_node else "2"


def default_memory(gpus_per_node: int) -> str:
    """Memory per rank when spec.resources.memory is unset: 32Gi per GPU, 8Gi without."""
    return f"{32 * gpus_per_node}Gi" if gpus_per_node else "8Gi"


def shm_size(gpus_per_node: int) -> str:
    """/dev/shm size limit: 4Gi per GPU (NCCL and data-loader workers), 1Gi without. It
    counts against the memory limit, so it is bounded to keep a runaway writer from
    taking the node's memory."""
    return f"{4 * gpus_per_node}Gi" if gpus_per_node else "1Gi"


def _resources(job: FineTuneJob, placement: Placement, pool: NodePool) -> dict[str, Any]:
    # Limits = requests (Guaranteed QoS): a rank over its memory share is OOM-killed (a
    # clear, retryable failure) instead of pushing a node of the gang into memory
    # pressure, and ranks of one gang get the same CPU so none lags the collectives.
    gpus = placement.gpus_per_node
    spec_res = job.spec.resources
    requests = {
        "cpu": spec_res.cpu or default_cpu(gpus),
        "memory": spec_res.memory or default_memory(gpus),
    }
    if gpus > 0:
        requests[pool.gpu_resource] = str(gpus)
    return {"requests": requests, "limits": dict(requests)}


def _affinity(
    job: FineTuneJob, placement: Placement, attempt: int, avoid_nodes: list[str]
) -> dict[str, Any]:
    affinity: dict[str, Any] = {}
    avoid = sorted(set(avoid_nodes))
    if avoid:
        # Preferred, not required: when the pool has exactly as many nodes as the gang,
        # a required rule would leave the job Pending forever once the failed node is back.
        affinity["nodeAffinity"] = {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "preference": {
                        "matchExpressions": [
                            {"key": HOSTNAME_KEY, "operator": "NotIn", "values": avoid}
                        ]
                    },
                }
            ]
        }
    if placement.nodes > 1:
        # One rank per node: GRAFT_NNODES means nodes, and losing one node must cost one
        # rank. Scoped to the attempt so that the previous attempt's Pods, still
        # terminating on a node, do not keep the new attempt off it.
        affinity["podAntiAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {
                        "matchLabels": naming.attempt_selector(job_name(job), attempt)
                    },
                    "topologyKey": HOSTNAME_KEY,
                }
            ]
        }
    return affinity


def build_pod(
    job: FineTuneJob,
    placement: Placement,
    pool: NodePool,
    attempt: int,
    rank: int,
    resume_from: str | None,
    settings: Settings,
    *,
    avoid_nodes: list[str],
) -> dict[str, Any]:
    """The Pod of one rank: ``<job>-a<attempt>-r<rank>``, hostname ``<job>-r<rank>``."""
    name = job_name(job)
    spec = job.spec
    labels = naming.trainer_labels(name, component=COMPONENT_TRAINER, attempt=attempt, rank=rank)
    annotations: dict[str, str] = {}
    if spec.queue_name:
        labels[KUEUE_QUEUE_LABEL] = spec.queue_name
        # Kueue admits plain Pods as a group only with these two; without them each rank
        # would be admitted alone and a half-admitted gang could hold GPUs idle.
        labels[KUEUE_POD_GROUP_LABEL] = naming.label_value(f"{name}-a{attempt}")
        annotations[KUEUE_POD_GROUP_COUNT] = str(placement.nodes)

    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": naming.config_map_name(name)}},
        # NCCL and data-loader workers exchange tensors through /dev/shm; the runtime's
        # default 64 MiB is far too small.
        {
            "name": "dshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(placement.gpus_per_node)},
        },
        # The root filesystem is read-only: caches and temporary files go here.
        {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}},
    ]
    for claim, written in pvc_claims(spec).items():
        vol = _volume_name(claim)
        mount: dict[str, Any] = {"name": vol, "mountPath": f"{PVC_ROOT}/{claim}"}
        if not written:
            mount["readOnly"] = True
        mounts.append(mount)
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim}})

    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "command": list(TRAINER_COMMAND),
        "env": trainer_env(
            job,
            placement,
            attempt,
            rank,
            resume_from,
            heartbeat_interval=heartbeat_interval(heartbeat_timeout(job, settings)),
        ),
        "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "resources": _resources(job, placement, pool),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostname": naming.pod_hostname(name, rank),
        "subdomain": naming.gang_service_name(name),
        "enableServiceLinks": False,
        "serviceAccountName": pod_account_name(job),
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        # Pod Security Standard "restricted"; the trainer image's user is 65532.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if pool.node_selector:
        pod_spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in pool.tolerations]
    affinity = _affinity(job, placement, attempt, avoid_nodes)
    if affinity:
        pod_spec["affinity"] = affinity

    metadata: dict[str, Any] = {
        "name": naming.pod_name(name, attempt, rank),
        "namespace": job_namespace(job),
        "labels": labels,
    }
    if annotations:
        metadata["annotations"] = annotations
    return naming.with_spec_hash(
        {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
    )


def build_pods(
    job: FineTuneJob,
    placement: Placement,
    pool: NodePool,
    attempt: int,
    resume_from: str | None,
    settings: Settings,
    *,
    avoid_nodes: list[str],
) -> list[dict[str, Any]]:
    """One Pod per rank 0..nodes-1 of an attempt (1-based), rank 0 first."""
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    return [
        build_pod(
            job, placement, pool, attempt, rank, resume_from, settings, avoid_nodes=avoid_nodes
        )
        for rank in range(placement.nodes)
    ]
