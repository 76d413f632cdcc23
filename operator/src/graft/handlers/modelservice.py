"""Kopf handlers for ModelService: parse, call the reconciler, write status once."""

from __future__ import annotations

import time
from typing import Any

import kopf

from graft import metrics
from graft.api.common import GROUP, VERSION
from graft.api.modelservice import KIND, PLURAL
from graft.reconcile import modelservice as reconciler


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def changed(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    t0 = time.perf_counter()
    try:
        status = await reconciler.reconcile(memo.kube, memo.config, body)
    except Exception:
        metrics.RECONCILES.labels(KIND, "error").inc()
        raise
    patch.status.update(status)
    metrics.RECONCILES.labels(KIND, "ok").inc()
    metrics.RECONCILE_SECONDS.labels(KIND).observe(time.perf_counter() - t0)
    metrics.observe_phase(
        KIND, f"{body.metadata.namespace}/{body.metadata.name}", status.get("phase")
    )


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
async def deleted(body: kopf.Body, **_: Any) -> None:
    # Children go with owner references; this only forgets the metrics series.
    metrics.observe_phase(KIND, f"{body.metadata.namespace}/{body.metadata.name}", None)
