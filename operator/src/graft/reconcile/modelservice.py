"""ModelService reconciler: a KubeRay RayService whose Serve config carries the adapters.

``decide`` is pure: from the ModelService, the FineTuneJobs its adapters name and the live
RayService it returns the RayService to apply (or None when the live one already matches)
and the new status. Adapter changes only touch ``serveConfigV2``; the cluster spec (and its
``graft.dev/spec-hash``) moves only with the base model, engine, resources or image.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

import kopf
import yaml

from graft import metrics
from graft.api.common import API_VERSION, Condition, ConditionStatus, set_condition
from graft.api.finetunejob import Resources
from graft.api.modelservice import (
    KIND,
    ModelService,
    ModelServicePhase,
    ModelServiceSpec,
    ModelServiceStatus,
)
from graft.builders import naming
from graft.builders import rayservice as rs
from graft.builders.serve_config import APP_NAME, ResolvedAdapter
from graft.config import NodePool, Settings
from graft.kube import Kube
from graft.placement import PlacementError, place
from graft.reconcile.common import Coalescer, status_patch
from graft.validation import InvalidSpec, parse_spec

log = logging.getLogger(__name__)
RAY_API_VERSION = "ray.io/v1"


@dataclasses.dataclass
class Plan:
    status: ModelServiceStatus
    rayservice: dict[str, Any] | None = None
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)


def _cond(
    conds: list[Condition],
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    gen: int | None,
    now: dt.datetime,
) -> list[Condition]:
    return set_condition(
        conds,
        Condition(
            type=type_,
            status=ConditionStatus.TRUE if ok else ConditionStatus.FALSE,
            reason=reason,
            message=message,
            observed_generation=gen,
            last_transition_time=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        ),
    )


def choose_pool(spec: ModelServiceSpec, pools: list[NodePool]) -> NodePool | None:
    """The pool for GPU workers (None for CPU serving); PlacementError when none fits."""
    gpus = spec.resources.gpus_per_replica
    if gpus == 0 and spec.resources.node_pool is None:
        return None
    # a replica lives on one node: its GPUs must all fit on one node of the pool
    wanted = Resources(node_pool=spec.resources.node_pool, nodes=1, gpus_per_node=gpus)
    placement = place(wanted, pools)
    return next(p for p in pools if p.name == placement.node_pool)


def resolve_adapters(
    spec: ModelServiceSpec, jobs: Mapping[str, dict[str, Any] | None]
) -> tuple[list[ResolvedAdapter], list[str], list[str]]:
    """(ready adapters, waiting messages, error messages) for the spec's adapters."""
    ready: list[ResolvedAdapter] = []
    waiting: list[str] = []
    errors: list[str] = []
    for a in spec.model.adapters:
        if a.uri is not None:
            ready.append(ResolvedAdapter(a.name, a.uri))
            continue
        job_name = str(a.from_fine_tune_job)
        job = jobs.get(job_name)
        if job is None:
            errors.append(
                f"adapter {a.name}: FineTuneJob {job_name!r} not found in this "
                "namespace; create it or fix fromFineTuneJob"
            )
            continue
        st = job.get("status") or {}
        phase = st.get("phase")
        output = st.get("output") or {}
        if phase == "Failed":
            errors.append(
                f"adapter {a.name}: FineTuneJob {job_name!r} failed; see "
                f"`kubectl describe ftj {job_name}`"
            )
        elif phase == "Succeeded" and output.get("uri"):
            if output.get("kind") == "model":
                errors.append(
                    f"adapter {a.name}: FineTuneJob {job_name!r} produced a full "
                    "model, not an adapter; serve it as model.baseModel instead"
                )
            else:
                ready.append(ResolvedAdapter(a.name, str(output["uri"])))
        else:
            waiting.append(
                f"adapter {a.name}: waiting for FineTuneJob {job_name!r} ({phase or 'Pending'})"
            )
    return ready, waiting, errors


def _find(conditions: Any, type_: str) -> dict[str, Any] | None:
    for c in conditions or []:
        if isinstance(c, dict) and c.get("type") == type_:
            return c
    return None


def _serve_adapters(rayservice: Mapping[str, Any]) -> list[str]:
    """Adapter names in the RayService's Serve config."""
    try:
        cfg = yaml.safe_load((rayservice.get("spec") or {}).get("serveConfigV2") or "") or {}
    except yaml.YAMLError:
        return []
    names: list[str] = []
    for app in cfg.get("applications") or []:
        for d in app.get("deployments") or []:
            for a in (d.get("user_config") or {}).get("adapters") or []:
                names.append(str(a.get("name")))
    return names


def decide(
    body: Mapping[str, Any],
    jobs: Mapping[str, dict[str, Any] | None],
    live: Mapping[str, Any] | None,
    settings: Settings,
    now: dt.datetime,
) -> Plan:
    meta = dict(body.get("metadata") or {})
    gen = meta.get("generation")
    raw = {k: v for k, v in (body.get("status") or {}).items() if k != "graft"}
    st = ModelServiceStatus.model_validate(raw)
    conds = list(st.conditions)
    plan = Plan(status=st)

    def finish(phase: ModelServicePhase) -> Plan:
        st.conditions = conds
        st.phase = phase
        st.observed_generation = gen
        return plan

    def was(type_: str, reason: str) -> bool:
        return any(c.type == type_ and c.reason == reason for c in conds)

    try:
        spec = parse_spec(ModelServiceSpec, body.get("spec") or {})
    except InvalidSpec as e:
        if not was("Accepted", "InvalidSpec"):
            plan.events.append(("Warning", "InvalidSpec", str(e)))
        conds = _cond(conds, "Accepted", False, "InvalidSpec", str(e), gen, now)
        conds = _cond(conds, "Ready", False, "InvalidSpec", str(e), gen, now)
        return finish(ModelServicePhase.FAILED)
    conds = _cond(conds, "Accepted", True, "Valid", "spec is valid", gen, now)
    msvc = ModelService(metadata=meta, spec=spec)

    try:
        pool = choose_pool(spec, settings.node_pools)
    except PlacementError as e:
        msg = f"{e.message}. Change spec.resources or the operator's nodePools."
        if not was("Ready", "Unschedulable"):
            plan.events.append(("Warning", "Unschedulable", msg))
        conds = _cond(conds, "Ready", False, "Unschedulable", msg, gen, now)
        return finish(ModelServicePhase.FAILED)

    ready, waiting, errors = resolve_adapters(spec, jobs)
    if errors:
        msg = "; ".join(errors)
        if not was("AdaptersReady", "AdapterUnavailable"):
            plan.events.append(("Warning", "AdapterUnavailable", msg))
        conds = _cond(conds, "AdaptersReady", False, "AdapterUnavailable", msg, gen, now)
    elif waiting:
        conds = _cond(
            conds, "AdaptersReady", False, "WaitingForFineTuneJob", "; ".join(waiting), gen, now
        )
    else:
        conds = _cond(
            conds,
            "AdaptersReady",
            True,
            "AllResolved",
            f"{len(ready)} adapter(s) resolved",
            gen,
            now,
        )

    desired = rs.build_rayservice(msvc, ready, settings, pool=pool)
    if live is None or _differs(live, desired):
        plan.rayservice = desired
        if live is not None:
            same_cluster = _hash(live) == _hash(desired)
            plan.events.append(
                (
                    "Normal",
                    "ServeConfigUpdated" if same_cluster else "ClusterUpdated",
                    "adapters changed in place"
                    if same_cluster
                    else "base model, engine, resources or image changed",
                )
            )
        else:
            plan.events.append(("Normal", "RayServiceCreated", desired["metadata"]["name"]))

    # Status from what KubeRay reports.
    rstatus = (live or {}).get("status") or {}
    active = rstatus.get("activeServiceStatus") or {}
    app = (active.get("applicationStatuses") or {}).get(APP_NAME) or {}
    cluster = active.get("rayClusterStatus") or {}
    ready_cond = _find(rstatus.get("conditions"), "Ready")
    upgrading_cond = _find(rstatus.get("conditions"), "UpgradeInProgress")
    app_running = app.get("status") == "RUNNING"
    is_ready = live is not None and (
        (ready_cond or {}).get("status") == "True" or (ready_cond is None and app_running)
    )
    upgrading = (upgrading_cond or {}).get("status") == "True" or bool(
        (rstatus.get("pendingServiceStatus") or {}).get("rayClusterName")
    )
    st.replicas = int(cluster.get("desiredWorkerReplicas") or 0)
    st.ready_replicas = int(cluster.get("readyWorkerReplicas") or 0)
    current = (
        live is not None
        and plan.rayservice is None
        and rstatus.get("observedGeneration") == (live.get("metadata") or {}).get("generation")
    )
    if is_ready:
        st.endpoint = rs.endpoint(msvc)
        if current and app_running:
            st.adapters = _serve_adapters(live or {})
        if not any(c.type == "Ready" and c.status == "True" for c in conds):
            plan.events.append(("Normal", "Ready", f"serving at {st.endpoint}"))
        conds = _cond(conds, "Ready", True, "ServeRunning", f"serving at {st.endpoint}", gen, now)
    else:
        why = (
            app.get("message")
            or (ready_cond or {}).get("message")
            or (
                "RayService created; waiting for KubeRay"
                if live is None or not rstatus
                else f"application {app.get('status') or 'not deployed yet'}"
            )
        )
        conds = _cond(conds, "Ready", False, "Deploying", str(why), gen, now)
    conds = _cond(
        conds,
        "UpgradeInProgress",
        upgrading,
        "NewCluster" if upgrading else "None",
        "a new Ray cluster is being prepared" if upgrading else "no upgrade",
        gen,
        now,
    )
    if is_ready:
        phase = (
            ModelServicePhase.UPDATING if upgrading or plan.rayservice else ModelServicePhase.READY
        )
    else:
        phase = ModelServicePhase.DEPLOYING if live is not None else ModelServicePhase.PENDING
    return finish(phase)


def _hash(obj: Mapping[str, Any]) -> str | None:
    ann = (obj.get("metadata") or {}).get("annotations") or {}
    value = ann.get(naming.ANNOTATION_SPEC_HASH)
    return str(value) if value is not None else None


def _differs(live: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    lspec = live.get("spec") or {}
    return _hash(live) != _hash(desired) or lspec.get("serveConfigV2") != desired["spec"].get(
        "serveConfigV2"
    )


class ModelServiceReconciler:
    """Runs passes, one at a time per ModelService."""

    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.kube = kube
        self.settings = settings
        self._passes = Coalescer()

    def forget(self, namespace: str, name: str) -> None:
        self._passes.forget((namespace, name))

    async def reconcile(self, namespace: str, name: str) -> None:
        await self._passes.run((namespace, name), lambda: self._pass(namespace, name))

    async def _pass(self, namespace: str, name: str) -> None:
        t0 = asyncio.get_running_loop().time()
        body = await self.kube.get_custom(API_VERSION, KIND, namespace, name)
        if body is None:
            self.forget(namespace, name)
            metrics.observe_phase(KIND, f"{namespace}/{name}", None)
            return
        jobs: dict[str, dict[str, Any] | None] = {}
        for a in (body.get("spec") or {}).get("model", {}).get("adapters") or []:
            job = a.get("fromFineTuneJob")
            if job and job not in jobs:
                jobs[job] = await self.kube.get_custom(API_VERSION, "FineTuneJob", namespace, job)
        rs_name = naming.fit(name, rs.RAYSERVICE_NAME_MAX)
        live = await self.kube.get_custom(RAY_API_VERSION, "RayService", namespace, rs_name)
        plan = decide(body, jobs, live, self.settings, dt.datetime.now(dt.UTC))
        owner = kopf.Body(
            {
                "apiVersion": body["apiVersion"],
                "kind": body["kind"],
                "metadata": {"name": name, "uid": body["metadata"]["uid"], "namespace": namespace},
            }
        )
        if plan.rayservice is not None:
            kopf.append_owner_reference(plan.rayservice, owner=owner)
            await self.kube.apply(plan.rayservice)
        patch = status_patch(dict(body.get("status") or {}), plan.status)
        if patch:
            await self.kube.patch_status(API_VERSION, KIND, namespace, name, patch)
        for kind, reason, message in plan.events:
            kopf.event(owner, type=kind, reason=reason, message=message[:1000])
        metrics.RECONCILES.labels(KIND, "ok").inc()
        metrics.RECONCILE_SECONDS.labels(KIND).observe(asyncio.get_running_loop().time() - t0)
        phase = plan.status.phase.value if plan.status.phase else None
        metrics.observe_phase(KIND, f"{namespace}/{name}", phase)
