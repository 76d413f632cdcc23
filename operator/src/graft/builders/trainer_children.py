"""The per-job children that watch and fence a FineTuneJob's trainer: the progress Lease
(the only object its identity may write) and the NetworkPolicy around its gang."""

from __future__ import annotations

from typing import Any

from graft.api.finetunejob import FineTuneJob
from graft.builders import naming
from graft.config import Settings

COMPONENT_PROGRESS = "progress"
COMPONENT_NETWORK = "network"


def _identity(job: FineTuneJob) -> tuple[str, str]:
    return str(job.metadata["name"]), str(job.metadata.get("namespace") or "default")


def heartbeat_timeout(job: FineTuneJob, settings: Settings) -> int:
    """Seconds without a heartbeat after which a running gang is hung."""
    own = job.spec.restart_policy.heartbeat_timeout_seconds
    return own if own is not None else settings.heartbeat_timeout_seconds


def heartbeat_interval(timeout: int) -> int:
    """How often rank 0 renews the Lease: five renewals per timeout, at most every 30 s,
    so one late or lost write never looks like a hang."""
    return max(1, min(30, timeout // 5))


def build_progress_lease(job: FineTuneJob, settings: Settings) -> dict[str, Any]:
    """The ``coordination.k8s.io/v1`` Lease rank 0 reports to.

    The operator owns only its labels and ``leaseDurationSeconds`` (the heartbeat timeout,
    for readers of ``kubectl get lease``); the trainer's patches own ``renewTime``,
    ``holderIdentity`` and the ``graft.dev/progress`` annotation, so applying it again never
    resets them."""
    name, namespace = _identity(job)
    return naming.with_spec_hash(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": naming.progress_lease_name(name),
                "namespace": namespace,
                "labels": naming.trainer_labels(name, component=COMPONENT_PROGRESS),
            },
            "spec": {"leaseDurationSeconds": heartbeat_timeout(job, settings)},
        }
    )


def build_network_policy(job: FineTuneJob) -> dict[str, Any]:
    """Ingress to the job's Pods only from the job's own Pods.

    Rendezvous (``MASTER_PORT``) is one port, but gloo and NCCL then connect the ranks on
    ports they pick at run time, so the rule is on peers, not ports: every port between
    the job's Pods, nothing from anywhere else. Egress stays open (storage, the API)."""
    name, namespace = _identity(job)
    selector = {"matchLabels": naming.job_selector(name)}
    return naming.with_spec_hash(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {
                "name": naming.child_name(name, "gang"),
                "namespace": namespace,
                "labels": naming.trainer_labels(name, component=COMPONENT_NETWORK),
            },
            "spec": {
                "podSelector": selector,
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": selector}]}],
            },
        }
    )
