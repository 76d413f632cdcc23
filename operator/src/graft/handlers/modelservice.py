"""Kopf handlers for ModelService and for what it depends on (its RayService, FineTuneJobs)."""

from __future__ import annotations

from typing import Any

import kopf

from graft.api.common import GROUP, VERSION
from graft.api.modelservice import PLURAL
from graft.builders.rayservice import LABEL_MODELSERVICE
from graft.reconcile.modelservice import (
    ModelServiceReconciler,
    waits_for_secret,
    watches_canaries,
)

#: How often a service with a progressing canary asks its replicas whether they rolled it
#: back (replicas stop sending it traffic on their own at once; this makes it stick).
CANARY_POLL_SECONDS = 15.0
#: How often a service waiting for its API-key Secret looks again: the operator does not
#: watch Secrets (that would mean reading every Secret it may see), it reads only the one
#: a spec names.
SECRET_POLL_SECONDS = 10.0


def _rec(memo: Any) -> ModelServiceReconciler:
    rec: ModelServiceReconciler = memo.modelservices
    return rec


@kopf.index(GROUP, VERSION, PLURAL)
def graft_services_by_job(
    namespace: str | None, name: str, spec: kopf.Spec, **_: Any
) -> dict[Any, Any] | None:
    """(namespace, FineTuneJob) -> the ModelServices that serve its adapter."""
    jobs = {
        a.get("fromFineTuneJob")
        for a in (spec.get("model") or {}).get("adapters") or []
        if a.get("fromFineTuneJob")
    }
    return {(namespace, j): name for j in jobs} or None


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def service_changed(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    await _rec(memo).reconcile(str(namespace), name)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
async def service_deleted(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    _rec(memo).forget(str(namespace), name)


def _has_canary(status: kopf.Status, **_: Any) -> bool:
    return watches_canaries({"status": dict(status)})


@kopf.timer(GROUP, VERSION, PLURAL, interval=CANARY_POLL_SECONDS, when=_has_canary)
async def canary_watch(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    await _rec(memo).reconcile(str(namespace), name)


def _waits_for_secret(status: kopf.Status, **_: Any) -> bool:
    return waits_for_secret({"status": dict(status)})


@kopf.timer(GROUP, VERSION, PLURAL, interval=SECRET_POLL_SECONDS, when=_waits_for_secret)
async def secret_watch(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    await _rec(memo).reconcile(str(namespace), name)


@kopf.on.event("ray.io", "v1", "rayservices", labels={LABEL_MODELSERVICE: kopf.PRESENT})
async def rayservice_changed(body: kopf.Body, namespace: str | None, memo: Any, **_: Any) -> None:
    for ref in body.metadata.get("ownerReferences") or []:
        if ref.get("kind") == "ModelService":
            await _rec(memo).reconcile(str(namespace), str(ref["name"]))


@kopf.on.event(GROUP, VERSION, "finetunejobs")
async def finetunejob_changed(
    name: str, namespace: str | None, status: kopf.Status, memo: Any, **kwargs: Any
) -> None:
    # Only the terminal phases change what a service can load.
    if status.get("phase") not in ("Succeeded", "Failed") and kwargs.get("type") != "DELETED":
        return
    for svc in sorted(set(kwargs["graft_services_by_job"].get((namespace, name), []))):
        await _rec(memo).reconcile(str(namespace), svc)
