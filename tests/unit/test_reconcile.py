"""The reconcilers' pure cores: world in, plan out, no cluster."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from graft.config import load_settings
from graft.kube import omit_empty_strings
from graft.reconcile import finetunejob as ftj
from graft.reconcile import modelservice as ms
from graft.reconcile.common import status_patch
from graft.testing.cluster import TEST_NODE_POOLS

NOW = dt.datetime(2026, 11, 25, 21, 0, 0, tzinfo=dt.UTC)
SETTINGS = load_settings({"GRAFT_NODE_POOLS": json.dumps(TEST_NODE_POOLS)})


def job(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "baseModel": {"uri": "pvc://models/llama"},
        "stages": [{"type": "SFT", "dataset": {"uri": "pvc://data/x.jsonl", "format": "alpaca"}}],
        "output": {"uri": "pvc://models/out"},
        "resources": {"nodes": 2, "gpusPerNode": 8},
        "restartPolicy": {"maxRestarts": 2, "backoffSeconds": 10},
    }
    s.update(spec)
    return {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "ns", "generation": 1, "uid": "u"},
        "spec": s,
        "status": status or {},
    }


def node(name: str, ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "Unknown",
                    "lastTransitionTime": "2026-11-25T20:59:58Z",
                }
            ]
        },
    }


def pod(
    attempt: int, rank: int, node_name: str, phase: str = "Running", **status: Any
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"j-a{attempt}-r{rank}",
            "creationTimestamp": "2026-11-25T20:00:00Z",
            "labels": {
                "graft.dev/job": "j",
                "graft.dev/attempt": str(attempt),
                "graft.dev/rank": str(rank),
            },
        },
        "spec": {"nodeName": node_name},
        "status": {"phase": phase, "startTime": "2026-11-25T20:00:00Z", **status},
    }


NODES2 = {"n0": node("n0"), "n1": node("n1")}


def run(
    body: dict[str, Any],
    pods: list[dict[str, Any]],
    nodes: dict[str, Any],
    now: dt.datetime = NOW,
    lease: dict[str, Any] | None = None,
) -> ftj.Plan:
    world = ftj.World(job=body, pods=pods, nodes=nodes, now=now, lease=lease)
    return ftj.decide(world, SETTINGS)


def lease(report: dict[str, Any] | None = None, renewed: str | None = None) -> dict[str, Any]:
    """The job's progress Lease as rank 0 leaves it."""
    notes = {"graft.dev/progress": json.dumps(report)} if report is not None else {}
    return {"metadata": {"annotations": notes}, "spec": {"renewTime": renewed}}


def cond(plan: ftj.Plan | ms.Plan, type_: str) -> Any:
    return next(c for c in plan.status.conditions if c.type == type_)


def started() -> dict[str, Any]:
    """Status of a job whose first attempt was created."""
    plan = run(job(), [], {})
    return plan.status.wire()


def test_first_pass_places_and_creates_the_gang() -> None:
    plan = run(job(), [], {})
    assert plan.status.placement is not None and plan.status.placement.node_pool == "a100-80g"
    assert plan.status.attempt == 1
    assert [p["metadata"]["name"] for p in plan.create_pods] == ["j-a1-r0", "j-a1-r1"]
    assert [o["kind"] for o in plan.apply] == [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Lease",
        "NetworkPolicy",
        "ConfigMap",
        "Service",
    ]
    assert plan.status.phase is not None and plan.status.phase.value == "Pending"


def test_second_pass_with_running_gang_is_running_and_creates_nothing() -> None:
    nodes = {"n0": node("n0"), "n1": node("n1")}
    plan = run(job(started()), [pod(1, 0, "n0"), pod(1, 1, "n1")], nodes)
    assert plan.create_pods == [] and plan.delete_pods == []
    assert cond(plan, "Running").status == "True"
    assert plan.status.gpu_hours == pytest.approx(2 * 8 * 1.0)  # both ranks for an hour


def test_node_lost_restarts_after_backoff_avoiding_the_node() -> None:
    nodes = {"n0": node("n0"), "n1": node("n1", ready=False)}
    plan = run(job(started()), [pod(1, 0, "n0"), pod(1, 1, "n1")], nodes)
    assert plan.status.restarts == 1 and plan.status.attempt == 1
    assert plan.status.restart_at == "2026-11-25T21:00:10Z"
    assert plan.status.avoid_nodes == ["n1"]
    assert sorted(plan.delete_pods) == [("j-a1-r0", None), ("j-a1-r1", 0)]
    assert cond(plan, "Restarting").reason == "NodeLost"
    assert plan.status.phase is not None and plan.status.phase.value == "Restarting"
    # after the backoff, once the old pods are gone: attempt 2, told to avoid n1
    later = run(job(plan.status.wire()), [], nodes, NOW + dt.timedelta(seconds=11))
    assert later.status.attempt == 2
    affinity = json.dumps(later.create_pods[0]["spec"].get("affinity", {}))
    assert "n1" in affinity


def test_new_attempt_waits_for_old_pods() -> None:
    nodes = {"n0": node("n0"), "n1": node("n1", ready=False)}
    plan = run(job(started()), [pod(1, 0, "n0"), pod(1, 1, "n1")], nodes)
    waiting = run(job(plan.status.wire()), [pod(1, 0, "n0")], nodes, NOW + dt.timedelta(seconds=11))
    assert waiting.status.attempt == 1 and waiting.create_pods == []
    assert waiting.requeue_after == 1.0


def test_user_error_fails_without_restart() -> None:
    term = {
        "exitCode": 10,
        "message": json.dumps(
            {"reason": "MalformedDataset", "retryable": False, "message": "line 7: bad JSON"}
        ),
    }
    failed = pod(
        1, 0, "n0", "Failed", containerStatuses=[{"name": "trainer", "state": {"terminated": term}}]
    )
    plan = run(job(started()), [failed, pod(1, 1, "n1")], {"n0": node("n0"), "n1": node("n1")})
    c = cond(plan, "Failed")
    assert c.status == "True" and "line 7" in c.message
    assert plan.status.restarts == 0 and plan.create_pods == []
    assert ("j-a1-r1", None) in plan.delete_pods


def test_max_restarts_exceeded() -> None:
    st = started()
    st["restarts"] = 2
    plan = run(
        job(st),
        [pod(1, 0, "n0", "Failed", reason="Evicted"), pod(1, 1, "n1")],
        {"n0": node("n0"), "n1": node("n1")},
    )
    assert cond(plan, "Failed").reason == "MaxRestartsExceeded"


def test_spec_change_is_refused_and_recorded_spec_used() -> None:
    st = started()
    changed = job(st, hyperparameters={"learningRate": 0.1})
    first = run(changed, [], {})
    assert first.needs_recorded_spec
    world = ftj.World(job=changed, pods=[], nodes={}, now=NOW, recorded_spec=job()["spec"])
    plan = ftj.decide(world, SETTINGS)
    assert cond(plan, "Accepted").reason == "SpecChangeRefused"


def test_unschedulable() -> None:
    plan = run(job(resources={"gpus": 64}), [], {})
    c = cond(plan, "Admitted")
    assert c.status == "False" and c.reason == "Unschedulable"
    assert plan.create_pods == []


def test_progress_on_the_lease_rolls_up() -> None:
    report = {
        "attempt": 1,
        "step": 5,
        "totalSteps": 10,
        "loss": 2.5,
        "lastCheckpoint": {"step": 4, "uri": "pvc://models/out/checkpoints/ckpt-s00-00000004"},
    }
    plan = run(job(started()), [pod(1, 0, "n0"), pod(1, 1, "n1")], NODES2, lease=lease(report))
    assert plan.status.progress_summary == "5/10"
    assert plan.status.last_checkpoint is not None and plan.status.last_checkpoint.step == 4
    # an older attempt's report is not this attempt's progress
    stale = run(
        job(started()),
        [pod(1, 0, "n0"), pod(1, 1, "n1")],
        NODES2,
        lease=lease(report | {"attempt": 0}),
    )
    assert stale.status.progress_summary is None


def test_a_pod_annotation_is_not_a_report() -> None:
    """Trainers may no longer write Pods; an annotation on one is ignored."""
    p0 = pod(1, 0, "n0")
    p0["metadata"]["annotations"] = {"graft.dev/progress": json.dumps({"step": 5})}
    plan = run(job(started()), [p0, pod(1, 1, "n1")], NODES2)
    assert plan.status.progress is None


@pytest.mark.parametrize(
    ("piece", "value"),
    [
        ("lastCheckpoint", {"step": 4, "uri": "pvc://other-team/ckpt"}),
        ("lastCheckpoint", {"step": 4, "uri": "pvc://models/out/checkpoints/../../../etc"}),
        ("lastCheckpoint", {"step": 4, "uri": "pvc://models/out/checkpointsX/c"}),
        ("output", {"uri": "gopher://x", "kind": "adapter"}),
        ("output", {"uri": "pvc://models/elsewhere", "kind": "adapter"}),
    ],
)
def test_uris_outside_the_jobs_storage_are_ignored_with_a_warning(
    piece: str, value: dict[str, Any]
) -> None:
    report = {"attempt": 1, "step": 5, "totalSteps": 10, piece: value}
    plan = run(job(started()), [pod(1, 0, "n0"), pod(1, 1, "n1")], NODES2, lease=lease(report))
    assert plan.status.progress_summary == "5/10"
    assert plan.status.last_checkpoint is None
    assert plan.status.output is None or plan.status.output.uri == "pvc://models/out"
    warnings = [e for e in plan.events if e[0] == "Warning" and e[1] == "UntrustedReport"]
    assert len(warnings) == 1 and value["uri"][:30] in warnings[0][2]


def running_since(t: str) -> dict[str, Any]:
    st = started()
    st["conditions"] = [c for c in st.get("conditions", []) if c["type"] != "Running"] + [
        {
            "type": "Running",
            "status": "True",
            "reason": "AllRanksRunning",
            "message": "2/2 ranks running",
            "lastTransitionTime": t,
        }
    ]
    return st


def test_a_silent_running_gang_is_hung_and_restarted() -> None:
    pods = [pod(1, 0, "n0"), pod(1, 1, "n1")]
    body = job(running_since("2026-11-25T20:00:00Z"))
    fresh = (NOW - dt.timedelta(seconds=SETTINGS.heartbeat_timeout_seconds - 30)).isoformat()
    ok = run(body, pods, NODES2, lease=lease(renewed=fresh))
    assert cond(ok, "Running").status == "True" and not ok.delete_pods
    assert ok.requeue_after is not None and 30 <= ok.requeue_after <= 32
    old = (NOW - dt.timedelta(seconds=SETTINGS.heartbeat_timeout_seconds + 5)).isoformat()
    hung = run(body, pods, NODES2, lease=lease(renewed=old))
    c = cond(hung, "Restarting")
    assert (c.status, c.reason) == ("True", "TrainerHung")
    assert "no heartbeat from rank 0" in c.message
    assert sorted(n for n, _ in hung.delete_pods) == ["j-a1-r0", "j-a1-r1"]
    assert hung.status.last_failure is not None
    assert hung.status.last_failure.reason == "TrainerHung"
    # No heartbeat at all: the clock starts when the gang was seen running.
    never = run(body, pods, NODES2)
    assert cond(never, "Restarting").reason == "TrainerHung"
    # A per-job timeout wins over the operator's.
    patient = job(running_since("2026-11-25T20:00:00Z"))
    patient["spec"]["restartPolicy"] = {"heartbeatTimeoutSeconds": 86400}
    assert not run(patient, pods, NODES2, lease=lease(renewed=old)).delete_pods


def test_status_patch_deletes_cleared_fields() -> None:
    old = {"restartAt": "t", "graft": {"x": 1}, "attempt": 1}
    new = ftj.FineTuneJobStatus(attempt=1)
    patch = status_patch(old, new)
    assert patch["restartAt"] is None and "graft" not in patch and "attempt" not in patch


def test_pods_of_an_attempt_whose_status_write_was_lost_are_kept() -> None:
    """The operator was killed after creating attempt 1's Pods and before writing status:
    the next pass records attempt 1 again and keeps those Pods (creates get 409)."""
    first = run(job(), [], NODES2)
    pods = [{**p, "status": {"phase": "Pending"}} for p in first.create_pods]
    again = run(job(), pods, NODES2)
    assert again.status.attempt == 1 and not again.delete_pods
    assert [p["metadata"]["name"] for p in again.create_pods] == [
        p["metadata"]["name"] for p in pods
    ]


def test_status_patch_of_a_written_status_is_empty() -> None:
    """What the apiserver keeps of a pass's status write (no empty messages inside
    conditions) compares equal to the same status: the next pass writes nothing."""
    first = run(job(), [], NODES2)
    assert any(c.message == "" for c in first.status.conditions)
    stored = omit_empty_strings(first.status.wire())
    assert all("message" in c for c in first.status.wire()["conditions"])
    assert status_patch(stored, first.status) == {}
    pods = [{**p, "status": {"phase": "Pending"}} for p in first.create_pods]
    again = run(job(stored), pods, NODES2)
    assert not again.create_pods and status_patch(stored, again.status) == {}


# ModelService ---------------------------------------------------------------------------


def svc(adapters: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "model": {"baseModel": {"uri": "pvc://models/llama"}, "adapters": adapters}
    }
    s.update(spec)
    return {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {"name": "s", "namespace": "ns", "generation": 1, "uid": "u"},
        "spec": s,
    }


def finished(
    uri: str, phase: str = "Succeeded", kind: str = "adapter", *, spec_uri: str | None = None
) -> dict[str, Any]:
    return {
        "spec": {"output": {"uri": spec_uri or uri}},
        "status": {"phase": phase, "output": {"uri": uri, "kind": kind}},
    }


def test_service_waits_then_adds_adapter_without_touching_the_cluster() -> None:
    body = svc([{"name": "a", "fromFineTuneJob": "j"}])
    first = ms.decide(body, {"j": {"status": {"phase": "Running"}}}, None, SETTINGS, NOW)
    assert cond(first, "AdaptersReady").reason == "WaitingForFineTuneJob"
    assert first.rayservice is not None
    live = first.rayservice
    second = ms.decide(body, {"j": finished("pvc://models/a")}, live, SETTINGS, NOW)
    assert second.rayservice is not None
    assert second.rayservice["spec"]["rayClusterConfig"] == live["spec"]["rayClusterConfig"]
    assert "pvc://models/a" in second.rayservice["spec"]["serveConfigV2"]
    assert any(e[1] == "ServeConfigUpdated" for e in second.events)
    # nothing to write when the live object already matches
    third = ms.decide(body, {"j": finished("pvc://models/a")}, second.rayservice, SETTINGS, NOW)
    assert third.rayservice is None


@pytest.mark.parametrize(
    ("job_obj", "words"),
    [
        (None, "not found"),
        (finished("x", "Failed"), "failed"),
        (finished("pvc://m/full", kind="model"), "full model"),
    ],
)
def test_service_adapter_errors(job_obj: dict[str, Any] | None, words: str) -> None:
    plan = ms.decide(
        svc([{"name": "a", "fromFineTuneJob": "j"}]), {"j": job_obj}, None, SETTINGS, NOW
    )
    c = cond(plan, "AdaptersReady")
    assert c.reason == "AdapterUnavailable" and words in c.message


def test_service_unschedulable_and_invalid() -> None:
    plan = ms.decide(svc([], resources={"gpusPerReplica": 16}), {}, None, SETTINGS, NOW)
    assert cond(plan, "Ready").reason == "Unschedulable" and plan.rayservice is None
    bad = svc([], autoscaling={"minReplicas": 3, "maxReplicas": 1})
    plan = ms.decide(bad, {}, None, SETTINGS, NOW)
    assert cond(plan, "Accepted").reason == "InvalidSpec"
    assert "minReplicas" in cond(plan, "Accepted").message


def test_a_burst_of_triggers_costs_two_passes() -> None:
    import asyncio

    from graft.reconcile.common import Coalescer

    passes = 0

    async def once() -> None:
        nonlocal passes
        passes += 1
        await asyncio.sleep(0.01)

    async def burst() -> None:
        c = Coalescer()
        await asyncio.gather(*(c.run(("ns", "j"), once) for _ in range(20)))

    asyncio.run(burst())
    assert passes == 2


def test_passes_of_many_jobs_run_at_most_max_concurrent_passes_at_once() -> None:
    import asyncio

    settings = load_settings({"GRAFT_MAX_CONCURRENT_PASSES": "3"})
    rec = ftj.FineTuneJobReconciler(kube=None, settings=settings)  # type: ignore[arg-type]
    running, peak, done = 0, 0, []

    async def fake_pass(namespace: str, name: str, body: Any = None) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        done.append(name)

    rec._pass = fake_pass  # type: ignore[method-assign]

    async def burst() -> None:
        for i in range(10):
            rec.submit("ns", f"j{i}")
        while len(done) < 10:
            await asyncio.sleep(0.01)
        await rec.close()

    asyncio.run(burst())
    assert peak == 3
    assert sorted(done) == sorted(f"j{i}" for i in range(10))


def test_submitted_passes_run_once_per_job_with_its_latest_body_trimmed() -> None:
    import asyncio

    rec = ftj.FineTuneJobReconciler(kube=None, settings=SETTINGS)  # type: ignore[arg-type]
    seen: list[tuple[str, Any]] = []

    async def fake_pass(namespace: str, name: str, body: Any = None) -> None:
        seen.append((name, body))

    rec._pass = fake_pass  # type: ignore[method-assign]
    last_applied = {ftj.LAST_APPLIED: "{...}", "team": "a"}

    async def burst() -> None:
        for generation in (1, 2, 3):
            body = job()
            body["metadata"].update(
                generation=generation, managedFields=[{"manager": "x"}], annotations=last_applied
            )
            rec.submit("ns", "a", body)
        rec.submit("ns", "b")
        for _ in range(20):
            await asyncio.sleep(0)
        await rec.close()

    asyncio.run(burst())
    assert [name for name, _ in seen] == ["a", "b"]
    a = seen[0][1]
    assert a["metadata"]["generation"] == 3
    assert "managedFields" not in a["metadata"]
    assert a["metadata"]["annotations"] == {"team": "a"}
    assert seen[1][1] is None  # no body: the pass reads the job


# Visible refusals: every accepted spec runs or says why, before any pod -----------------


@pytest.mark.parametrize(
    ("field", "value", "reason", "words"),
    [
        (
            "baseModel",
            {"uri": "hf://meta-llama/Llama-3-8B"},
            "StorageNotAllowed",
            "GRAFT_ALLOW_HUB",
        ),
        ("output", {"uri": "file:///tmp/out"}, "StorageNotAllowed", "spec.output.uri"),
        ("baseModel", {"uri": "pvc://../etc"}, "InvalidSpec", "spec.baseModel.uri"),
        ("baseModel", {"uri": "pvc://models/../../../etc"}, "InvalidSpec", "no '..'"),
        ("output", {"uri": "pvc://My_Claim/out"}, "InvalidSpec", "spec.output.uri"),
        ("output", {"uri": "pvc://" + "c" * 254 + "/out"}, "InvalidSpec", "PersistentVolumeClaim"),
        ("lora", {"targetModules": [f"m{i}" for i in range(60000)]}, "InvalidSpec", "64"),
        ("resources", {"nodes": 1, "memory": "1" + "0" * 400}, "InvalidSpec", "memory"),
    ],
)
def test_a_spec_no_pod_could_use_is_refused_before_any_child(
    field: str, value: dict[str, Any], reason: str, words: str
) -> None:
    plan = run(job(**{field: value}), [], {})
    accepted, failed = cond(plan, "Accepted"), cond(plan, "Failed")
    assert (accepted.status, accepted.reason) == ("False", reason)
    assert failed.status == "True" and words in failed.message, failed.message
    assert plan.apply == [] and plan.create_pods == [] and plan.status.attempt == 0
    assert [e[:2] for e in plan.events] == [("Warning", reason)]
    # the next pass repeats nothing
    again = run(job(plan.status.wire(), **{field: value}), [], {})
    assert again.events == [] and again.status == plan.status


def test_the_hub_is_allowed_when_the_operator_says_so() -> None:
    allowing = SETTINGS.model_copy(update={"allow_hub": True})
    body = job(baseModel={"uri": "hf://meta-llama/Llama-3-8B"})
    plan = ftj.decide(ftj.World(job=body, pods=[], nodes={}, now=NOW), allowing)
    assert cond(plan, "Accepted").status == "True" and len(plan.create_pods) == 2


def test_a_refused_job_is_checked_again_when_its_spec_changes() -> None:
    refused = run(job(baseModel={"uri": "hf://x/y"}), [], {}).status.wire()
    fixed = job(refused)
    fixed["metadata"]["generation"] = 2
    plan = run(fixed, [], {})
    assert cond(plan, "Failed").status == "False"
    assert cond(plan, "Accepted").status == "True" and plan.status.attempt == 1


def test_a_bug_in_decide_becomes_a_condition(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any, **__: Any) -> Any:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(ftj, "place", broken)
    plan = ftj.decide_or_report(ftj.World(job=job(), pods=[], nodes={}, now=NOW), SETTINGS)
    c = cond(plan, "Accepted")
    assert (c.status, c.reason) == ("False", "ReconcileError")
    assert "ZeroDivisionError" in c.message and plan.create_pods == []


def test_a_child_the_apiserver_refuses_fails_the_job_and_takes_back_its_children() -> None:
    world = ftj.World(job=job(), pods=[pod(1, 0, "n0")], nodes={}, now=NOW)
    plan = ftj.child_rejected(world, "create Pod ns/j-a1-r0: 403 Forbidden: violates PodSecurity")
    c = cond(plan, "Failed")
    assert (c.status, c.reason) == ("True", "ChildRejected") and "PodSecurity" in c.message
    assert plan.delete_pods == [("j-a1-r0", 0)]
    assert sorted(plan.delete_children) == [
        ("ConfigMap", "j-config"),
        ("Role", "j-trainer"),
        ("RoleBinding", "j-trainer"),
        ("Service", "j-gang"),
        ("ServiceAccount", "j-trainer"),
    ]
    assert plan.status.attempt == 0


def test_the_config_size_check_refuses_what_the_schema_lets_through() -> None:
    stages = [
        {"type": "SFT", "dataset": {"uri": f"pvc://data/{'d' * 2000}{i}.jsonl"}} for i in range(16)
    ]
    evaluation = {
        "datasets": [
            {"name": f"e{i}", "uri": f"pvc://data/{'e' * 2000}{i}", "format": "text"}
            for i in range(16)
        ]
    }
    body = job(stages=stages, evaluation=evaluation)
    plan = run(body, [], {})
    c = cond(plan, "Accepted")
    if c.status == "False":
        assert c.reason == "InvalidSpec" and "bytes" in c.message
    else:  # the whole spec fits: then the ConfigMap the pass renders is under the limit
        (cm,) = [o for o in plan.apply if o["kind"] == "ConfigMap"]
        assert len(cm["data"]["job.json"]) <= 256 * 1024


def test_pvc_paths_with_dot_segments_that_stay_inside_are_fine() -> None:
    for uri in ("pvc://models/.cache/x", "pvc://models/a..b/c", "pvc://my.claim/..x/y"):
        plan = run(job(baseModel={"uri": uri}), [], {})
        assert cond(plan, "Accepted").status == "True", uri
