"""FineTuneJob status: phase, failure classification, gang state, backoff, accounting."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from builders_fixtures import T0, PodBuilder, node, nodes, ts

from graft.api.common import Condition
from graft.api.finetunejob import (
    CheckpointRef,
    DataCounts,
    FineTuneJobPhase,
    OutputStatus,
    Progress,
    RestartPolicy,
)
from graft.status import (
    ConditionType,
    Failure,
    GangPhase,
    ProgressUpdate,
    Reason,
    classify_pod_failure,
    derive_phase,
    gang_state,
    gpu_hours,
    make_condition,
    next_backoff,
    progress_from_annotation,
    progress_summary,
    recovery,
)

HEALTHY = nodes(node("gpu-1"), node("gpu-2"))


def cond(type_: ConditionType, status: bool, reason: Reason = Reason.VALID) -> Condition:
    return make_condition(type_, status, reason, "", now=T0, generation=1)


@pytest.mark.parametrize(
    ("conditions", "phase"),
    [
        ([], FineTuneJobPhase.PENDING),
        ([cond(ConditionType.ACCEPTED, True)], FineTuneJobPhase.PENDING),
        (
            [cond(ConditionType.ACCEPTED, True), cond(ConditionType.RUNNING, True)],
            FineTuneJobPhase.RUNNING,
        ),
        (
            [cond(ConditionType.RUNNING, False), cond(ConditionType.RESTARTING, True)],
            FineTuneJobPhase.RESTARTING,
        ),
        (
            [cond(ConditionType.RUNNING, False), cond(ConditionType.SUSPENDED, True)],
            FineTuneJobPhase.SUSPENDED,
        ),
        (
            [cond(ConditionType.RUNNING, True), cond(ConditionType.SUCCEEDED, True)],
            FineTuneJobPhase.SUCCEEDED,
        ),
        (
            [cond(ConditionType.RESTARTING, True), cond(ConditionType.FAILED, True)],
            FineTuneJobPhase.FAILED,
        ),
        ([cond(ConditionType.ACCEPTED, False, Reason.INVALID_SPEC)], FineTuneJobPhase.PENDING),
    ],
)
def test_derive_phase(conditions: list[Condition], phase: FineTuneJobPhase) -> None:
    assert derive_phase(conditions) == phase


def test_make_condition() -> None:
    c = make_condition(
        ConditionType.ADMITTED, False, Reason.UNSCHEDULABLE, "no pool", now=T0, generation=3
    )
    assert c.wire() == {
        "type": "Admitted",
        "status": "False",
        "reason": "Unschedulable",
        "message": "no pool",
        "lastTransitionTime": "2026-11-25T21:00:00Z",
        "observedGeneration": 3,
    }


USER_MSG = {"reason": "DatasetEmpty", "retryable": False, "message": "dataset has no rows"}
OOM_MSG = {"reason": "OutOfMemory", "retryable": False, "message": "OOM before step 1"}


@pytest.mark.parametrize(
    ("pod", "node_map", "expected"),
    [
        # alive and well
        (PodBuilder().obj(), HEALTHY, None),
        (PodBuilder().on("gpu-1").running().obj(), HEALTHY, None),
        (PodBuilder().on("gpu-1").exited(0).obj(), HEALTHY, None),
        # node trouble
        (
            PodBuilder().on("gpu-1").running().obj(),
            nodes(node("gpu-1", "False")),
            (True, Reason.NODE_LOST, "node gpu-1 of pod llama-sft-a1-r0 is NotReady"),
        ),
        (
            PodBuilder().on("gpu-1").running().obj(),
            nodes(node("gpu-1", "Unknown")),
            (True, Reason.NODE_LOST, "is Unknown"),
        ),
        (
            PodBuilder().on("gpu-1").running().obj(),
            nodes(node("gpu-2")),
            (True, Reason.NODE_LOST, "node gpu-1 of pod llama-sft-a1-r0 was deleted"),
        ),
        (
            PodBuilder().on("gpu-1").running().with_status(phase="Unknown").obj(),
            HEALTHY,
            (True, Reason.NODE_LOST, "phase Unknown"),
        ),
        # the cluster took the pod away
        (
            PodBuilder().on("gpu-1").running().evicted().obj(),
            HEALTHY,
            (True, Reason.POD_EVICTED, "low on resource: memory"),
        ),
        (
            PodBuilder().on("gpu-1").running().preempted().obj(),
            HEALTHY,
            (True, Reason.PREEMPTED, "Preempted in order to admit critical pod"),
        ),
        (
            PodBuilder().on("gpu-1").with_status(phase="Failed", reason="Preempting").obj(),
            HEALTHY,
            (True, Reason.PREEMPTED, "preempted on node gpu-1"),
        ),
        (
            PodBuilder().on("gpu-1").running().deleting().obj(),
            HEALTHY,
            (True, Reason.POD_DELETED, "being deleted"),
        ),
        (
            PodBuilder().on("gpu-1").with_status(phase="Failed", reason="DeadlineExceeded").obj(),
            HEALTHY,
            (False, Reason.DEADLINE_EXCEEDED, "activeDeadlineSeconds"),
        ),
        (
            PodBuilder()
            .on("gpu-1")
            .with_status(phase="Failed", reason="OutOfnvidia.com/gpu")
            .obj(),
            HEALTHY,
            (True, Reason.POD_REJECTED, "OutOfnvidia.com/gpu"),
        ),
        # the trainer's verdict
        (
            PodBuilder().on("gpu-1").exited(10, message=USER_MSG).obj(),
            HEALTHY,
            (False, Reason.USER_ERROR, "rank 0: DatasetEmpty: dataset has no rows"),
        ),
        (
            PodBuilder().on("gpu-1").exited(10).obj(),
            HEALTHY,
            (False, Reason.USER_ERROR, "code 10 (user error)"),
        ),
        (
            PodBuilder().on("gpu-1").exited(10, message="Traceback...\nValueError: bad").obj(),
            HEALTHY,
            (False, Reason.USER_ERROR, "ValueError: bad"),
        ),
        (
            PodBuilder().on("gpu-1").exited(20).obj(),
            HEALTHY,
            (True, Reason.RETRYABLE_EXIT, "code 20 (retryable)"),
        ),
        (
            PodBuilder().on("gpu-1").exited(1).obj(),
            HEALTHY,
            (True, Reason.TRAINER_CRASHED, "exited with code 1"),
        ),
        # torchrun loses the child's exit code; the termination message decides
        (
            PodBuilder().on("gpu-1").exited(1, message=USER_MSG).obj(),
            HEALTHY,
            (False, Reason.USER_ERROR, "dataset has no rows"),
        ),
        (
            PodBuilder().on("gpu-1").exited(10, message={"retryable": True, "message": "s3"}).obj(),
            HEALTHY,
            (True, Reason.RETRYABLE_EXIT, "s3"),
        ),
        # OOM-killed: user error only when the trainer said so, else retryable
        (
            PodBuilder().on("gpu-1").exited(137, reason="OOMKilled", message=OOM_MSG).obj(),
            HEALTHY,
            (False, Reason.USER_ERROR, "OutOfMemory: OOM before step 1"),
        ),
        (
            PodBuilder().on("gpu-1").exited(137, reason="OOMKilled").obj(),
            HEALTHY,
            (True, Reason.OOM_KILLED, "OOM-killed (exit code 137)"),
        ),
        # a user error stays a user error when the node goes away afterwards
        (
            PodBuilder().on("gpu-1").exited(10, message=USER_MSG).obj(),
            {},
            (False, Reason.USER_ERROR, "dataset has no rows"),
        ),
        # the container died but the pod phase has not caught up yet
        (
            PodBuilder().on("gpu-1").exited(20).with_status(phase="Running").obj(),
            HEALTHY,
            (True, Reason.RETRYABLE_EXIT, "code 20"),
        ),
    ],
)
def test_classify_pod_failure(
    pod: dict[str, Any],
    node_map: dict[str, dict[str, Any]],
    expected: tuple[bool, Reason, str] | None,
) -> None:
    got = classify_pod_failure(pod, node_map)
    if expected is None:
        assert got is None
        return
    assert got is not None
    retryable, reason, fragment = expected
    assert (got.retryable, got.reason) == (retryable, reason), got.message
    assert fragment in got.message
    assert got.pod == "llama-sft-a1-r0" and got.rank == 0 and got.node == "gpu-1"


def test_unknown_nodes_are_not_lost_nodes() -> None:
    # right after an operator restart the node cache may still be empty
    assert classify_pod_failure(PodBuilder().on("gpu-1").running().obj(), {}) is None


def test_classify_tolerates_garbage() -> None:
    assert classify_pod_failure({}, {}) is None
    weird = {"status": {"phase": "Failed", "containerStatuses": [{"state": "oops"}]}}
    got = classify_pod_failure(weird, {})
    assert got is not None and got.retryable


def exited_failure() -> Failure:
    pod = PodBuilder(rank=1).on("gpu-2").exited(10, message=USER_MSG).obj()
    f = classify_pod_failure(pod, HEALTHY)
    assert f is not None
    return f


NOW = T0 + dt.timedelta(seconds=600)


@pytest.mark.parametrize(
    ("pods", "node_map", "expected", "phase", "fragment"),
    [
        ([], HEALTHY, 2, GangPhase.PENDING, "0/2 ranks running; no pod yet for rank 0, 1"),
        (
            [PodBuilder(rank=0).on("gpu-1").running().obj(), PodBuilder(rank=1).obj()],
            HEALTHY,
            2,
            GangPhase.PENDING,
            "1/2 ranks running; pending for more than 300s: rank 1: Pending",
        ),
        (
            [
                PodBuilder(rank=0).on("gpu-1").running().obj(),
                PodBuilder(rank=1).created(500).unschedulable().obj(),
            ],
            HEALTHY,
            2,
            GangPhase.PENDING,
            "1/2 ranks running",
        ),
        (
            [
                PodBuilder(rank=0).on("gpu-1").running().obj(),
                PodBuilder(rank=1).on("gpu-2").running().obj(),
            ],
            HEALTHY,
            2,
            GangPhase.RUNNING,
            "all 2 ranks running",
        ),
        (
            [
                PodBuilder(rank=0).on("gpu-1").exited(0).obj(),
                PodBuilder(rank=1).on("gpu-2").running().obj(),
            ],
            HEALTHY,
            2,
            GangPhase.RUNNING,
            "all 2 ranks running",
        ),
        (
            [
                PodBuilder(rank=0).on("gpu-1").exited(0).obj(),
                PodBuilder(rank=1).on("gpu-2").exited(0).obj(),
            ],
            HEALTHY,
            2,
            GangPhase.SUCCEEDED,
            "all 2 ranks succeeded",
        ),
        (
            [
                PodBuilder(rank=0).on("gpu-1").running().obj(),
                PodBuilder(rank=1).on("gpu-2").running().obj(),
            ],
            nodes(node("gpu-1")),
            2,
            GangPhase.FAILED,
            "node gpu-2 of pod llama-sft-a1-r1 was deleted",
        ),
        # a rank vanished after the gang started: the attempt cannot go on
        (
            [PodBuilder(rank=0).on("gpu-1").running().obj()],
            HEALTHY,
            2,
            GangPhase.FAILED,
            "pod of rank 1 disappeared",
        ),
    ],
)
def test_gang_state(
    pods: list[dict[str, Any]],
    node_map: dict[str, dict[str, Any]],
    expected: int,
    phase: GangPhase,
    fragment: str,
) -> None:
    state = gang_state(pods, node_map, 300, NOW, expected=expected)
    assert state.phase == phase
    assert fragment in state.message, state.message


def test_gang_state_counts_and_stuck_ranks() -> None:
    pods = [
        PodBuilder(rank=0).on("gpu-1").running().obj(),
        PodBuilder(rank=1).unschedulable().obj(),
        PodBuilder(rank=2).created(500).obj(),
    ]
    state = gang_state(pods, HEALTHY, 300, NOW)
    assert (state.expected, state.running, state.pending) == (3, 1, 2)
    assert state.stuck_ranks == (1,) and state.gang_pending
    assert "rank 1: Unschedulable" in state.message
    assert state.failure is None


def test_gang_state_reports_user_error_before_retryable() -> None:
    pods = [
        PodBuilder(rank=0).on("gpu-1").exited(20).obj(),
        PodBuilder(rank=1).on("gpu-2").exited(10, message=USER_MSG).obj(),
    ]
    state = gang_state(pods, HEALTHY, 300, NOW)
    assert state.phase == GangPhase.FAILED and state.failed == 2
    assert state.failure == exited_failure()
    assert state.failed_nodes == ("gpu-1", "gpu-2")


@pytest.mark.parametrize(
    ("restarts", "seconds"),
    [(0, 10), (1, 20), (2, 40), (4, 160), (5, 300), (50, 300), (10_000, 300)],
)
def test_next_backoff(restarts: int, seconds: int) -> None:
    policy = RestartPolicy(backoff_seconds=10, max_backoff_seconds=300)
    assert next_backoff(restarts, policy) == seconds


def test_next_backoff_zero() -> None:
    assert next_backoff(3, RestartPolicy(backoff_seconds=0)) == 0


@pytest.mark.parametrize(
    ("pods", "gpus", "hours"),
    [
        ([], 8, 0.0),
        ([PodBuilder().obj()], 8, 0.0),  # never started
        ([PodBuilder().running(since=0).obj()], 8, 8 * 600 / 3600),  # until now
        ([PodBuilder().exited(0, started=0, finished=450).obj()], 8, 1.0),
        # a finish after now (clock skew) is cut at now
        ([PodBuilder().exited(0, started=0, finished=1200).obj()], 6, 1.0),
        (
            [
                PodBuilder(rank=0).exited(20, started=0, finished=600).obj(),
                PodBuilder(rank=1).exited(20, started=300, finished=600).obj(),
            ],
            2,
            0.5,
        ),
        # evicted before the container ran: the last condition change ends it
        (
            [
                PodBuilder()
                .evicted()
                .with_status(
                    startTime=ts(0),
                    conditions=[
                        {"type": "Ready", "status": "False", "lastTransitionTime": ts(360)}
                    ],
                )
                .obj()
            ],
            1,
            0.1,
        ),
        ([PodBuilder().running().obj()], 0, 0.0),  # CPU
    ],
)
def test_gpu_hours(pods: list[dict[str, Any]], gpus: int, hours: float) -> None:
    assert gpu_hours(pods, gpus, NOW) == pytest.approx(hours)


ANNOTATION = {
    "stage": "sft",
    "stageIndex": 1,
    "stages": 2,
    "step": 120,
    "totalSteps": 400,
    "epoch": 0.3,
    "loss": 1.93,
    "tokensPerSecond": 5230.0,
    "eta": "12m30s",
    "lastCheckpoint": {
        "step": 100,
        "uri": "pvc://ckpt/job/ckpt-s01-00000100",
        "time": "2026-11-25T21:00:00Z",
    },
    "data": {"documentsIn": 1000, "documentsOut": 900, "duplicatesRemoved": 80, "filtered": 20},
    "output": {"uri": "pvc://out/job", "kind": "adapter"},
    "state": "training",
    "time": "2026-11-25T21:00:05Z",
}


def test_progress_from_contract_example() -> None:
    assert progress_from_annotation(json.dumps(ANNOTATION)) == ProgressUpdate(
        progress=Progress(
            stage="sft",
            step=120,
            total_steps=400,
            epoch=0.3,
            loss=1.93,
            tokens_per_second=5230.0,
            eta="12m30s",
        ),
        last_checkpoint=CheckpointRef(
            step=100, uri="pvc://ckpt/job/ckpt-s01-00000100", time="2026-11-25T21:00:00Z"
        ),
        data=DataCounts(documents_in=1000, documents_out=900, duplicates_removed=80, filtered=20),
        output=OutputStatus(uri="pvc://out/job", kind="adapter"),
        state="training",
        time="2026-11-25T21:00:05Z",
        extra={"stageIndex": 1, "stages": 2},
    )


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "   ",
        "{",
        "not json",
        "[1, 2]",
        "42",
        '"str"',
        "null",
        "{}",
        '{"a": {"b": 1}}',
        "[" * 100_000,
    ],
)
def test_progress_garbage_is_ignored(text: str | None) -> None:
    assert progress_from_annotation(text) == ProgressUpdate()


def test_progress_bad_pieces_are_dropped_good_ones_kept() -> None:
    raw = (
        '{"step": -5, "totalSteps": 400, "loss": NaN, "tokensPerSecond": "fast",'
        ' "lastCheckpoint": {"uri": "x"}, "data": {"documentsIn": 10, "documentsOut": -1},'
        ' "output": {"uri": "pvc://o", "kind": "weights"}, "state": "dancing", "time": "soon",'
        ' "stages": true}'
    )
    got = progress_from_annotation(raw)
    assert got == ProgressUpdate(
        progress=Progress(total_steps=400),
        last_checkpoint=None,  # step is required
        data=DataCounts(documents_in=10),
        output=None,  # kind is required and unknown
        state=None,
        time=None,
    )


@pytest.mark.parametrize(
    ("step", "total", "text"),
    [(120, 400, "120/400"), (0, 0, "0"), (5, None, "5"), (None, None, "0"), (400, 400, "400/400")],
)
def test_progress_summary(step: int | None, total: int | None, text: str) -> None:
    assert progress_summary(step, total) == text


NODE_LOSS = Failure(True, Reason.NODE_LOST, "node gpu-1 is NotReady", "p", 0, "gpu-1")
USER = Failure(False, Reason.USER_ERROR, "rank 0: DatasetEmpty: no rows", "p", 0, "gpu-1", 10)
POLICY = RestartPolicy(max_restarts=3, backoff_seconds=10, max_backoff_seconds=300)


@pytest.mark.parametrize(
    ("failure", "restarts", "restart", "reason", "backoff", "fragment"),
    [
        (NODE_LOSS, 0, True, Reason.NODE_LOST, 10, "restart 1 of 3 in 10s after NodeLost"),
        (NODE_LOSS, 2, True, Reason.NODE_LOST, 40, "restart 3 of 3 in 40s"),
        (
            NODE_LOSS,
            3,
            False,
            Reason.MAX_RESTARTS_EXCEEDED,
            0,
            "gave up after 3 restarts (maxRestarts 3); last failure: NodeLost",
        ),
        (USER, 0, False, Reason.USER_ERROR, 0, "rank 0: DatasetEmpty: no rows"),
    ],
)
def test_recovery(
    failure: Failure, restarts: int, restart: bool, reason: Reason, backoff: int, fragment: str
) -> None:
    got = recovery(failure, restarts, POLICY)
    assert (got.restart, got.reason, got.backoff_seconds) == (restart, reason, backoff)
    assert fragment in got.message
    assert got.avoid_nodes == (("gpu-1",) if restart else ())
