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
    Placement,
)
from graft.builders import finetunejob as build
from graft.builders import naming
from graft.builders.trainer_children import (
    build_network_policy,
    build_progress_lease,
    heartbeat_timeout,
)
from graft.config import NodePool, Settings
from graft.gate import verdict
from graft.kube import Kube
from graft.placement import PlacementError, place
from graft.reconcile.common import Coalescer, status_patch
from graft.reconcile.trainer_report import hung_for, read_report, remember_rejection
from graft.status import (
    ConditionType,
    Failure,
    GangPhase,
    GangState,
    Reason,
    derive_phase,
    gang_state,
    gpu_hours,
    make_condition,
    next_backoff,
    parse_time,
    progress_summary,
)
from graft.validation import InvalidSpec, cluster_uri_problem, parse_spec

log = logging.getLogger(__name__)
T = ConditionType
#: After a Pod create answered 409 (exists), the next pass checks that it really does.
POD_RECHECK_SECONDS = 2.0
#: A failed pass (an apiserver error) is tried again after this long, or the error's delay.
RETRY_SECONDS = 5.0


@dataclasses.dataclass
class World:
    """What one pass sees."""

    job: dict[str, Any]
    pods: list[dict[str, Any]]
    nodes: Mapping[str, Mapping[str, Any]]
    now: dt.datetime
    recorded_spec: dict[str, Any] | None = None  # spec of the running attempt (ConfigMap)
    lease: Mapping[str, Any] | None = None  # the progress Lease rank 0 writes


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
    #: (kind, name) of children to delete: what a refused job had created.
    delete_children: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _attempt_of(pod: Mapping[str, Any]) -> int | None:
    raw = (pod.get("metadata", {}).get("labels") or {}).get(naming.LABEL_ATTEMPT)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _older_attempt(pod: Mapping[str, Any], attempt: int) -> bool:
    n = _attempt_of(pod)
    return n is None or n < attempt


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


#: kubectl's copy of the whole object it applied: often the largest part of a job's body
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def trimmed(job: Mapping[str, Any]) -> dict[str, Any]:
    """The job's body without what no pass reads and what makes it large: managedFields and
    kubectl's last-applied copy (the rest is shared with ``job``, not copied)."""
    meta = {k: v for k, v in (job.get("metadata") or {}).items() if k != "managedFields"}
    annotations = meta.get("annotations")
    if annotations and LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    return {**job, "metadata": meta}


def packed(job: Mapping[str, Any]) -> str:
    """``trimmed(job)`` as compact JSON: a few KB instead of a tree of dicts several times
    that size, for a body that waits in memory until its pass."""
    return json.dumps(trimmed(job), separators=(",", ":"))


def pod_digest(pod: Mapping[str, Any]) -> int:
    """What a pass reads from a Pod: phase and reason, node, deletion, container states,
    the progress annotation."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    containers = json.dumps(
        [cs.get("state") for cs in status.get("containerStatuses") or []], sort_keys=True
    )
    return hash(
        (
            status.get("phase"),
            status.get("reason"),
            (pod.get("spec") or {}).get("nodeName"),
            meta.get("deletionTimestamp"),
            (meta.get("annotations") or {}).get(naming.ANNOTATION_PROGRESS),
            containers,
        )
    )


def _deleting(pod: Mapping[str, Any]) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def _spec_hash(spec: FineTuneJobSpec) -> str:
    return naming.spec_hash(spec.model_copy(update={"suspend": False}))


def _default_output(spec: FineTuneJobSpec) -> OutputStatus:
    kind = OutputKind.MODEL if spec.method == Method.FULL else OutputKind.ADAPTER
    return OutputStatus(uri=spec.output.uri, kind=kind)


@dataclasses.dataclass
class Draft:
    """The working state of one ``decide``: the plan taking shape and what the steps learn.

    Each step of ``decide`` takes the draft and returns it; a step that settles the pass
    sets ``done`` and the remaining steps are skipped.
    """

    world: World
    settings: Settings
    plan: Plan
    conds: list[Condition]
    generation: int | None
    done: bool = False
    spec: FineTuneJobSpec | None = None
    typed: FineTuneJob | None = None
    attempt_pods: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: Pods whose GPU time is not yet in completed_attempts_gpu_hours.
    running: list[Mapping[str, Any]] = dataclasses.field(default_factory=list)
    #: The pool's price per GPU-hour; None until the job is placed on a known pool.
    price: float | None = None
    pool: NodePool | None = None
    gang: GangState | None = None

    @property
    def status(self) -> FineTuneJobStatus:
        return self.plan.status

    @property
    def now(self) -> dt.datetime:
        return self.world.now

    def stamp(self) -> str:
        return self.now.strftime("%Y-%m-%dT%H:%M:%SZ")

    def cond(self, type_: T, status: bool, reason: Reason | str, message: str) -> None:
        self.conds = set_condition(
            self.conds,
            make_condition(
                type_, status, reason, message, now=self.now, generation=self.generation
            ),
        )

    def is_(self, type_: T) -> bool:
        return any(c.type == type_ and c.status == "True" for c in self.conds)

    def has_reason(self, type_: T, reason: Reason) -> bool:
        return any(c.type == type_ and c.reason == reason for c in self.conds)

    def event(self, kind: str, reason: str, message: str) -> None:
        self.plan.events.append((kind, reason, message))

    def stop(self) -> Draft:
        self.done = True
        return self

    @property
    def job(self) -> FineTuneJob:
        assert self.typed is not None
        return self.typed

    @property
    def placement(self) -> Placement:
        assert self.status.placement is not None
        return self.status.placement

    def resume_from(self) -> str | None:
        return self.status.last_checkpoint.uri if self.status.last_checkpoint else None

    def gang_children(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The attempt's ConfigMap and the gang Service, applied before any of its Pods."""
        job, st = self.job, self.status
        cm = build.build_config_map(
            job, self.placement, st.attempt, self.resume_from(), self.settings
        )
        return cm, build.build_gang_service(job)

    def rank_pods(self) -> list[dict[str, Any]]:
        assert self.pool is not None
        st = self.status
        return build.build_pods(
            self.job,
            self.placement,
            self.pool,
            st.attempt,
            self.resume_from(),
            self.settings,
            avoid_nodes=list(st.avoid_nodes),
        )

    def tear_down(self, pods: Iterable[Mapping[str, Any]]) -> None:
        """Delete ``pods`` and book their GPU time to the finished attempts."""
        st = self.status
        pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        self.running = []
        done = gpu_hours(pods, self.placement.gpus_per_node, self.now)
        st.completed_attempts_gpu_hours = round(st.completed_attempts_gpu_hours + done, 6)
        self.plan.gpu_hours_done += done
        self.plan.delete_pods.extend(_deletion(p, self.world.nodes) for p in pods)


def decide(world: World, settings: Settings) -> Plan:
    """The pure core of a pass: the steps below, in order, until one settles the pass."""
    d = _begin(world, settings)
    for step in (
        admit,
        settle_terminal,
        place_gang,
        suspend_or_resume,
        start_attempt,
        observe_gang,
        recover,
    ):
        if d.done:
            break
        d = step(d)
    return finish(d)


def _begin(world: World, settings: Settings) -> Draft:
    raw_status = {k: v for k, v in (world.job.get("status") or {}).items() if k != "graft"}
    st = FineTuneJobStatus.model_validate(raw_status)
    gen = world.job.get("metadata", {}).get("generation")
    return Draft(world, settings, Plan(status=st), list(st.conditions), gen)


def admit(d: Draft) -> Draft:
    """The spec: valid, and unchanged since the job started (suspend aside).

    A started job whose spec changed goes on with the spec it started with (recorded in
    its ConfigMap; the first ``decide`` asks for it with ``needs_recorded_spec``).
    """
    st, body = d.status, d.world.job
    if st.attempt == 0:
        _forget_old_refusal(d)
    try:
        spec: FineTuneJobSpec | None = parse_spec(FineTuneJobSpec, body.get("spec") or {})
        refusal = ""
    except InvalidSpec as e:
        if st.attempt == 0:
            return refuse(d, Reason.INVALID_SPEC, str(e))
        spec, refusal = None, str(e)
    if spec is not None and st.attempt == 0:
        problem = cluster_problem(spec, d.settings)
        if problem is not None:
            return refuse(d, *problem)
    if spec is not None and st.spec_hash and st.attempt > 0 and _spec_hash(spec) != st.spec_hash:
        refusal = "spec changes to a started job are refused (only spec.suspend may change)"
    if refusal:
        if d.world.recorded_spec is None:
            d.plan.needs_recorded_spec = True
            return d.stop()
        suspend = bool((body.get("spec") or {}).get("suspend", False))
        spec = FineTuneJobSpec.model_validate({**d.world.recorded_spec, "suspend": suspend})
        msg = (
            f"{refusal}; the job goes on with the spec it started with. Revert the change, "
            "or delete the job and create a new one."
        )
        if not d.has_reason(T.ACCEPTED, Reason.SPEC_CHANGE_REFUSED):
            d.event("Warning", Reason.SPEC_CHANGE_REFUSED, msg)
        d.cond(T.ACCEPTED, False, Reason.SPEC_CHANGE_REFUSED, msg)
    else:
        if not d.is_(T.ACCEPTED):
            d.event("Normal", "Accepted", "spec is valid")
        d.cond(T.ACCEPTED, True, Reason.VALID, "spec is valid")
    d.spec = spec
    d.typed = FineTuneJob(metadata=body.get("metadata", {}), spec=spec)
    pods = d.world.pods
    d.attempt_pods = [p for p in pods if _attempt_of(p) == st.attempt]
    # Pods of an older attempt go. Pods of a *later* attempt than status records were made by
    # a pass that stopped (operator killed) before its status write: they belong to the
    # attempt this pass is about to record again under the same names, so they stay.
    stale = [p for p in pods if _older_attempt(p, st.attempt) and not _deleting(p)]
    d.plan.delete_pods += [_deletion(p, d.world.nodes) for p in stale]
    return d


#: Reasons of a job refused before it started; a new generation of the spec is checked again.
REFUSALS = (Reason.INVALID_SPEC, Reason.STORAGE_NOT_ALLOWED, Reason.CHILD_REJECTED)


def refuse(d: Draft, reason: Reason, message: str) -> Draft:
    """Accepted=False and Failed=True with ``message`` (field and fix), one Warning Event."""
    if not d.has_reason(T.FAILED, reason) or not d.is_(T.FAILED):
        d.event("Warning", reason, message)
    d.cond(T.ACCEPTED, False, reason, message)
    d.cond(T.FAILED, True, reason, message)
    return d.stop()


def _forget_old_refusal(d: Draft) -> None:
    """A job refused before it started gets another chance when its spec changes."""
    failed = next((c for c in d.conds if c.type == T.FAILED and c.status == "True"), None)
    if failed and failed.reason in REFUSALS and failed.observed_generation != d.generation:
        d.cond(T.FAILED, False, Reason.SPEC_CHANGED, "the spec changed; checking it again")


def cluster_problem(spec: FineTuneJobSpec, settings: Settings) -> tuple[Reason, str] | None:
    """What the schema cannot say: storage a pod can reach, a config that fits."""
    for field, uri in build.storage_uris(spec):
        problem = cluster_uri_problem(field, uri, allow_hub=settings.allow_hub)
        if problem is not None:
            scheme = uri.partition("://")[0]
            reason = Reason.STORAGE_NOT_ALLOWED if scheme in ("hf", "file") else Reason.INVALID_SPEC
            return reason, problem
    size = len(naming.canonical_json(spec))
    if size > build.CONFIG_MAX_BYTES:
        return Reason.INVALID_SPEC, (
            f"spec: {size} bytes of JSON, over the {build.CONFIG_MAX_BYTES} the trainer's "
            "ConfigMap may hold; shorten the longest lists (spec.lora.targetModules, "
            "spec.stages, spec.evaluation.datasets)"
        )
    return None


def settle_terminal(d: Draft) -> Draft:
    """A Succeeded or Failed job runs nothing more: make sure nothing still holds GPUs."""
    if not (d.is_(T.SUCCEEDED) or d.is_(T.FAILED)):
        return d
    d.plan.delete_pods += [
        _deletion(p, d.world.nodes)
        for p in d.attempt_pods
        if not _deleting(p) and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]
    return d.stop()


def place_gang(d: Draft) -> Draft:
    """Placement, once per job; then the pool it names, its price and the live Pods."""
    st = d.status
    assert d.spec is not None
    if st.placement is None:
        try:
            st.placement = place(d.spec.resources, d.settings.node_pools)
        except PlacementError as e:
            msg = f"{e.message}. Change spec.resources or the operator's nodePools."
            if not d.has_reason(T.ADMITTED, Reason.UNSCHEDULABLE):
                d.event("Warning", Reason.UNSCHEDULABLE, msg)
            d.cond(T.ADMITTED, False, Reason.UNSCHEDULABLE, msg)
            return d.stop()
        p = st.placement
        msg = f"{p.nodes} node(s) x {p.gpus_per_node} GPU(s) on pool {p.node_pool}"
        d.cond(T.ADMITTED, True, Reason.PLACED, msg)
        d.event("Normal", Reason.PLACED, msg)
    d.pool = d.settings.pool(st.placement.node_pool)
    if d.pool is None:
        msg = f"node pool {st.placement.node_pool!r} is no longer in the operator's nodePools"
        d.cond(T.ADMITTED, False, Reason.UNSCHEDULABLE, msg)
        return d.stop()
    d.price = d.pool.price_per_gpu_hour
    d.running = [p for p in d.attempt_pods if not _deleting(p)]
    return d


def suspend_or_resume(d: Draft) -> Draft:
    """spec.suspend: Pods told to checkpoint and stop; unsuspended: a restart without the count."""
    assert d.spec is not None
    if d.spec.suspend:
        d.tear_down(d.attempt_pods)
        if not d.is_(T.SUSPENDED):
            d.event("Normal", Reason.SUSPENDED, "pods told to checkpoint and stop")
        d.cond(
            T.SUSPENDED,
            True,
            Reason.SUSPENDED,
            "spec.suspend is true; set it to false to resume from the last checkpoint",
        )
        d.cond(T.RUNNING, False, Reason.SUSPENDED, "suspended")
        return d.stop()
    if d.is_(T.SUSPENDED):
        d.cond(T.SUSPENDED, False, Reason.RESUMED, "resumed")
        if d.status.attempt > 0:
            # the next attempt starts once the old one is gone
            d.status.restart_at = d.stamp()
    return d


def start_attempt(d: Draft) -> Draft:
    """A new attempt: the first, or one due after the restart backoff once the old is gone."""
    st, now = d.status, d.now
    if st.attempt == 0:
        return _new_attempt(d, "first").stop()
    if st.restart_at is None:
        return d
    due = parse_time(st.restart_at) or now
    if now < due:
        d.plan.requeue_after = (due - now).total_seconds()
        return d.stop()
    # Rank 0's DNS name and the GPUs move to the new attempt only once the old Pods are
    # gone (their trainers checkpoint on SIGTERM within the grace period); a Pod that
    # outlives the grace period by far is on a node nobody hears from: force it.
    leftovers = [p for p in d.world.pods if (_attempt_of(p) or 0) <= st.attempt]
    if leftovers:
        if (now - due).total_seconds() > d.settings.termination_grace_seconds + 30:
            d.plan.delete_pods += [(str(p["metadata"]["name"]), 0) for p in leftovers]
        d.plan.requeue_after = 1.0
        return d.stop()
    why = f"restart {st.restarts}" if d.is_(T.RESTARTING) else "resumed after suspend"
    return _new_attempt(d, why).stop()


def _new_attempt(d: Draft, why: str) -> Draft:
    st, placement = d.status, d.placement
    assert d.spec is not None
    st.attempt += 1
    st.restart_at = None
    st.start_time = st.start_time or d.stamp()
    st.spec_hash = st.spec_hash or _spec_hash(d.spec)
    d.plan.apply += build.build_trainer_identity(d.job, placement, st.attempt)
    d.plan.apply += [build_progress_lease(d.job, d.settings), build_network_policy(d.job)]
    d.plan.apply += d.gang_children()
    d.plan.create_pods += d.rank_pods()
    resume = d.resume_from()
    frm = f" from checkpoint {resume}" if resume else ""
    d.event("Normal", "AttemptStarted", f"attempt {st.attempt} ({why}){frm}")
    # the same words gang_state uses for an all-pending gang: the next pass rewrites nothing
    d.cond(T.RUNNING, False, Reason.NOT_ALL_RANKS_RUNNING, f"0/{placement.nodes} ranks running")
    d.cond(T.GANG_PENDING, False, Reason.ALL_RANKS_SCHEDULED, "")
    d.plan.requeue_after = float(d.settings.gang_pending_timeout_seconds) + 1
    return d


def observe_gang(d: Draft) -> Draft:
    """The running attempt: rank 0's report, missing ranks re-created, and its phase
    (running, pending or succeeded settle the pass; a failure goes on to ``recover``)."""
    d.gang = gang = gang_state(
        d.attempt_pods,
        d.world.nodes,
        d.settings.gang_pending_timeout_seconds,
        d.now,
        expected=d.placement.nodes,
    )
    _roll_up_progress(d)
    if gang.phase == GangPhase.RUNNING:
        d.gang = gang = _check_heartbeat(d, gang)
    if gang.missing_ranks and not gang.failures:
        # the operator stopped between creating Pods, or someone deleted an unstarted one
        missing = set(gang.missing_ranks)
        d.plan.apply += d.gang_children()
        d.plan.create_pods += [
            pod
            for pod in d.rank_pods()
            if int(pod["metadata"]["labels"][naming.LABEL_RANK]) in missing
        ]
    follow = {
        GangPhase.RUNNING: _gang_running,
        GangPhase.PENDING: _gang_pending,
        GangPhase.SUCCEEDED: _gang_succeeded,
    }.get(gang.phase)
    return follow(d, gang).stop() if follow else d


def _gang_running(d: Draft, gang: GangState) -> Draft:
    st = d.status
    if not d.is_(T.RUNNING):
        d.event("Normal", "Running", gang.message)
        if d.is_(T.RESTARTING) and st.last_failure and st.last_failure.time:
            seen = parse_time(st.last_failure.time)
            if seen is not None:
                d.plan.recovery_seconds = (d.now - seen).total_seconds()
    d.cond(T.RUNNING, True, Reason.ALL_RANKS_RUNNING, gang.message)
    d.cond(T.GANG_PENDING, False, Reason.ALL_RANKS_SCHEDULED, "")
    if d.is_(T.RESTARTING):
        d.cond(T.RESTARTING, False, Reason.RESUMED, f"attempt {st.attempt} running")
    return d


def _gang_pending(d: Draft, gang: GangState) -> Draft:
    d.cond(T.RUNNING, False, Reason.NOT_ALL_RANKS_RUNNING, gang.message)
    if gang.gang_pending:
        if not d.is_(T.GANG_PENDING):
            d.event("Warning", Reason.RANKS_PENDING, gang.message)
        d.cond(T.GANG_PENDING, True, Reason.RANKS_PENDING, gang.message)
    else:
        d.plan.requeue_after = float(d.settings.gang_pending_timeout_seconds) + 1
    return d


def _gang_succeeded(d: Draft, gang: GangState) -> Draft:
    st = d.status
    assert d.spec is not None
    st.output = st.output or _default_output(d.spec)
    gate = verdict(d.spec.evaluation, st.evaluation)
    st.output.promotable = gate.promotable if gate else True
    if gate is not None:
        if st.evaluation is not None:
            st.evaluation.passed = gate.passed
        d.cond(T.EVALUATION_PASSED, gate.passed is not False, gate.reason, gate.message)
    st.completion_time = d.stamp()
    d.cond(T.RUNNING, False, Reason.COMPLETED, "all ranks finished")
    d.cond(T.RESTARTING, False, Reason.COMPLETED, "")
    d.cond(T.SUCCEEDED, True, Reason.COMPLETED, f"output written to {st.output.uri}")
    d.event("Normal", Reason.COMPLETED, f"output written to {st.output.uri}")
    d.plan.gpu_hours_done += gpu_hours(d.attempt_pods, d.placement.gpus_per_node, d.now)
    return d


def _roll_up_progress(d: Draft) -> None:
    """Rank 0's report on the progress Lease into status, URIs checked first."""
    st = d.status
    assert d.spec is not None
    report = read_report(d.world.lease, d.spec, st.attempt)
    if report is None:
        return
    seen = remember_rejection(st.untrusted_reports, report)
    if seen is not None:
        st.untrusted_reports = seen
        why = "; ".join(report.rejected)
        d.event("Warning", "UntrustedReport", f"ignored from the trainer's report: {why}")
    upd = report.update
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


def _check_heartbeat(d: Draft, gang: GangState) -> GangState:
    """A Running gang whose heartbeat is older than the timeout is hung: a retryable
    failure; otherwise a pass is scheduled for when it would be."""
    timeout = heartbeat_timeout(d.job, d.settings)
    since = next(
        (
            parse_time(c.last_transition_time)
            for c in d.conds
            if c.type == T.RUNNING and c.status == "True"
        ),
        None,
    )
    quiet, left = hung_for(d.world.lease, since or d.now, d.now, timeout)
    if quiet is None:
        wake = left + 1.0
        d.plan.requeue_after = min(d.plan.requeue_after or wake, wake)
        return gang
    failure = Failure(
        retryable=True,
        reason=Reason.TRAINER_HUNG,
        message=f"no heartbeat from rank 0 for {int(quiet)}s (heartbeat timeout {timeout}s): "
        "a rank is stuck (in a collective, storage or a deadlock); restarting from the last "
        "checkpoint. Raise spec.restartPolicy.heartbeatTimeoutSeconds if steps or checkpoint "
        "writes take longer",
        rank=0,
    )
    return dataclasses.replace(gang, phase=GangPhase.FAILED, failures=(failure,))


def recover(d: Draft) -> Draft:
    """A failed attempt: tear it down, then fail the job or schedule a restart after backoff."""
    st, now = d.status, d.now
    assert d.gang is not None and d.spec is not None
    failure = d.gang.failure
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
        time=d.stamp(),
        node=failure.node,
        rank=failure.rank,
    )
    d.plan.detection_seconds = _detection_seconds(failure.node, d.attempt_pods, d.world.nodes, now)
    d.tear_down(d.attempt_pods)
    d.cond(T.RUNNING, False, failure.reason, failure.message)
    policy = d.spec.restart_policy
    if not failure.retryable:
        msg = f"{where}: {failure.message}" if where else failure.message
        d.cond(T.FAILED, True, failure.reason, msg)
        d.cond(T.RESTARTING, False, failure.reason, "not retryable")
        st.completion_time = d.stamp()
        d.event("Warning", str(failure.reason), msg)
    elif st.restarts >= policy.max_restarts:
        msg = (
            f"attempt {st.attempt} failed ({where}: {failure.message}) after "
            f"{st.restarts} restart(s); raise spec.restartPolicy.maxRestarts "
            "or fix the cause, then create the job again"
        )
        d.cond(T.FAILED, True, Reason.MAX_RESTARTS_EXCEEDED, msg)
        d.cond(T.RESTARTING, False, Reason.MAX_RESTARTS_EXCEEDED, "")
        st.completion_time = d.stamp()
        d.event("Warning", Reason.MAX_RESTARTS_EXCEEDED, msg)
    else:
        delay = next_backoff(st.restarts, policy)
        st.restarts += 1
        st.restart_at = (now + dt.timedelta(seconds=delay)).strftime("%Y-%m-%dT%H:%M:%SZ")
        st.avoid_nodes = sorted(set(st.avoid_nodes) | set(d.gang.failed_nodes))[-16:]
        ck = st.last_checkpoint
        frm = f"checkpoint step {ck.step}" if ck else "the start (no checkpoint yet)"
        msg = (
            f"{where}: {failure.message}; restart {st.restarts}/{policy.max_restarts} "
            f"in {delay}s from {frm}"
        )
        d.cond(T.RESTARTING, True, failure.reason, msg)
        d.event("Warning", str(failure.reason), msg)
        d.plan.restart_reason = str(failure.reason)
        d.plan.requeue_after = max(float(delay), 0.05)
    return d.stop()


def finish(d: Draft) -> Plan:
    """Conditions, phase and GPU accounting into the status, the same way on every path,
    so a pass that changes nothing else writes nothing."""
    st = d.status
    st.conditions = d.conds
    st.phase = derive_phase(d.conds)
    st.observed_generation = d.generation
    if st.placement is not None and d.price is not None:
        used = gpu_hours(d.running, st.placement.gpus_per_node, d.now)
        st.gpu_hours = round(st.completed_attempts_gpu_hours + used, 4)
        st.cost = round(st.gpu_hours * d.price, 2) if d.price else None
    return d.plan


def decide_or_report(world: World, settings: Settings) -> Plan:
    """``decide``, with a bug in it turned into a condition on the job (and the log) instead
    of an exception Kopf would retry for ever."""
    try:
        return decide(world, settings)
    except Exception as e:
        job = world.job.get("metadata", {})
        log.exception("decide failed", extra={"job": f"{job.get('namespace')}/{job.get('name')}"})
        d = _begin(world, settings)
        msg = (
            f"the operator failed on this job ({type(e).__name__}: {e}); this is a bug in "
            "Graft: report it with the operator's log. The job is looked at again on its "
            "next change."
        )
        if not d.has_reason(T.ACCEPTED, Reason.RECONCILE_ERROR):
            d.event("Warning", Reason.RECONCILE_ERROR, msg)
        d.cond(T.ACCEPTED, False, Reason.RECONCILE_ERROR, msg[:2000])
        return finish(d)


def child_rejected(world: World, message: str) -> Plan:
    """The plan after the apiserver refused one of the job's children with a 4xx: the job
    fails with the apiserver's message, and everything it created is deleted (pods, the
    trainer identity, the ConfigMap, the gang Service)."""
    d = _begin(world, Settings())
    name = str(world.job["metadata"]["name"])
    msg = (
        f"{message[:1500]}. The apiserver refused a child of this job; fix the cause "
        "(the spec, or the namespace's policies and quotas) and apply the job again."
    )
    refuse(d, Reason.CHILD_REJECTED, msg)
    d.status.attempt = 0
    d.status.placement = None
    d.status.spec_hash = None
    d.status.start_time = None
    d.plan.delete_pods += [(str(p["metadata"]["name"]), 0) for p in world.pods]
    account = build.trainer_account_name(name)
    d.plan.delete_children += [
        ("RoleBinding", account),
        ("Role", account),
        ("ServiceAccount", account),
        ("ConfigMap", naming.config_map_name(name)),
        ("Service", naming.gang_service_name(name)),
    ]
    return finish(d)


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
        self.leases_index: Mapping[Any, Iterable[Mapping[str, Any]]] = {}
        #: (namespace, Pod name) -> ``pod_digest`` of the Pod's state a pass last saw
        self._pod_digests: dict[tuple[str, str], int] = {}
        #: (namespace, job) -> resourceVersion of this process's last status write, until
        #: the watch has delivered a version at least that new (``_fresh``)
        self._written: dict[tuple[str, str], int] = {}
        #: (namespace, job) -> (uid, generation) of the job's last event that started a pass
        self._specs: dict[tuple[str, str], tuple[str, int]] = {}
        #: (namespace, job) -> the job's latest watch body, trimmed and serialized
        #: (``packed``), until a pass takes it
        self._bodies: dict[tuple[str, str], str] = {}
        #: jobs waiting for a pass (each once), and the workers that run them (``submit``)
        self._queue: asyncio.Queue[tuple[str, str]] | None = None
        self._queued: set[tuple[str, str]] = set()
        self._workers: list[asyncio.Future[None]] = []

    def use_indexes(
        self, pods: Mapping[Any, Any], nodes: Mapping[Any, Any], leases: Mapping[Any, Any]
    ) -> None:
        self.pods_index, self.nodes_index, self.leases_index = pods, nodes, leases

    def spec_seen(self, namespace: str, name: str, job: Mapping[str, Any]) -> bool:
        """True when a pass already ran for this job's uid and spec generation, so its watch
        event (most often the echo of a status write) needs none; remembers it otherwise.
        A job new to this process (created, or listed after a restart) always gets a pass."""
        meta = job.get("metadata") or {}
        mark = (str(meta.get("uid")), int(meta.get("generation") or 0))
        key = (namespace, name)
        if self._specs.get(key) == mark:
            return True
        self._specs[key] = mark
        return False

    def pod_seen(self, namespace: str, name: str, pod: Mapping[str, Any] | None) -> bool:
        """True when a pass has already seen this state of the Pod (None: it was deleted),
        so its event needs no pass; remembers the state otherwise."""
        key = (namespace, name)
        if pod is None:
            self._pod_digests.pop(key, None)
            return False
        digest = pod_digest(pod)
        if self._pod_digests.get(key) == digest:
            return True
        self._pod_digests[key] = digest
        return False

    def _nodes(self) -> dict[str, Mapping[str, Any]]:
        out: dict[str, Mapping[str, Any]] = {}
        for name, store in self.nodes_index.items():
            for n in store:
                out[str(name)] = n
        return out

    def submit(self, namespace: str, name: str, body: Mapping[str, Any] | None = None) -> None:
        """Queue a pass for the job: once, however often it is asked for before it starts.
        ``maxConcurrentPasses`` workers run the queue, each pass retried on failure
        (``reconcile_or_retry``). The watch event that asked is let go at once, and a queued
        job holds only its latest body, trimmed and serialized: a restart over 10,000 jobs
        does not hold 10,000 parsed bodies while their passes wait."""
        key = (namespace, name)
        if body is not None:
            self._bodies[key] = packed(body)
        if key in self._queued:
            return
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._workers = [
                asyncio.ensure_future(self._work(self._queue))
                for _ in range(self.settings.max_concurrent_passes)
            ]
        self._queued.add(key)
        self._queue.put_nowait(key)

    async def _work(self, queue: asyncio.Queue[tuple[str, str]]) -> None:
        while True:
            key = await queue.get()
            self._queued.discard(key)
            await self.reconcile_or_retry(*key)

    async def close(self) -> None:
        """Stop the workers and timers (the operator is shutting down)."""
        for timer in self._timers.values():
            timer.cancel()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def reconcile(self, namespace: str, name: str) -> None:
        """A pass (or one more, if one is running). It uses the job's latest watch body
        (``submit``) instead of reading the job when that body already shows this process's
        last status write, and reads the job otherwise."""
        key = (namespace, name)

        async def once() -> None:
            raw = self._bodies.pop(key, None)
            given = json.loads(raw) if raw is not None else None
            if given is not None and not self._fresh(key, given):
                given = None
            await self._pass(namespace, name, given)

        await self._passes.run(key, once)

    def _fresh(self, key: tuple[str, str], body: Mapping[str, Any]) -> bool:
        """Whether ``body`` is at least as new as this process's last status write of the job
        (a watch event may lag behind a write made by a pass that read the job itself)."""
        written = self._written.get(key)
        if written is None:
            return True
        try:
            seen = int(str((body.get("metadata") or {}).get("resourceVersion")))
        except ValueError:
            return False
        if seen < written:
            return False
        del self._written[key]  # the watch is past the write: later events are newer still
        return True

    def forget(self, namespace: str, name: str) -> None:
        self._passes.forget((namespace, name))
        self._written.pop((namespace, name), None)
        self._specs.pop((namespace, name), None)
        self._bodies.pop((namespace, name), None)
        timer = self._timers.pop((namespace, name), None)
        if timer:
            timer.cancel()

    def _requeue(self, namespace: str, name: str, delay: float) -> None:
        key = (namespace, name)
        old = self._timers.pop(key, None)
        if old:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay, self.submit, namespace, name)

    async def reconcile_or_retry(self, namespace: str, name: str) -> None:
        """A pass (from the job's, its Pods' or a Node's events, or a timer): a failure is
        logged and the pass tried again later, so a temporary error never strands the job."""
        try:
            await self.reconcile(namespace, name)
        except Exception as e:
            metrics.RECONCILES.labels(KIND, "error").inc()
            delay = float(getattr(e, "delay", None) or RETRY_SECONDS)
            log.warning(
                "reconcile failed; retrying in %.0fs",
                delay,
                extra={"job": f"{namespace}/{name}", "error": str(e)},
            )
            self._requeue(namespace, name, delay)

    async def _pass(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> None:
        t0 = asyncio.get_running_loop().time()
        if body is None:
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
            lease=next(iter(self.leases_index.get((namespace, name), [])), None),
        )
        plan = decide_or_report(world, self.settings)
        if plan.needs_recorded_spec:
            cm = await self.kube.get_config_map(namespace, naming.config_map_name(name))
            try:
                world.recorded_spec = json.loads((cm or {})["data"][build.CONFIG_FILE])["spec"]
            except (KeyError, TypeError, ValueError):
                world.recorded_spec = dict(body.get("spec") or {})
            plan = decide_or_report(world, self.settings)
        try:
            await self._execute(body, plan)
        except kopf.PermanentError as e:
            # a 4xx on a child: retrying cannot help; say why and take back what was made
            plan = child_rejected(world, str(e))
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
        for kind, name in plan.delete_children:
            await self.kube.delete(kind, ns, name)
        for obj in plan.apply:
            kopf.append_owner_reference(obj, owner=owner)
            await self.kube.apply(obj)
        for pod in plan.create_pods:
            kopf.append_owner_reference(pod, owner=owner)
            # A new Pod's ADDED event shows phase Pending and nothing else a pass reads: what
            # this pass planned for, so that event needs no second pass. Noted before the
            # create, since the watch may deliver the event before the create returns.
            key = (ns, str(pod["metadata"]["name"]))
            self.pod_seen(*key, {**pod, "status": {"phase": "Pending"}})
            created = False
            try:
                created = await self.kube.create_pod(pod)
            except kopf.TemporaryError as e:
                # A 5xx on a Pod create (on v1.20 most often "No API token found": the new
                # ServiceAccount has no token yet) leaves the rest of the pass good: the status
                # below records the attempt, and the next pass re-creates only the missing
                # ranks (observe_gang) instead of a Kopf retry re-applying every child.
                log.info(
                    "Pod create failed for now; the missing rank is re-created in %.0fs",
                    POD_RECHECK_SECONDS,
                    extra={"pod": f"{key[0]}/{key[1]}", "error": str(e)},
                )
            finally:
                if not created:  # someone else's Pod, or none: its events are news
                    self._pod_digests.pop(key, None)
            if not created:
                # A 409 says a Pod of that name exists, but it may be gone by now, and if
                # it never existed no event will come: look again soon.
                wake = POD_RECHECK_SECONDS
                plan.requeue_after = min(plan.requeue_after or wake, wake)
        patch = status_patch(dict(body.get("status") or {}), plan.status)
        if patch:
            job = str(body["metadata"]["name"])
            version = await self.kube.patch_status(API_VERSION, KIND, ns, job, patch)
            if version is not None and version.isdigit():
                self._written[(ns, job)] = int(version)
            else:  # no version to compare a watch event with: read the job next time
                self._written[(ns, job)] = 1 << 62
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
