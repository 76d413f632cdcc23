"""FineTuneJob reconciler: one gang attempt at a time, restarted from the last checkpoint.

A pass reads the world (the job, its Pods and the Nodes they sit on, from Kopf's indexes),
``decide`` turns it into a ``Plan`` without I/O, and ``execute`` applies the plan and writes
status once. Passes for one job never overlap (a lock per job), and every decision is
derived from status and the live Pods, so an operator restart resumes where it was:
Pods are created under deterministic names (create-ignore-409), never twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import kopf

from graft import metrics
from graft.api.common import API_VERSION, Condition, set_condition
from graft.api.finetunejob import (
    KIND,
    FailureRecord,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    Method,
    OutputKind,
    OutputStatus,
)
from graft.builders import finetunejob as build
from graft.builders import naming
from graft.config import Settings
from graft.gate import verdict
from graft.kube import Kube
from graft.placement import PlacementError, place
from graft.reconcile.common import Coalescer, status_patch
from graft.status import (
    ConditionType,
    GangPhase,
    Reason,
    derive_phase,
    gang_state,
    gpu_hours,
    make_condition,
    next_backoff,
    parse_time,
    progress_from_annotation,
    progress_summary,
)
from graft.validation import InvalidSpec, parse_spec

log = logging.getLogger(__name__)
T = ConditionType


@dataclasses.dataclass
class World:
    """What one pass sees."""

    job: dict[str, Any]
    pods: list[dict[str, Any]]
    nodes: Mapping[str, Mapping[str, Any]]
    now: dt.datetime
    recorded_spec: dict[str, Any] | None = None  # spec of the running attempt (ConfigMap)


@dataclasses.dataclass
class Plan:
    """What one pass decided; ``execute`` carries it out."""

    status: FineTuneJobStatus
    apply: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    create_pods: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    delete_pods: list[tuple[str, int | None]] = dataclasses.field(default_factory=list)
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    requeue_after: float | None = None
    needs_recorded_spec: bool = False
    restart_reason: str | None = None
    detection_seconds: float | None = None
    recovery_seconds: float | None = None
    gpu_hours_done: float = 0.0


def _attempt_of(pod: Mapping[str, Any]) -> int | None:
    raw = (pod.get("metadata", {}).get("labels") or {}).get(naming.LABEL_ATTEMPT)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _node_lost(pod: Mapping[str, Any], nodes: Mapping[str, Mapping[str, Any]]) -> bool:
    node = (pod.get("spec") or {}).get("nodeName")
    if not node:
        return False
    n = nodes.get(node)
    if n is None:
        return True
    for c in (n.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return bool(c.get("status") != "True")
    return True


def _deletion(
    pod: Mapping[str, Any], nodes: Mapping[str, Mapping[str, Any]]
) -> tuple[str, int | None]:
    """Grace 0 where no kubelet will confirm (lost node, unbound) or nothing runs any more;
    the default grace otherwise, so a live trainer gets SIGTERM and checkpoints."""
    name = str(pod["metadata"]["name"])
    phase = (pod.get("status") or {}).get("phase")
    unbound = not (pod.get("spec") or {}).get("nodeName")
    if unbound or phase in ("Succeeded", "Failed") or _node_lost(pod, nodes):
        return name, 0
    return name, None


def _spec_hash(spec: FineTuneJobSpec) -> str:
    return naming.spec_hash(spec.model_copy(update={"suspend": False}))


def _default_output(spec: FineTuneJobSpec) -> OutputStatus:
    kind = OutputKind.MODEL if spec.method == Method.FULL else OutputKind.ADAPTER
    return OutputStatus(uri=spec.output.uri, kind=kind)


def decide(world: World, settings: Settings) -> Plan:
    """The pure core of a pass."""
    body = world.job
    meta = body.get("metadata", {})
    gen = meta.get("generation")
    now = world.now
    raw_status = {k: v for k, v in (body.get("status") or {}).items() if k != "graft"}
    st = FineTuneJobStatus.model_validate(raw_status)
    plan = Plan(status=st)
    conds: list[Condition] = list(st.conditions)

    def cond(type_: T, status: bool, reason: Reason | str, message: str) -> None:
        nonlocal conds
        conds = set_condition(
            conds, make_condition(type_, status, reason, message, now=now, generation=gen)
        )

    def is_(type_: T) -> bool:
        return any(c.type == type_ and c.status == "True" for c in conds)

    def event(kind: str, reason: str, message: str) -> None:
        plan.events.append((kind, reason, message))

    # Pods whose GPU time is not yet in completed_attempts_gpu_hours; the pool for the price.
    running: list[Mapping[str, Any]] = []
    price: float | None = None

    def finish() -> Plan:
        st.conditions = conds
        st.phase = derive_phase(conds)
        st.observed_generation = gen
        if st.placement is not None and price is not None:
            # every path computes these the same way, so a pass that changes nothing else
            # writes nothing
            used = gpu_hours(running, st.placement.gpus_per_node, now)
            st.gpu_hours = round(st.completed_attempts_gpu_hours + used, 4)
            st.cost = round(st.gpu_hours * price, 2) if price else None
        return plan

    # 1. The spec: valid, and unchanged since the job started (suspend aside).
    try:
        spec = parse_spec(FineTuneJobSpec, body.get("spec") or {})
    except InvalidSpec as e:
        if st.attempt == 0:
            if not is_(T.FAILED):
                event("Warning", Reason.INVALID_SPEC, str(e))
            cond(T.ACCEPTED, False, Reason.INVALID_SPEC, str(e))
            cond(T.FAILED, True, Reason.INVALID_SPEC, str(e))
            return finish()
        spec = None
        refusal = str(e)
    else:
        refusal = ""
    if spec is not None and st.spec_hash and st.attempt > 0 and _spec_hash(spec) != st.spec_hash:
        refusal = "spec changes to a started job are refused (only spec.suspend may change)"
    if refusal:
        if world.recorded_spec is None:
            plan.needs_recorded_spec = True
            return finish()
        suspend = bool((body.get("spec") or {}).get("suspend", False))
        spec = FineTuneJobSpec.model_validate({**world.recorded_spec, "suspend": suspend})
        msg = (
            f"{refusal}; the job goes on with the spec it started with. Revert the change, "
            "or delete the job and create a new one."
        )
        if not any(c.type == T.ACCEPTED and c.reason == Reason.SPEC_CHANGE_REFUSED for c in conds):
            event("Warning", Reason.SPEC_CHANGE_REFUSED, msg)
        cond(T.ACCEPTED, False, Reason.SPEC_CHANGE_REFUSED, msg)
    else:
        assert spec is not None
        if not is_(T.ACCEPTED):
            event("Normal", "Accepted", "spec is valid")
        cond(T.ACCEPTED, True, Reason.VALID, "spec is valid")
    job = FineTuneJob(metadata=meta, spec=spec)
    nodes = world.nodes
    attempt_pods = [p for p in world.pods if _attempt_of(p) == st.attempt]
    live_stale = [
        p
        for p in world.pods
        if _attempt_of(p) != st.attempt and not p["metadata"].get("deletionTimestamp")
    ]
    plan.delete_pods += [_deletion(p, nodes) for p in live_stale]

    # 2. Terminal: nothing more to run; make sure nothing still holds GPUs.
    if is_(T.SUCCEEDED) or is_(T.FAILED):
        plan.delete_pods += [
            _deletion(p, nodes)
            for p in attempt_pods
            if not p["metadata"].get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]
        return finish()

    # 3. Placement, once.
    if st.placement is None:
        try:
            st.placement = place(spec.resources, settings.node_pools)
        except PlacementError as e:
            msg = f"{e.message}. Change spec.resources or the operator's nodePools."
            if not any(c.type == T.ADMITTED and c.reason == Reason.UNSCHEDULABLE for c in conds):
                event("Warning", Reason.UNSCHEDULABLE, msg)
            cond(T.ADMITTED, False, Reason.UNSCHEDULABLE, msg)
            return finish()
        p = st.placement
        msg = f"{p.nodes} node(s) x {p.gpus_per_node} GPU(s) on pool {p.node_pool}"
        cond(T.ADMITTED, True, Reason.PLACED, msg)
        event("Normal", Reason.PLACED, msg)
    placement = st.placement
    pool = settings.pool(placement.node_pool)
    if pool is None:
        msg = f"node pool {placement.node_pool!r} is no longer in the operator's nodePools"
        cond(T.ADMITTED, False, Reason.UNSCHEDULABLE, msg)
        return finish()
    gpus = placement.gpus_per_node
    price = pool.price_per_gpu_hour
    running = [p for p in attempt_pods if not p["metadata"].get("deletionTimestamp")]

    def tear_down(pods: Iterable[Mapping[str, Any]]) -> None:
        nonlocal running
        pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        running = []
        done = gpu_hours(pods, gpus, now)
        st.completed_attempts_gpu_hours = round(st.completed_attempts_gpu_hours + done, 6)
        plan.gpu_hours_done += done
        plan.delete_pods.extend(_deletion(p, nodes) for p in pods)

    def start_attempt(why: str) -> None:
        st.attempt += 1
        st.restart_at = None
        st.start_time = st.start_time or now.strftime("%Y-%m-%dT%H:%M:%SZ")
        st.spec_hash = st.spec_hash or _spec_hash(spec)
        resume = st.last_checkpoint.uri if st.last_checkpoint else None
        plan.apply += build.build_trainer_identity(job, placement, st.attempt)
        plan.apply.append(build.build_config_map(job, placement, st.attempt, resume, settings))
        plan.apply.append(build.build_gang_service(job))
        plan.create_pods += build.build_pods(
            job, placement, pool, st.attempt, resume, settings, avoid_nodes=list(st.avoid_nodes)
        )
        frm = f" from checkpoint {resume}" if resume else ""
        event("Normal", "AttemptStarted", f"attempt {st.attempt} ({why}){frm}")
        # the same words gang_state uses for an all-pending gang: the next pass rewrites nothing
        cond(T.RUNNING, False, Reason.NOT_ALL_RANKS_RUNNING, f"0/{placement.nodes} ranks running")
        cond(T.GANG_PENDING, False, Reason.ALL_RANKS_SCHEDULED, "")
        plan.requeue_after = float(settings.gang_pending_timeout_seconds) + 1

    # 4. Suspend and resume.
    if spec.suspend:
        tear_down(attempt_pods)
        if not is_(T.SUSPENDED):
            event("Normal", Reason.SUSPENDED, "pods told to checkpoint and stop")
        cond(
            T.SUSPENDED,
            True,
            Reason.SUSPENDED,
            "spec.suspend is true; set it to false to resume from the last checkpoint",
        )
        cond(T.RUNNING, False, Reason.SUSPENDED, "suspended")
        return finish()
    if is_(T.SUSPENDED):
        cond(T.SUSPENDED, False, Reason.RESUMED, "resumed")
        if st.attempt > 0:
            # like a restart without the count: the next attempt starts once the old is gone
            st.restart_at = now.strftime("%Y-%m-%dT%H:%M:%SZ")

    # 5. A new attempt: the first, or after the restart backoff.
    if st.attempt == 0:
        start_attempt("first")
        return finish()
    if st.restart_at is not None:
        due = parse_time(st.restart_at) or now
        if now < due:
            plan.requeue_after = (due - now).total_seconds()
            return finish()
        # Rank 0's DNS name and the GPUs move to the new attempt only once the old Pods
        # are gone (their trainers checkpoint on SIGTERM within the grace period); a Pod
        # that outlives the grace period by far is on a node nobody hears from: force it.
        leftovers = [p for p in world.pods if (_attempt_of(p) or 0) <= st.attempt]
        if leftovers:
            overdue = (now - due).total_seconds() > settings.termination_grace_seconds + 30
            if overdue:
                plan.delete_pods += [(str(p["metadata"]["name"]), 0) for p in leftovers]
            plan.requeue_after = 1.0
            return finish()
        start_attempt(f"restart {st.restarts}" if is_(T.RESTARTING) else "resumed after suspend")
        return finish()

    # 6. Observe the running attempt.
    gang = gang_state(
        attempt_pods, nodes, settings.gang_pending_timeout_seconds, now, expected=placement.nodes
    )
    rank0 = next(
        (
            p
            for p in attempt_pods
            if (p["metadata"].get("labels") or {}).get(naming.LABEL_RANK) == "0"
        ),
        None,
    )
    if rank0 is not None:
        upd = progress_from_annotation(
            (rank0["metadata"].get("annotations") or {}).get(naming.ANNOTATION_PROGRESS)
        )
        if upd.progress is not None:
            st.progress = upd.progress
            st.progress_summary = progress_summary(upd.progress.step, upd.progress.total_steps)
        if upd.last_checkpoint is not None:
            st.last_checkpoint = upd.last_checkpoint
        if upd.data is not None:
            st.data = upd.data
        if upd.output is not None:
            st.output = upd.output
        if upd.evaluation is not None:
            st.evaluation = upd.evaluation

    if gang.missing_ranks and not gang.failures:
        # the operator stopped between creating Pods, or someone deleted an unstarted one
        resume = st.last_checkpoint.uri if st.last_checkpoint else None
        missing = set(gang.missing_ranks)
        plan.apply.append(build.build_config_map(job, placement, st.attempt, resume, settings))
        plan.apply.append(build.build_gang_service(job))
        plan.create_pods += [
            pod
            for pod in build.build_pods(
                job, placement, pool, st.attempt, resume, settings, avoid_nodes=list(st.avoid_nodes)
            )
            if int(pod["metadata"]["labels"][naming.LABEL_RANK]) in missing
        ]

    if gang.phase == GangPhase.RUNNING:
        if not is_(T.RUNNING):
            event("Normal", "Running", gang.message)
            if is_(T.RESTARTING) and st.last_failure and st.last_failure.time:
                seen = parse_time(st.last_failure.time)
                if seen is not None:
                    plan.recovery_seconds = (now - seen).total_seconds()
        cond(T.RUNNING, True, Reason.ALL_RANKS_RUNNING, gang.message)
        cond(T.GANG_PENDING, False, Reason.ALL_RANKS_SCHEDULED, "")
        if is_(T.RESTARTING):
            cond(T.RESTARTING, False, Reason.RESUMED, f"attempt {st.attempt} running")
    elif gang.phase == GangPhase.PENDING:
        cond(T.RUNNING, False, Reason.NOT_ALL_RANKS_RUNNING, gang.message)
        if gang.gang_pending:
            if not is_(T.GANG_PENDING):
                event("Warning", Reason.RANKS_PENDING, gang.message)
            cond(T.GANG_PENDING, True, Reason.RANKS_PENDING, gang.message)
        else:
            plan.requeue_after = float(settings.gang_pending_timeout_seconds) + 1
    elif gang.phase == GangPhase.SUCCEEDED:
        st.output = st.output or _default_output(spec)
        gate = verdict(spec.evaluation, st.evaluation)
        st.output.promotable = gate.promotable if gate else True
        if gate is not None:
            if st.evaluation is not None:
                st.evaluation.passed = gate.passed
            cond(T.EVALUATION_PASSED, gate.passed is not False, gate.reason, gate.message)
        st.completion_time = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        cond(T.RUNNING, False, Reason.COMPLETED, "all ranks finished")
        cond(T.RESTARTING, False, Reason.COMPLETED, "")
        cond(T.SUCCEEDED, True, Reason.COMPLETED, f"output written to {st.output.uri}")
        event("Normal", Reason.COMPLETED, f"output written to {st.output.uri}")
        plan.gpu_hours_done += gpu_hours(attempt_pods, gpus, now)
    else:
        failure = gang.failure
        assert failure is not None
        where = " ".join(
            x
            for x in (
                f"rank {failure.rank}" if failure.rank is not None else "",
                f"on node {failure.node}" if failure.node else "",
            )
            if x
        )
        st.last_failure = FailureRecord(
            reason=str(failure.reason),
            message=failure.message,
            time=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            node=failure.node,
            rank=failure.rank,
        )
        plan.detection_seconds = _detection_seconds(failure.node, attempt_pods, nodes, now)
        tear_down(attempt_pods)
        cond(T.RUNNING, False, failure.reason, failure.message)
        policy = spec.restart_policy
        if not failure.retryable:
            msg = f"{where}: {failure.message}" if where else failure.message
            cond(T.FAILED, True, failure.reason, msg)
            cond(T.RESTARTING, False, failure.reason, "not retryable")
            st.completion_time = now.strftime("%Y-%m-%dT%H:%M:%SZ")
            event("Warning", str(failure.reason), msg)
        elif st.restarts >= policy.max_restarts:
            msg = (
                f"attempt {st.attempt} failed ({where}: {failure.message}) after "
                f"{st.restarts} restart(s); raise spec.restartPolicy.maxRestarts "
                "or fix the cause, then create the job again"
            )
            cond(T.FAILED, True, Reason.MAX_RESTARTS_EXCEEDED, msg)
            cond(T.RESTARTING, False, Reason.MAX_RESTARTS_EXCEEDED, "")
            st.completion_time = now.strftime("%Y-%m-%dT%H:%M:%SZ")
            event("Warning", Reason.MAX_RESTARTS_EXCEEDED, msg)
        else:
            delay = next_backoff(st.restarts, policy)
            st.restarts += 1
            st.restart_at = (now + dt.timedelta(seconds=delay)).strftime("%Y-%m-%dT%H:%M:%SZ")
            st.avoid_nodes = sorted(set(st.avoid_nodes) | set(gang.failed_nodes))[-16:]
            ck = st.last_checkpoint
            frm = f"checkpoint step {ck.step}" if ck else "the start (no checkpoint yet)"
            msg = (
                f"{where}: {failure.message}; restart {st.restarts}/{policy.max_restarts} "
                f"in {delay}s from {frm}"
            )
            cond(T.RESTARTING, True, failure.reason, msg)
            event("Warning", str(failure.reason), msg)
            plan.restart_reason = str(failure.reason)
            plan.requeue_after = max(float(delay), 0.05)
    return finish()


def _detection_seconds(
    node: str | None,
    pods: Iterable[Mapping[str, Any]],
    nodes: Mapping[str, Mapping[str, Any]],
    now: dt.datetime,
) -> float | None:
    """From the failure's own timestamp to now, where the objects carry one."""
    times: list[dt.datetime] = []
    if node and node in nodes:
        for c in (nodes[node].get("status") or {}).get("conditions") or []:
            if c.get("type") == "Ready" and c.get("status") != "True":
                t = parse_time(c.get("lastTransitionTime"))
                if t:
                    times.append(t)
    for p in pods:
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            t = parse_time(((cs.get("state") or {}).get("terminated") or {}).get("finishedAt"))
            if t:
                times.append(t)
    return max(0.0, (now - min(times)).total_seconds()) if times else None


class FineTuneJobReconciler:
    """Runs passes, one at a time per job, and re-runs them when time alone moves things."""

    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.kube = kube
        self.settings = settings
        self._passes = Coalescer()
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self.pods_index: Mapping[Any, Iterable[Mapping[str, Any]]] = {}
        self.nodes_index: Mapping[Any, Iterable[Mapping[str, Any]]] = {}

    def use_indexes(self, pods: Mapping[Any, Any], nodes: Mapping[Any, Any]) -> None:
        self.pods_index, self.nodes_index = pods, nodes

    def _nodes(self) -> dict[str, Mapping[str, Any]]:
        out: dict[str, Mapping[str, Any]] = {}
        for name, store in self.nodes_index.items():
            for n in store:
                out[str(name)] = n
        return out

    async def reconcile(self, namespace: str, name: str) -> None:
        await self._passes.run((namespace, name), lambda: self._pass(namespace, name))

    def forget(self, namespace: str, name: str) -> None:
        self._passes.forget((namespace, name))
        timer = self._timers.pop((namespace, name), None)
        if timer:
            timer.cancel()

    def _requeue(self, namespace: str, name: str, delay: float) -> None:
        key = (namespace, name)
        old = self._timers.pop(key, None)
        if old:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(
            delay, lambda: asyncio.ensure_future(self._timed(namespace, name))
        )

    async def _timed(self, namespace: str, name: str) -> None:
        """A pass that no Kopf handler wraps: log failures and try again later."""
        try:
            await self.reconcile(namespace, name)
        except Exception as e:
            metrics.RECONCILES.labels(KIND, "error").inc()
            log.warning(
                "timed reconcile failed; retrying in 5s",
                extra={"job": f"{namespace}/{name}", "error": str(e)},
            )
            self._requeue(namespace, name, 5.0)

    async def _pass(self, namespace: str, name: str) -> None:
        t0 = asyncio.get_running_loop().time()
        body = await self.kube.get_custom(API_VERSION, KIND, namespace, name)
        if body is None:
            self.forget(namespace, name)
            metrics.observe_phase(KIND, f"{namespace}/{name}", None)
            return
        world = World(
            job=body,
            pods=[dict(p) for p in self.pods_index.get((namespace, name), [])],
            nodes=self._nodes(),
            now=dt.datetime.now(dt.UTC),
        )
        plan = decide(world, self.settings)
        if plan.needs_recorded_spec:
            cm = await self.kube.get_config_map(namespace, naming.config_map_name(name))
            try:
                world.recorded_spec = json.loads((cm or {})["data"][build.CONFIG_FILE])["spec"]
            except (KeyError, TypeError, ValueError):
                world.recorded_spec = dict(body.get("spec") or {})
            plan = decide(world, self.settings)
        await self._execute(body, plan)
        metrics.RECONCILES.labels(KIND, "ok").inc()
        metrics.RECONCILE_SECONDS.labels(KIND).observe(asyncio.get_running_loop().time() - t0)
        if plan.requeue_after is not None:
            self._requeue(namespace, name, plan.requeue_after)

    async def _execute(self, body: dict[str, Any], plan: Plan) -> None:
        owner_raw = {
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
            "metadata": {
                "name": body["metadata"]["name"],
                "uid": body["metadata"]["uid"],
                "namespace": body["metadata"]["namespace"],
            },
        }
        owner = kopf.Body(owner_raw)  # type: ignore[arg-type]
        ns = body["metadata"]["namespace"]
        for name, grace in plan.delete_pods:
            await self.kube.delete_pod(ns, name, grace_seconds=grace)
        for obj in plan.apply:
            kopf.append_owner_reference(obj, owner=owner)
            await self.kube.apply(obj)
        for pod in plan.create_pods:
            kopf.append_owner_reference(pod, owner=owner)
            await self.kube.create_pod(pod)
        patch = status_patch(dict(body.get("status") or {}), plan.status)
        if patch:
            await self.kube.patch_status(API_VERSION, KIND, ns, body["metadata"]["name"], patch)
        for kind, reason, message in plan.events:
            kopf.event(owner, type=kind, reason=reason, message=message[:1000])
        if plan.restart_reason:
            metrics.JOB_RESTARTS.labels(plan.restart_reason).inc()
        if plan.detection_seconds is not None:
            metrics.FAILURE_DETECTION_SECONDS.observe(plan.detection_seconds)
        if plan.recovery_seconds is not None:
            metrics.RECOVERY_SECONDS.observe(plan.recovery_seconds)
        if plan.gpu_hours_done and plan.status.placement:
            metrics.GPU_HOURS.labels(plan.status.placement.node_pool).inc(plan.gpu_hours_done)
        phase = plan.status.phase.value if plan.status.phase else None
        metrics.observe_phase(KIND, f"{ns}/{body['metadata']['name']}", phase)
