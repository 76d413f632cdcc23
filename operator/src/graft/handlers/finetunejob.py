"""Kopf handlers for FineTuneJob and for the Pods and Nodes its gangs run on.

Every trigger (the job changed, one of its Pods changed, a Node it uses changed or
vanished) runs the same level-triggered pass of ``graft.reconcile.finetunejob``. The
handlers submit it and return: passes run in the background, at most
``maxConcurrentPasses`` at once, so Kopf lets go of each event as soon as it is seen.
"""

from __future__ import annotations

from typing import Any

import kopf

from graft.api.common import GROUP, VERSION
from graft.api.finetunejob import KIND, PLURAL
from graft.builders.naming import ANNOTATION_PROGRESS, LABEL_JOB
from graft.reconcile.finetunejob import FineTuneJobReconciler

_POD_FIELDS = (
    "name",
    "namespace",
    "labels",
    "annotations",
    "creationTimestamp",
    "deletionTimestamp",
    "ownerReferences",
)


def _owner_job(body: kopf.Body) -> str | None:
    for ref in body.metadata.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(GROUP):
            return str(ref["name"])
    return None


def _reconciler(memo: Any, kwargs: dict[str, Any]) -> FineTuneJobReconciler:
    """The reconciler, pointed at Kopf's live indexes (handed to handlers as kwargs)."""
    rec: FineTuneJobReconciler = memo.finetunejobs
    rec.use_indexes(
        kwargs["graft_trainer_pods"], kwargs["graft_nodes"], kwargs["graft_progress_leases"]
    )
    return rec


@kopf.index("pods", labels={LABEL_JOB: kopf.PRESENT})
async def graft_trainer_pods(
    namespace: str | None, body: kopf.Body, **_: Any
) -> dict[Any, Any] | None:
    """(namespace, job) -> the Pod, trimmed to what the reconciler reads."""
    job = _owner_job(body)
    if job is None:
        return None
    meta = {k: body.metadata.get(k) for k in _POD_FIELDS if body.metadata.get(k) is not None}
    pod = {
        "metadata": meta,
        "spec": {"nodeName": body.spec.get("nodeName")},
        "status": dict(body.status),
    }
    return {(namespace, job): pod}


@kopf.index("pods", labels={LABEL_JOB: kopf.PRESENT})
async def graft_trainer_pods_by_node(
    namespace: str | None, body: kopf.Body, **_: Any
) -> dict[Any, Any] | None:
    """node name -> (namespace, job) of the gangs on it."""
    node, job = body.spec.get("nodeName"), _owner_job(body)
    return {node: (namespace, job)} if node and job else None


@kopf.index("coordination.k8s.io", "v1", "leases", labels={LABEL_JOB: kopf.PRESENT})
async def graft_progress_leases(
    namespace: str | None, body: kopf.Body, **_: Any
) -> dict[Any, Any] | None:
    """(namespace, job) -> the job's progress Lease: the report and the heartbeat."""
    job = _owner_job(body)
    if job is None:
        return None
    return {
        (namespace, job): {
            "metadata": {"annotations": dict(body.metadata.annotations)},
            "spec": {"renewTime": body.spec.get("renewTime")},
        }
    }


@kopf.on.event("coordination.k8s.io", "v1", "leases", labels={LABEL_JOB: kopf.PRESENT})
async def progress_lease_changed(
    body: kopf.Body, namespace: str | None, memo: Any, **kwargs: Any
) -> None:
    """A new report needs a pass; a renewal alone does not (the pass that checks the
    heartbeat is scheduled by time)."""
    job = _owner_job(body)
    reports: dict[str, Any] = memo.lease_reports
    uid = str(body.metadata.uid)
    if not job or kwargs.get("type") == "DELETED":
        reports.pop(uid, None)
        return
    report = body.metadata.annotations.get(ANNOTATION_PROGRESS)
    if reports.get(uid) == report:
        return
    reports[uid] = report
    _reconciler(memo, kwargs).submit(str(namespace), job)


@kopf.index("nodes")
async def graft_nodes(name: str, status: kopf.Status, **_: Any) -> dict[Any, Any]:
    """node name -> the Node's Ready condition (all the failure classifier reads)."""
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return {name: {"metadata": {"name": name}, "status": {"conditions": ready}}}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def job_event(
    type: str | None,
    name: str,
    namespace: str | None,
    body: kopf.Body,
    memo: Any,
    **kwargs: Any,
) -> None:
    """Every watch event of a FineTuneJob: the list after a (re)start, a create, a change of
    spec, a deletion. A pass runs when the job is new to this process or its generation
    moved; the echoes of our own status writes run none. Kopf's change handlers would add a
    bookkeeping PATCH per change and a diff per event (docs/operator.md)."""
    rec = _reconciler(memo, kwargs)
    ns = str(namespace)
    if type == "DELETED":
        # Children go with owner references; only in-memory state is left to drop.
        rec.forget(ns, name)
        return
    if rec.spec_seen(ns, name, body):
        return
    rec.submit(ns, name, body)


@kopf.on.event("pods", labels={LABEL_JOB: kopf.PRESENT})
async def trainer_pod_changed(
    body: kopf.Body, namespace: str | None, memo: Any, **kwargs: Any
) -> None:
    job = _owner_job(body)
    if not job:
        return
    rec = _reconciler(memo, kwargs)
    # Most Pod updates (scheduler conditions, IPs) change nothing a pass reads, and the
    # ADDED event of a Pod a pass just created shows what that pass already planned for.
    deleted = kwargs.get("type") == "DELETED"
    if rec.pod_seen(str(namespace), str(body.metadata.name), None if deleted else body):
        return
    rec.submit(str(namespace), job)


@kopf.on.event("nodes")
async def node_changed(name: str, type: str, status: kopf.Status, memo: Any, **kwargs: Any) -> None:
    # Heartbeats change Nodes all the time; only a change of readiness or a deletion matters.
    ready = next(
        (c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"),
        "Unknown",
    )
    state = "Deleted" if type == "DELETED" else str(ready)
    seen: dict[str, str] = memo.node_readiness
    if seen.get(name) == state:
        return
    seen[name] = state
    if state == "Deleted":
        seen.pop(name, None)
    rec = _reconciler(memo, kwargs)
    for ns, job in sorted(set(kwargs["graft_trainer_pods_by_node"].get(name, []))):
        rec.submit(ns, job)
