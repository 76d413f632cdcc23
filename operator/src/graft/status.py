"""FineTuneJob status: condition vocabulary, phase, and the pure parts of the gang machine.

Everything here reads plain Pod and Node dicts (as the apiserver returns them) plus an
explicit ``now``, and returns values; the reconciler decides what to apply and writes the
status once.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from graft.api.common import Condition, ConditionStatus, is_true, now_rfc3339
from graft.api.finetunejob import (
    CheckpointRef,
    DataCounts,
    EvaluationStatus,
    FineTuneJobPhase,
    OutputStatus,
    Progress,
    RestartPolicy,
)
from graft.gate import parse_evaluation

#: Exit codes of graft.runtime.train (docs/runtime-contract.md).
EXIT_USER_ERROR = 10
EXIT_RETRYABLE = 20


class ConditionType(StrEnum):
    """Condition types of a FineTuneJob."""

    #: The spec is valid (False: InvalidSpec or a refused spec change).
    ACCEPTED = "Accepted"
    #: A placement was found and, with Kueue, the gang admitted (False: Unschedulable).
    ADMITTED = "Admitted"
    #: Some ranks of the current attempt have stayed Pending past the timeout.
    GANG_PENDING = "GangPending"
    #: Every rank of the current attempt runs.
    RUNNING = "Running"
    #: The attempt failed retryably; the next one starts after the backoff.
    RESTARTING = "Restarting"
    #: spec.suspend is true and the pods are gone (or going).
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    #: spec.evaluation's gate passed (reasons in graft.gate; message with the figures).
    EVALUATION_PASSED = "EvaluationPassed"


class Reason(StrEnum):
    """Reasons of FineTuneJob conditions and of classified failures."""

    # Accepted
    VALID = "Valid"
    INVALID_SPEC = "InvalidSpec"
    SPEC_CHANGE_REFUSED = "SpecChangeRefused"
    #: hf:// or file:// in a cluster job (hf:// is allowed with GRAFT_ALLOW_HUB).
    STORAGE_NOT_ALLOWED = "StorageNotAllowed"
    #: The apiserver refused one of the job's children (4xx); the message is its own.
    CHILD_REJECTED = "ChildRejected"
    #: The operator failed on the job (a bug); the message says what to report.
    RECONCILE_ERROR = "ReconcileError"
    #: A refused job's spec changed, so it is checked again.
    SPEC_CHANGED = "SpecChanged"
    # Admitted / GangPending / Running
    PLACED = "Placed"
    UNSCHEDULABLE = "Unschedulable"
    RANKS_PENDING = "RanksPending"
    ALL_RANKS_SCHEDULED = "AllRanksScheduled"
    ALL_RANKS_RUNNING = "AllRanksRunning"
    NOT_ALL_RANKS_RUNNING = "NotAllRanksRunning"
    # Failures: retryable
    NODE_LOST = "NodeLost"
    POD_EVICTED = "PodEvicted"
    PREEMPTED = "Preempted"
    POD_DELETED = "PodDeleted"
    POD_REJECTED = "PodRejected"
    OOM_KILLED = "OOMKilled"
    RETRYABLE_EXIT = "RetryableExit"
    TRAINER_CRASHED = "TrainerCrashed"
    TRAINER_HUNG = "TrainerHung"
    # Failures: not retryable
    USER_ERROR = "UserError"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    MAX_RESTARTS_EXCEEDED = "MaxRestartsExceeded"
    # Restarting / Suspended / Succeeded
    BACKING_OFF = "BackingOff"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    COMPLETED = "Completed"


def make_condition(
    type_: ConditionType,
    status: bool | ConditionStatus,
    reason: Reason | str,
    message: str,
    *,
    now: dt.datetime,
    generation: int | None,
) -> Condition:
    """A Condition; merge it with graft.api.common.set_condition to keep transition times."""
    if isinstance(status, bool):
        status = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    return Condition(
        type=str(type_),
        status=status,
        reason=str(reason),
        message=message,
        last_transition_time=now_rfc3339(now),
        observed_generation=generation,
    )


def derive_phase(conditions: Sequence[Condition]) -> FineTuneJobPhase:
    """The phase for printer columns; terminal conditions win over transient ones."""
    for type_, phase in (
        (ConditionType.FAILED, FineTuneJobPhase.FAILED),
        (ConditionType.SUCCEEDED, FineTuneJobPhase.SUCCEEDED),
        (ConditionType.SUSPENDED, FineTuneJobPhase.SUSPENDED),
        (ConditionType.RESTARTING, FineTuneJobPhase.RESTARTING),
        (ConditionType.RUNNING, FineTuneJobPhase.RUNNING),
    ):
        if is_true(list(conditions), type_):
            return phase
    return FineTuneJobPhase.PENDING


# Time -----------------------------------------------------------------------------------


def parse_time(value: Any) -> dt.datetime | None:
    """An RFC 3339 timestamp as an aware datetime; None when absent or malformed."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


# Failure classification -----------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """Why a rank's Pod failed, and whether a new attempt can help."""

    retryable: bool
    reason: Reason
    message: str
    pod: str = ""
    rank: int | None = None
    node: str | None = None
    exit_code: int | None = None


def _get(obj: Mapping[str, Any] | None, *path: str) -> Any:
    cur: Any = obj
    for key in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def _rank(pod: Mapping[str, Any]) -> int | None:
    raw = _get(pod, "metadata", "labels", "graft.dev/rank")
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def _node_ready(node: Mapping[str, Any]) -> str:
    """The node's Ready status: True, False or Unknown (Unknown also when unreported)."""
    for c in _get(node, "status", "conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == "Ready":
            return str(c.get("status", "Unknown"))
    return "Unknown"


def _terminated(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out = []
    for cs in _get(pod, "status", "containerStatuses") or []:
        term = _get(cs, "state", "terminated")
        if isinstance(term, Mapping):
            out.append(term)
    return out


def parse_termination_message(text: Any) -> dict[str, Any] | None:
    """The trainer's ``{"reason", "retryable", "message"}``; None for logs or garbage."""
    if not isinstance(text, str) or not text.strip().startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("retryable"), bool):
        return None
    return data


_MESSAGE_MAX = 500


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MESSAGE_MAX else "..." + text[-_MESSAGE_MAX:]


#: Pod status.reason values set by the kubelet when it rejects or evicts a Pod.
_EVICTED_REASONS = {"Evicted", "Shutdown", "Terminated", "NodeShutdown"}
_PREEMPTED_REASONS = {"Preempted", "Preempting"}
_LOST_REASONS = {"NodeLost", "UnexpectedAdmissionError"}
#: DisruptionTarget condition reasons (Kubernetes 1.26+).
_DISRUPTION = {
    "PreemptionByScheduler": Reason.PREEMPTED,
    "PreemptionByKubeScheduler": Reason.PREEMPTED,
    "EvictionByEvictionAPI": Reason.POD_EVICTED,
    "TerminationByKubelet": Reason.POD_EVICTED,
    "DeletionByTaintManager": Reason.NODE_LOST,
    "DeletionByPodGC": Reason.NODE_LOST,
}


def _disruption(pod: Mapping[str, Any]) -> tuple[Reason, str] | None:
    for c in _get(pod, "status", "conditions") or []:
        if (
            isinstance(c, Mapping)
            and c.get("type") == "DisruptionTarget"
            and c.get("status") == "True"
        ):
            reason = _DISRUPTION.get(str(c.get("reason")), Reason.POD_EVICTED)
            return reason, str(c.get("message") or c.get("reason") or "disrupted")
    return None


def _from_exit(term: Mapping[str, Any]) -> tuple[bool, Reason, str, int | None]:
    code = term.get("exitCode")
    code = code if isinstance(code, int) else None
    raw = term.get("message")
    parsed = parse_termination_message(raw)
    if parsed is not None:
        # The trainer's own verdict wins: torchrun does not preserve child exit codes.
        retryable = bool(parsed["retryable"])
        what = str(parsed.get("reason") or ("RetryableError" if retryable else "UserError"))
        text = f"{what}: {parsed.get('message') or 'no message'}"
        return retryable, (Reason.RETRYABLE_EXIT if retryable else Reason.USER_ERROR), text, code
    tail = f": {_clip(raw)}" if isinstance(raw, str) and raw.strip() else ""
    if code == EXIT_USER_ERROR:
        return False, Reason.USER_ERROR, f"trainer exited with code 10 (user error){tail}", code
    if code == EXIT_RETRYABLE:
        return True, Reason.RETRYABLE_EXIT, f"trainer exited with code 20 (retryable){tail}", code
    if term.get("reason") == "OOMKilled":
        return True, Reason.OOM_KILLED, f"trainer was OOM-killed (exit code {code}){tail}", code
    return True, Reason.TRAINER_CRASHED, f"trainer exited with code {code}{tail}", code


def classify_pod_failure(
    pod: Mapping[str, Any], nodes: Mapping[str, Mapping[str, Any]]
) -> Failure | None:
    """Why this rank's Pod failed, or None while it is pending, running or succeeded.

    ``nodes`` maps node name to Node object and must hold every Node of the cluster (or at
    least of the pool): a Pod bound to a node missing from it counts as on a deleted node.
    An empty map is taken as "nodes not known yet" (a cache still syncing after an
    operator restart) and skips the node checks, rather than declaring every node lost.

    Order matters: a terminal verdict the Pod itself carries (eviction, the trainer's exit)
    beats the state of its node, so a user error is not retried just because the node
    went away afterwards; for a Pod that still looks alive, the node is checked first,
    because a dead kubelet leaves its Pods Running forever.
    """
    name = str(_get(pod, "metadata", "name") or "")
    node = _get(pod, "spec", "nodeName")
    node = node if isinstance(node, str) and node else None
    phase = _get(pod, "status", "phase")
    rank = _rank(pod)

    def fail(retryable: bool, reason: Reason, message: str, code: int | None = None) -> Failure:
        return Failure(retryable, reason, message, name, rank, node, code)

    if phase == "Succeeded":
        return None
    status_reason = str(_get(pod, "status", "reason") or "")
    status_message = str(_get(pod, "status", "message") or "").strip()
    where = f" on node {node}" if node else ""
    failed_codes = [t for t in _terminated(pod) if t.get("exitCode") not in (0, None)]

    if phase == "Failed" or failed_codes:
        if status_reason in _EVICTED_REASONS:
            return fail(True, Reason.POD_EVICTED, f"pod {name} evicted{where}: {status_message}")
        if status_reason in _PREEMPTED_REASONS:
            return fail(True, Reason.PREEMPTED, f"pod {name} preempted{where}: {status_message}")
        if status_reason == "DeadlineExceeded":
            return fail(
                False,
                Reason.DEADLINE_EXCEEDED,
                f"pod {name} ran past its activeDeadlineSeconds: {status_message}",
            )
        if status_reason in _LOST_REASONS:
            return fail(True, Reason.NODE_LOST, f"pod {name} lost{where}: {status_message}")
        disruption = _disruption(pod)
        if disruption is not None:
            return fail(True, disruption[0], f"pod {name}{where}: {disruption[1]}")
        if failed_codes:
            retryable, reason, message, code = _from_exit(failed_codes[0])
            return fail(retryable, reason, f"rank {rank}: {message}", code)
        if status_reason:
            # Rejected by the kubelet at admission (OutOfnvidia.com/gpu, NodeAffinity...):
            # another attempt may well land elsewhere.
            return fail(
                True,
                Reason.POD_REJECTED,
                f"pod {name} rejected{where}: {status_reason} {status_message}".rstrip(),
            )
        return fail(True, Reason.TRAINER_CRASHED, f"pod {name} failed{where}")

    if node is not None and nodes:
        if node not in nodes:
            return fail(True, Reason.NODE_LOST, f"node {node} of pod {name} was deleted")
        ready = _node_ready(nodes[node])
        if ready != "True":
            state = "NotReady" if ready == "False" else "Unknown"
            return fail(True, Reason.NODE_LOST, f"node {node} of pod {name} is {state}")
    if phase == "Unknown":
        return fail(True, Reason.NODE_LOST, f"pod {name} is in phase Unknown{where}")
    disruption = _disruption(pod)
    if disruption is not None:
        return fail(True, disruption[0], f"pod {name}{where}: {disruption[1]}")
    if _get(pod, "metadata", "deletionTimestamp"):
        return fail(True, Reason.POD_DELETED, f"pod {name} is being deleted{where}")
    return None


# Gang state -----------------------------------------------------------------------------


class GangPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class GangState:
    """Summary of one attempt's Pods."""

    phase: GangPhase
    expected: int
    pending: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    #: Ranks with no Pod. While nothing has started the caller (re)creates them; once any
    #: rank has run, a missing rank is a failure (the gang cannot continue without it).
    missing_ranks: tuple[int, ...] = ()
    #: Ranks Pending for longer than the timeout (GangPending condition).
    stuck_ranks: tuple[int, ...] = ()
    #: Every classified failure, the one to report first (non-retryable, then lowest rank).
    failures: tuple[Failure, ...] = ()
    #: Nodes the attempt's Pods were bound to where a failure happened: avoid_nodes next time.
    failed_nodes: tuple[str, ...] = ()
    message: str = ""

    @property
    def failure(self) -> Failure | None:
        return self.failures[0] if self.failures else None

    @property
    def gang_pending(self) -> bool:
        return bool(self.stuck_ranks)


def _pending_hint(pod: Mapping[str, Any]) -> str:
    for cs in _get(pod, "status", "containerStatuses") or []:
        reason = _get(cs, "state", "waiting", "reason")
        if reason:
            return str(reason)
    for c in _get(pod, "status", "conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == "PodScheduled" and c.get("status") != "True":
            return str(c.get("reason") or "Unschedulable")
    return "Pending"


def gang_state(
    pods: Iterable[Mapping[str, Any]],
    nodes: Mapping[str, Mapping[str, Any]],
    pending_timeout_s: float,
    now: dt.datetime,
    *,
    expected: int | None = None,
) -> GangState:
    """Pending, Running (every rank runs), Succeeded (every rank succeeded) or Failed.

    ``pods`` are the Pods of one attempt; ``expected`` is its rank count (default: as many
    as there are Pods). Call it before the operator deletes an attempt's Pods itself: Pods
    being deleted count as failed (PodDeleted). A Pod counts as stuck when it has been
    Pending (or unbound) for more than ``pending_timeout_s`` since its creationTimestamp.
    """
    pod_list = list(pods)
    n = expected if expected is not None else len(pod_list)
    by_rank: dict[int, Mapping[str, Any]] = {}
    for pod in pod_list:
        r = _rank(pod)
        if r is not None and 0 <= r < n:
            by_rank[r] = pod
    failures: list[Failure] = []
    pending = running = succeeded = 0
    stuck: list[int] = []
    stuck_hints: list[str] = []
    for r in sorted(by_rank):
        pod = by_rank[r]
        f = classify_pod_failure(pod, nodes)
        if f is not None:
            failures.append(f)
            continue
        phase = _get(pod, "status", "phase")
        if phase == "Succeeded":
            succeeded += 1
        elif phase == "Running":
            running += 1
        else:
            pending += 1
            created = parse_time(_get(pod, "metadata", "creationTimestamp"))
            if created is not None and (now - created).total_seconds() > pending_timeout_s:
                stuck.append(r)
                stuck_hints.append(f"rank {r}: {_pending_hint(pod)}")
    missing = tuple(r for r in range(n) if r not in by_rank)
    if missing and (running or succeeded):
        for r in missing:
            failures.append(
                Failure(True, Reason.POD_DELETED, f"pod of rank {r} disappeared", rank=r)
            )
    failures.sort(key=lambda f: (f.retryable, f.rank if f.rank is not None else n))
    base = GangState(
        phase=GangPhase.PENDING,
        expected=n,
        pending=pending,
        running=running,
        succeeded=succeeded,
        failed=len(failures),
        missing_ranks=missing,
        stuck_ranks=tuple(stuck),
        failures=tuple(failures),
        failed_nodes=tuple(sorted({f.node for f in failures if f.node})),
    )
    if failures:
        return replace(base, phase=GangPhase.FAILED, message=failures[0].message)
    if n > 0 and succeeded == n:
        return replace(base, phase=GangPhase.SUCCEEDED, message=f"all {n} ranks succeeded")
    if n > 0 and running + succeeded == n:
        return replace(base, phase=GangPhase.RUNNING, message=f"all {n} ranks running")
    message = f"{running + succeeded}/{n} ranks running"
    if stuck:
        message += f"; pending for more than {int(pending_timeout_s)}s: " + ", ".join(stuck_hints)
    if missing:
        message += "; no pod yet for rank " + ", ".join(str(r) for r in missing)
    return replace(base, message=message)


# Restarts and accounting -----------------------------------------------------------------


def next_backoff(restarts: int, policy: RestartPolicy) -> int:
    """Seconds to wait before restart number ``restarts + 1`` (``restarts`` done so far).

    backoffSeconds, doubling with every restart, capped at maxBackoffSeconds.
    """
    base = policy.backoff_seconds
    cap = policy.max_backoff_seconds
    if base <= 0:
        return 0
    # Past 2**32 the cap has long won; keeping the exponent small keeps the int small.
    factor = 1 << min(max(restarts, 0), 32)
    return min(base * factor, cap)


@dataclass(frozen=True)
class Recovery:
    """What to do about a failed attempt."""

    #: True: start attempt + 1 after ``backoff_seconds``; False: fail the job now.
    restart: bool
    reason: Reason
    message: str
    backoff_seconds: int = 0
    #: Nodes the next attempt should avoid (preferred node anti-affinity).
    avoid_nodes: tuple[str, ...] = ()


def recovery(failure: Failure, restarts: int, policy: RestartPolicy) -> Recovery:
    """Restart or fail after ``failure``, with ``restarts`` restarts already used.

    User errors fail at once with the trainer's message; retryable failures restart until
    maxRestarts is used up, then fail with MaxRestartsExceeded and the last failure.
    """
    avoid = (failure.node,) if failure.node else ()
    if not failure.retryable:
        return Recovery(False, failure.reason, failure.message)
    if restarts >= policy.max_restarts:
        return Recovery(
            False,
            Reason.MAX_RESTARTS_EXCEEDED,
            f"gave up after {restarts} restarts (maxRestarts {policy.max_restarts}); "
            f"last failure: {failure.reason}: {failure.message}",
        )
    wait = next_backoff(restarts, policy)
    return Recovery(
        True,
        failure.reason,
        f"restart {restarts + 1} of {policy.max_restarts} in {wait}s after "
        f"{failure.reason}: {failure.message}",
        wait,
        avoid,
    )


def _pod_window(pod: Mapping[str, Any], now: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
    start = parse_time(_get(pod, "status", "startTime"))
    if start is None:
        return None
    ends = [parse_time(t.get("finishedAt")) for t in _terminated(pod)]
    finished = [e for e in ends if e is not None]
    phase = _get(pod, "status", "phase")
    end: dt.datetime | None
    if finished:
        end = max(finished)
    elif phase in ("Succeeded", "Failed"):
        # A terminal Pod without container times (evicted before its container ran, say):
        # its last condition change is the best end there is.
        times = [
            parse_time(c.get("lastTransitionTime"))
            for c in _get(pod, "status", "conditions") or []
            if isinstance(c, Mapping)
        ]
        known = [t for t in times if t is not None]
        end = max(known) if known else start
    else:
        end = now
    return start, max(start, min(end, now))


def gpu_hours(pods: Iterable[Mapping[str, Any]], gpus_per_node: int, now: dt.datetime) -> float:
    """GPU-hours held by these Pods: from each Pod's startTime (GPUs are bound from then) to
    its container's finish, or ``now`` while it runs, times ``gpus_per_node``.

    One attempt's Pods at a time: the caller adds the total of finished attempts (kept in
    status.gpuHours) before deleting their Pods.
    """
    if gpus_per_node <= 0:
        return 0.0
    seconds = 0.0
    for pod in pods:
        window = _pod_window(pod, now)
        if window is not None:
            seconds += (window[1] - window[0]).total_seconds()
    return seconds * gpus_per_node / 3600.0


# Progress annotation ---------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _lenient(model: type[M], data: Any) -> M | None:
    """``model`` from ``data``, dropping fields that do not validate; None if nothing fits."""
    if not isinstance(data, Mapping):
        return None
    names = {f.alias or n for n, f in model.model_fields.items()} | set(model.model_fields)
    clean = {k: v for k, v in _finite(dict(data)).items() if k in names and v is not None}
    for _ in range(len(clean) + 1):
        try:
            return model.model_validate(clean)
        except ValidationError as e:
            bad = {err["loc"][0] for err in e.errors() if err["loc"]}
            if not bad & clean.keys():
                return None
            for key in bad:
                clean.pop(str(key), None)
    return None


@dataclass(frozen=True)
class ProgressUpdate:
    """What one graft.dev/progress annotation says; every piece may be missing."""

    progress: Progress | None = None
    last_checkpoint: CheckpointRef | None = None
    data: DataCounts | None = None
    output: OutputStatus | None = None
    evaluation: EvaluationStatus | None = None
    state: str | None = None
    time: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_PROGRESS_STATES = {"preparing", "training", "checkpointing", "succeeded", "failed"}


def progress_from_annotation(text: str | None) -> ProgressUpdate:
    """Parse the rank-0 ``graft.dev/progress`` annotation; never raises.

    Malformed JSON gives an empty update; a malformed piece (a negative step, a loss of
    NaN, an unknown output kind) is dropped and the rest kept. ``extra`` keeps stageIndex
    and stages when they are integers.
    """
    if not isinstance(text, str) or not text.strip():
        return ProgressUpdate()
    try:
        raw = json.loads(text, parse_constant=lambda _: None)
    except (ValueError, RecursionError):
        return ProgressUpdate()
    if not isinstance(raw, dict):
        return ProgressUpdate()
    progress = _lenient(Progress, raw)
    if progress is not None and not progress.model_fields_set:
        progress = None
    state = raw.get("state")
    time = raw.get("time")
    output = raw.get("output")
    if isinstance(output, Mapping):
        # Promotability is the operator's verdict, never the trainer's claim.
        output = {k: v for k, v in output.items() if k != "promotable"}
    extra = {
        k: raw[k]
        for k in ("stageIndex", "stages", "attempt")
        if isinstance(raw.get(k), int) and not isinstance(raw.get(k), bool)
    }
    return ProgressUpdate(
        progress=progress,
        last_checkpoint=_lenient(CheckpointRef, raw.get("lastCheckpoint")),
        data=_lenient(DataCounts, raw.get("data")),
        output=_lenient(OutputStatus, output),
        evaluation=parse_evaluation(raw.get("evaluation")),
        state=state if state in _PROGRESS_STATES else None,
        time=time if isinstance(time, str) and parse_time(time) is not None else None,
        extra=extra,
    )


def progress_summary(step: int | None, total: int | None) -> str:
    """``"120/400"`` for the printer column; ``"120"`` while the total is unknown."""
    s = max(step or 0, 0)
    if total and total > 0:
        return f"{s}/{total}"
    return str(s)


__all__ = [
    "EXIT_RETRYABLE",
    "EXIT_USER_ERROR",
    "ConditionType",
    "Failure",
    "GangPhase",
    "GangState",
    "ProgressUpdate",
    "Reason",
    "Recovery",
    "classify_pod_failure",
    "derive_phase",
    "gang_state",
    "gpu_hours",
    "make_condition",
    "next_backoff",
    "parse_termination_message",
    "parse_time",
    "progress_from_annotation",
    "progress_summary",
    "recovery",
]
