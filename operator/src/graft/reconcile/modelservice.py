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
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import kopf
import yaml

from graft import metrics
from graft.api.common import API_VERSION, Condition, ConditionStatus, set_condition
from graft.api.finetunejob import Resources
from graft.api.modelservice import (
    KIND,
    CanaryState,
    CanaryStatus,
    ModelService,
    ModelServicePhase,
    ModelServiceSpec,
    ModelServiceStatus,
)
from graft.builders import naming
from graft.builders import rayservice as rs
from graft.builders.serve_config import APP_NAME, SERVE_PORT, ResolvedAdapter, ResolvedCanary
from graft.config import NodePool, Settings
from graft.kube import Kube
from graft.placement import PlacementError, place
from graft.reconcile.adapter_trust import output_uri_problem
from graft.reconcile.common import Coalescer, status_patch
from graft.serve_client import HttpServeClient, ServeClient
from graft.validation import InvalidSpec, parse_spec

log = logging.getLogger(__name__)
RAY_API_VERSION = "ray.io/v1"
#: Condition on a ModelService with spec.auth.apiKeySecretRef: whether its Secret and key exist.
AUTH_READY = "AuthReady"
#: AdaptersReady's reason when replicas report that a served adapter failed to load.
ADAPTER_LOAD_FAILED = "AdapterLoadFailed"


@dataclasses.dataclass
class Plan:
    status: ModelServiceStatus
    rayservice: dict[str, Any] | None = None
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    #: Applied with the RayService: its NetworkPolicy, and the Ray token Secret (made once).
    network_policy: dict[str, Any] | None = None
    msvc: ModelService | None = None


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


@dataclasses.dataclass
class Resolution:
    """What the spec's adapters resolve to now."""

    ready: list[ResolvedAdapter] = dataclasses.field(default_factory=list)
    waiting: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    gated: list[str] = dataclasses.field(default_factory=list)
    #: adapter name -> (canary URI or None, why it cannot be served yet)
    canaries: dict[str, tuple[str | None, str]] = dataclasses.field(default_factory=dict)


def gate_refusal(job: Mapping[str, Any]) -> str | None:
    """Why a succeeded job's output must not be served, or None when it may.

    Served when ``status.evaluation.passed`` is true or the job has no gate. Read from the
    raw object so that a job written before ``status.evaluation`` existed still resolves.
    """
    st = job.get("status") or {}
    evaluation = st.get("evaluation")
    passed = evaluation.get("passed") if isinstance(evaluation, dict) else None
    if passed is True:
        return None
    cond = _find(st.get("conditions"), "EvaluationPassed") or {}
    figures = f" ({cond['message']})" if cond.get("message") else ""
    if passed is False or (st.get("output") or {}).get("promotable") is False:
        return f"did not pass its evaluation gate{figures}"
    gate = ((job.get("spec") or {}).get("evaluation") or {}).get("gate")
    if gate:
        return "has an evaluation gate but no evaluation result in its status"
    return None


def _resolve_job(
    what: str, job_name: str, allow_unevaluated: bool, jobs: Mapping[str, dict[str, Any] | None]
) -> tuple[str | None, str, str]:
    """(URI or None, kind of problem: ''|waiting|error|gated, message) for a fromFineTuneJob."""
    job = jobs.get(job_name)
    if job is None:
        return (
            None,
            "error",
            f"{what}: FineTuneJob {job_name!r} not found in this namespace; create it or fix "
            "fromFineTuneJob",
        )
    st = job.get("status") or {}
    phase = st.get("phase")
    output = st.get("output") or {}
    if phase == "Failed":
        return (
            None,
            "error",
            (f"{what}: FineTuneJob {job_name!r} failed; see `kubectl describe ftj {job_name}`"),
        )
    if phase != "Succeeded" or not output.get("uri"):
        return (
            None,
            "waiting",
            (f"{what}: waiting for FineTuneJob {job_name!r} ({phase or 'Pending'})"),
        )
    problem = output_uri_problem(job, output["uri"])
    if problem is not None:
        return (
            None,
            "error",
            f"{what}: FineTuneJob {job_name!r} {problem}; ignored. Rerun the job or give the "
            "adapter a uri",
        )
    if output.get("kind") == "model":
        return (
            None,
            "error",
            (
                f"{what}: FineTuneJob {job_name!r} produced a full model, not an adapter; serve it "
                "as model.baseModel instead"
            ),
        )
    refusal = gate_refusal(job)
    if refusal is not None and not allow_unevaluated:
        return (
            None,
            "gated",
            (
                f"{what}: FineTuneJob {job_name!r} {refusal}; not served. Retrain, or set "
                "allowUnevaluated: true to serve it anyway"
            ),
        )
    return str(output["uri"]), "", ""


def resolve_adapters(
    spec: ModelServiceSpec, jobs: Mapping[str, dict[str, Any] | None]
) -> Resolution:
    """Each adapter's stable and canary versions, or why they cannot be served."""
    out = Resolution()
    for a in spec.model.adapters:
        if a.uri is not None:
            uri: str | None = a.uri
        else:
            uri, kind, msg = _resolve_job(
                f"adapter {a.name}", str(a.from_fine_tune_job), a.allow_unevaluated, jobs
            )
            if uri is None:
                {"waiting": out.waiting, "error": out.errors, "gated": out.gated}[kind].append(msg)
        if a.canary is None:
            if uri is not None:
                out.ready.append(ResolvedAdapter(a.name, uri))
            continue
        c = a.canary
        if c.uri is not None:
            curi: str | None = c.uri
            why = ""
        else:
            curi, _, why = _resolve_job(
                f"canary of {a.name}", str(c.from_fine_tune_job), c.allow_unevaluated, jobs
            )
        if uri is None:
            curi, why = None, "the stable version is not served; see AdaptersReady"
        out.canaries[a.name] = (curi, why)
        if uri is not None:
            canary = None
            if curi is not None:
                canary = ResolvedCanary.of(curi, c)
            out.ready.append(ResolvedAdapter(a.name, uri, canary))
    return out


def reported_rollbacks(
    reports: Sequence[Mapping[str, Any]], names: set[str]
) -> dict[tuple[str, str], str]:
    """(adapter, version) -> reason, for each canary a replica says it rolled back.

    Replicas can only make the operator take traffic away from a canary, never give it
    some; anything malformed is ignored.
    """
    out: dict[tuple[str, str], str] = {}
    for report in reports:
        canaries = report.get("canaries") if isinstance(report, Mapping) else None
        if not isinstance(canaries, Mapping):
            continue
        for name, c in canaries.items():
            if name not in names or not isinstance(c, Mapping):
                continue
            version, state, reason = c.get("version"), c.get("state"), c.get("reason")
            if isinstance(version, str) and state == "RolledBack":
                out[(name, version)] = str(reason or "rolled back by a replica")[:500]
    return out


def reported_load_failures(reports: Sequence[Mapping[str, Any]], names: set[str]) -> dict[str, int]:
    """Adapter -> how many replica reports say it failed to load (``failedAdapters`` on
    ``/readyz``), for the served adapters in ``names``; anything malformed is ignored.

    Reports only ever change a condition: they say what the replicas could not load.
    """
    out: dict[str, int] = {}
    for report in reports:
        failed = report.get("failedAdapters") if isinstance(report, Mapping) else None
        if not isinstance(failed, Mapping):
            continue
        for name in failed:
            if name in names:
                out[name] = out.get(name, 0) + 1
    return out


def canary_step(
    res: Resolution,
    prev: list[CanaryStatus],
    rollbacks: Mapping[tuple[str, str], str],
    stamp: str,
) -> tuple[list[ResolvedAdapter], list[CanaryStatus], list[tuple[str, str, str]]]:
    """The adapters to render (rolled-back canaries dropped), the canary status, events."""
    before = {c.name: c for c in prev}
    ready: list[ResolvedAdapter] = []
    statuses: list[CanaryStatus] = []
    events: list[tuple[str, str, str]] = []
    stable_uris = {a.name: a.uri for a in res.ready}
    for a in res.ready:
        old = before.get(a.name)
        if a.canary is None:
            ready.append(a)
            continue
        version = a.canary.version
        same = old is not None and old.version == version
        rolled = rollbacks.get((a.name, version))
        if same and old is not None and old.state == CanaryState.ROLLED_BACK:
            ready.append(ResolvedAdapter(a.name, a.uri))
            statuses.append(old)
            continue
        if rolled is not None:
            ready.append(ResolvedAdapter(a.name, a.uri))
            statuses.append(
                CanaryStatus(
                    name=a.name,
                    stable_uri=a.uri,
                    canary_uri=a.canary.uri,
                    version=version,
                    weight=0,
                    state=CanaryState.ROLLED_BACK,
                    reason=rolled,
                    last_transition_time=stamp,
                )
            )
            events.append(
                ("Warning", "CanaryRolledBack", f"adapter {a.name} version {version}: {rolled}")
            )
            continue
        ready.append(a)
        progressing = same and old is not None and old.state == CanaryState.PROGRESSING
        if not progressing or (old is not None and old.weight != a.canary.weight):
            events.append(
                (
                    "Normal",
                    "CanaryStarted" if not progressing else "CanaryWeightChanged",
                    f"adapter {a.name}: version {version} takes {a.canary.weight}% of requests",
                )
            )
        statuses.append(
            CanaryStatus(
                name=a.name,
                stable_uri=a.uri,
                canary_uri=a.canary.uri,
                version=version,
                weight=a.canary.weight,
                state=CanaryState.PROGRESSING,
                last_transition_time=old.last_transition_time
                if progressing and old is not None
                else stamp,
            )
        )
    for name, (curi, why) in res.canaries.items():
        if any(c.name == name for c in statuses):
            continue
        old = before.get(name)
        keep = old is not None and old.state == CanaryState.WAITING and old.reason == why
        statuses.append(
            CanaryStatus(
                name=name,
                stable_uri=stable_uris.get(name),
                canary_uri=curi,
                weight=0,
                state=CanaryState.WAITING,
                reason=why,
                last_transition_time=old.last_transition_time if keep and old else stamp,
            )
        )
    for name, old in before.items():
        if name in res.canaries or old.state != CanaryState.PROGRESSING:
            continue
        if old.canary_uri is not None and stable_uris.get(name) == old.canary_uri:
            events.append(("Normal", "CanaryPromoted", f"adapter {name}: version {old.version}"))
        else:
            events.append(("Normal", "CanaryRemoved", f"adapter {name}: version {old.version}"))
    return ready, statuses, events


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


def secret_names(body: Mapping[str, Any]) -> list[str]:
    """The Secrets a pass must look at: the one ``spec.auth.apiKeySecretRef`` names."""
    ref = ((body.get("spec") or {}).get("auth") or {}).get("apiKeySecretRef") or {}
    name = ref.get("name") if isinstance(ref, dict) else None
    return [name] if isinstance(name, str) and name else []


def auth_problem(
    spec: ModelServiceSpec, namespace: str, secrets: Mapping[str, frozenset[str] | None]
) -> tuple[str, str] | None:
    """(reason, message saying what to do) when the API-key Secret or its key is missing:
    the serving pods would wait for ever to mount it, with nothing on the ModelService."""
    ref = spec.auth.api_key_secret_ref
    if ref is None:
        return None
    keys = secrets.get(ref.name)
    if keys is None:
        return (
            "ApiKeySecretNotFound",
            f"spec.auth.apiKeySecretRef: Secret {ref.name!r} not found in namespace "
            f"{namespace}. Create it with the API keys, one per line, under key {ref.key!r} "
            f"(kubectl -n {namespace} create secret generic {ref.name} "
            f"--from-file={ref.key}=keys.txt); the service is deployed once it exists",
        )
    if ref.key not in keys:
        has = ", ".join(sorted(keys)[:20]) or "no keys"
        return (
            "ApiKeyNotInSecret",
            f"spec.auth.apiKeySecretRef: Secret {ref.name!r} has no key {ref.key!r} (it has: "
            f"{has}). Add the API keys, one per line, under {ref.key!r}, or set "
            "spec.auth.apiKeySecretRef.key to the key that holds them; the service is "
            "deployed once it is there",
        )
    return None


def decide(
    body: Mapping[str, Any],
    jobs: Mapping[str, dict[str, Any] | None],
    live: Mapping[str, Any] | None,
    settings: Settings,
    now: dt.datetime,
    reports: Sequence[Mapping[str, Any]] = (),
    secrets: Mapping[str, frozenset[str] | None] | None = None,
) -> Plan:
    """The RayService to apply and the new status; ``reports`` are what replicas said
    on ``/readyz``, trusted only to roll a canary back and to say which adapters failed
    to load (AdaptersReady=False, AdapterLoadFailed); ``secrets``
    the keys of each Secret in ``secret_names`` (None: it does not exist)."""
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

    res = resolve_adapters(spec, jobs)
    load_failed_stands = False
    names = {a.name for a in spec.model.adapters}
    ready, st.canaries, canary_events = canary_step(
        res, st.canaries, reported_rollbacks(reports, names), now.strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    plan.events.extend(canary_events)
    if res.errors or res.gated:
        reason = "AdapterUnavailable" if res.errors else "EvaluationGateFailed"
        msg = "; ".join(res.errors + res.gated)
        if not was("AdaptersReady", reason):
            plan.events.append(("Warning", reason, msg))
        conds = _cond(conds, "AdaptersReady", False, reason, msg, gen, now)
    elif res.waiting:
        conds = _cond(
            conds,
            "AdaptersReady",
            False,
            "WaitingForFineTuneJob",
            "; ".join(res.waiting),
            gen,
            now,
        )
    else:
        failed = reported_load_failures(reports, {a.name for a in ready})
        if failed:
            msg = (
                f"adapter(s) {', '.join(sorted(failed))} failed to load, in "
                f"{max(failed.values())} of {len(reports)} replica report(s); the Serve "
                "replicas' logs (the RayService's worker pods) say why. Fix the adapter "
                "files (readable by the server's user) or spec.model.adapters."
            )
            if not was("AdaptersReady", ADAPTER_LOAD_FAILED):
                plan.events.append(("Warning", ADAPTER_LOAD_FAILED, msg))
            conds = _cond(conds, "AdaptersReady", False, ADAPTER_LOAD_FAILED, msg, gen, now)
        elif not reports and was("AdaptersReady", ADAPTER_LOAD_FAILED):
            # No replica answered this time: what the last ones said stands until the
            # served config changes (below: a new config is loaded afresh, and asked again).
            load_failed_stands = True
        else:
            conds = _all_resolved(conds, len(ready), gen, now)

    held = auth_problem(spec, str(meta.get("namespace", "default")), secrets or {})
    if held is not None:
        reason, msg = held
        if not was(AUTH_READY, reason):
            plan.events.append(("Warning", reason, msg))
        conds = _cond(conds, AUTH_READY, False, reason, msg, gen, now)
    elif spec.auth.api_key_secret_ref is not None:
        conds = _cond(conds, AUTH_READY, True, "ApiKeysFound", "API-key Secret found", gen, now)
    else:
        conds = [c for c in conds if c.type != AUTH_READY]

    desired = rs.build_rayservice(msvc, ready, settings, pool=pool)
    policy = rs.build_network_policy(msvc, settings)
    # The policy's hash rides on the RayService, so a change of spec.network alone is seen.
    desired["metadata"]["annotations"][rs.ANNOTATION_NETWORK_HASH] = naming.spec_hash(policy)
    if load_failed_stands and (live is None or _differs(live, desired)):
        conds = _all_resolved(conds, len(ready), gen, now)
    # Without its API-key Secret a new or changed cluster's pods could not start: wait.
    if held is None and (live is None or _differs(live, desired)):
        plan.rayservice, plan.network_policy, plan.msvc = desired, policy, msvc
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
    elif live is None and held is not None:
        conds = _cond(conds, "Ready", False, held[0], held[1], gen, now)
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


def waits_for_secret(body: Mapping[str, Any]) -> bool:
    """Whether the service waits for its API-key Secret (or the key in it) to appear."""
    return any(
        c.get("type") == AUTH_READY and c.get("status") == "False"
        for c in (body.get("status") or {}).get("conditions") or []
        if isinstance(c, dict)
    )


def _all_resolved(
    conds: list[Condition], n: int, gen: int | None, now: dt.datetime
) -> list[Condition]:
    return _cond(conds, "AdaptersReady", True, "AllResolved", f"{n} adapter(s) resolved", gen, now)


def serves_adapters(live: Mapping[str, Any] | None) -> bool:
    """Whether a pass should ask the replicas which adapters failed to load: the live
    RayService's application runs and its Serve config has adapters."""
    if live is None:
        return False
    active = ((live.get("status") or {}).get("activeServiceStatus")) or {}
    app = (active.get("applicationStatuses") or {}).get(APP_NAME) or {}
    return app.get("status") == "RUNNING" and bool(_serve_adapters(live))


def watches_canaries(body: Mapping[str, Any]) -> bool:
    """Whether a pass should ask the replicas about their canaries: one is progressing."""
    return any(
        c.get("state") == CanaryState.PROGRESSING.value
        for c in (body.get("status") or {}).get("canaries") or []
        if isinstance(c, dict)
    )


def _hash(obj: Mapping[str, Any]) -> str | None:
    ann = (obj.get("metadata") or {}).get("annotations") or {}
    value = ann.get(naming.ANNOTATION_SPEC_HASH)
    return str(value) if value is not None else None


def _differs(live: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    lspec = live.get("spec") or {}
    live_ann = (live.get("metadata") or {}).get("annotations") or {}
    return (
        _hash(live) != _hash(desired)
        or lspec.get("serveConfigV2") != desired["spec"].get("serveConfigV2")
        or live_ann.get(rs.ANNOTATION_NETWORK_HASH)
        != desired["metadata"]["annotations"].get(rs.ANNOTATION_NETWORK_HASH)
    )


def internal_error_plan(body: Mapping[str, Any], e: Exception, now: dt.datetime) -> Plan:
    """The status to write when ``decide`` raised: Ready=False, reason InternalError."""
    meta = body.get("metadata") or {}
    gen = meta.get("generation")
    raw = {k: v for k, v in (body.get("status") or {}).items() if k != "graft"}
    try:
        st = ModelServiceStatus.model_validate(raw)
    except ValueError:
        st = ModelServiceStatus()
    msg = (
        f"the operator could not process this ModelService ({type(e).__name__}: {e}"[:600]
        + "). This is a bug in Graft: report it with the ModelService's YAML; changing the "
        "spec retries."
    )
    events = []
    if not any(c.type == "Ready" and c.reason == "InternalError" for c in st.conditions):
        events.append(("Warning", "InternalError", msg))
    st.conditions = _cond(st.conditions, "Ready", False, "InternalError", msg, gen, now)
    st.phase = ModelServicePhase.FAILED
    st.observed_generation = gen
    return Plan(status=st, events=events)


#: How many replica reports one pass asks for (while a canary progresses, or while the
#: running app serves adapters); each comes from a replica Serve picks.
CANARY_REPORT_SAMPLES = 4


class ModelServiceReconciler:
    """Runs passes, one at a time per ModelService."""

    def __init__(self, kube: Kube, settings: Settings, serve: ServeClient | None = None) -> None:
        self.kube = kube
        self.settings = settings
        self.serve: ServeClient = serve or HttpServeClient()
        self._passes = Coalescer()

    def forget(self, namespace: str, name: str) -> None:
        self._passes.forget((namespace, name))

    async def reconcile(self, namespace: str, name: str) -> None:
        await self._passes.run((namespace, name), lambda: self._pass(namespace, name))

    async def _replica_reports(
        self, body: Mapping[str, Any], live: Mapping[str, Any] | None
    ) -> list[dict[str, Any]]:
        if live is None or not (watches_canaries(body) or serves_adapters(live)):
            return []
        meta = body.get("metadata") or {}
        svc = f"{rs.rayservice_name_for(str(meta.get('name')))}-serve-svc"
        base = f"http://{svc}.{meta.get('namespace')}.svc:{SERVE_PORT}"
        return await self.serve.reports(base, samples=CANARY_REPORT_SAMPLES)

    async def _apply_guards(self, plan: Plan, owner: kopf.Body) -> None:
        """The Ray token Secret (created once; KubeRay hands it to every Ray container)
        and the NetworkPolicy, before the RayService whose pods need them."""
        if plan.msvc is not None:
            secret = rs.build_ray_token_secret(plan.msvc, secrets.token_urlsafe(32))
            kopf.append_owner_reference(secret, owner=owner)
            await self.kube.create_secret(secret)
        if plan.network_policy is not None:
            kopf.append_owner_reference(plan.network_policy, owner=owner)
            await self.kube.apply(plan.network_policy)

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
        rs_name = rs.rayservice_name_for(name)
        live = await self.kube.get_custom(RAY_API_VERSION, "RayService", namespace, rs_name)
        reports = await self._replica_reports(body, live)
        secrets = {s: await self.kube.secret_keys(namespace, s) for s in secret_names(body)}
        now = dt.datetime.now(dt.UTC)
        try:
            plan = decide(body, jobs, live, self.settings, now, reports, secrets)
        except Exception as e:
            # A bug must not become a retry loop with an empty status: say so on the object.
            log.exception("ModelService %s/%s: decide failed", namespace, name)
            plan = internal_error_plan(body, e, now)
        owner = kopf.Body(
            {
                "apiVersion": body["apiVersion"],
                "kind": body["kind"],
                "metadata": {"name": name, "uid": body["metadata"]["uid"], "namespace": namespace},
            }
        )
        if plan.rayservice is not None:
            await self._apply_guards(plan, owner)
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
