"""A hung trainer, end to end: one rank of a real 2-rank gloo job blocks for ever, rank 0
then waits for it inside the gradient all-reduce, the heartbeat on the job's Lease stops,
and the operator (installed from the chart) fails the attempt as ``TrainerHung``, tears the
gang down and resumes it from the last checkpoint to the end.

The hang comes from a test-only hook of the trainer (``GRAFT_TEST_ONLY_HANG_IN_COLLECTIVE``,
set for this job only through the process kubelet's environment). The heartbeat timeout is
short (10 s), shorter than importing torch and the model libraries takes on a busy node:
the job also shows that a starting gang is never mistaken for a hung one (exactly one
restart, and it comes after the hang).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_support import E2E_POOL
from kubernetes import client

from graft.runtime.train.progress import TEST_HANG_ENV
from graft.testing.cluster import A100_LABELS, A100_TAINT, FakeKubelet, wait_for
from graft.testing.corpus import instruction_records, write_jsonl
from graft.testing.operator import OperatorProcess
from graft.testing.process_kubelet import ProcessKubelet

JOB = "hung-sft"
GROUP, VERSION = "graft.dev", "v1alpha1"
MAX_STEPS = 30
CHECKPOINT_EVERY = 5
HANG_AT_STEP = 17
HEARTBEAT_TIMEOUT = 10


def finetunejob() -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": JOB},
        "spec": {
            "baseModel": {"uri": "pvc://models/tiny-llama"},
            "stages": [
                {"type": "SFT", "dataset": {"uri": "pvc://data/sft.jsonl", "format": "alpaca"}}
            ],
            "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "hyperparameters": {
                "maxSteps": MAX_STEPS,
                "learningRate": 3e-3,
                "globalBatchSize": 16,
                "microBatchSize": 8,
                "maxSeqLength": 128,
                "precision": "fp32",
                "seed": 3,
            },
            "resources": {"nodePool": E2E_POOL["name"], "nodes": 2, "gpusPerNode": 1},
            "checkpoint": {"every": CHECKPOINT_EVERY, "keep": 3},
            "output": {"uri": f"pvc://out/{JOB}"},
            "restartPolicy": {
                "maxRestarts": 2,
                "backoffSeconds": 0,
                "heartbeatTimeoutSeconds": HEARTBEAT_TIMEOUT,
            },
        },
    }


@pytest.fixture
def namespace(k8s: client.ApiClient, fake_nodes: FakeKubelet) -> Iterator[str]:
    ns = f"hung-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(k8s).create_namespace({"metadata": {"name": ns}})  # type: ignore[arg-type]
    for claim in ("models", "data", "out"):
        fake_nodes.add_bound_claim(ns, claim)
    yield ns
    client.CustomObjectsApi(k8s).delete_collection_namespaced_custom_object(
        GROUP, VERSION, ns, "finetunejobs"
    )


def test_a_rank_blocked_in_a_collective_is_trainer_hung_and_the_job_resumes(
    k8s: client.ApiClient,
    operator: OperatorProcess,
    fake_nodes: FakeKubelet,
    process_kubelet: ProcessKubelet,
    namespace: str,
) -> None:
    kubelet, ns = process_kubelet, namespace
    custom, core = client.CustomObjectsApi(k8s), client.CoreV1Api(k8s)
    from graft.testing.tiny_model import build_tiny_model

    build_tiny_model(kubelet.claim_dir(ns, "models") / "tiny-llama", seed=0)
    write_jsonl(kubelet.claim_dir(ns, "data") / "sft.jsonl", instruction_records(96, seed=5))
    nodes = [f"a100-hung-{i}" for i in range(2)]
    for n in nodes:
        fake_nodes.add_node(n, labels=A100_LABELS, gpus=1, taints=[A100_TAINT])
    kubelet.manage(*nodes)
    # Earlier e2e tests leave their A100 nodes behind, one of them dead and, with no node
    # lifecycle controller here, still schedulable: this job runs on its own two nodes only.
    others = [n.metadata.name for n in core.list_node().items if n.metadata.name not in nodes]
    for other in others:
        core.patch_node(other, {"spec": {"unschedulable": True}})

    def status() -> dict[str, Any]:
        job = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "finetunejobs", JOB)
        return dict(job.get("status") or {})

    def cond(type_: str) -> dict[str, Any]:
        return next((c for c in status().get("conditions") or [] if c["type"] == type_), {})

    def explain() -> str:
        st = status()
        parts = [f"lastFailure: {st.get('lastFailure')}", f"status: {json.dumps(st)[:3000]}"]
        for run in kubelet.runs(ns):
            parts.append(
                f"--- {run.name}: exit {run.exit_code} after {run.seconds}s\n{run.stderr()[-1500:]}"
            )
        parts.append(f"--- operator log\n{operator.log()[-3000:]}")
        return "\n".join(parts)

    kubelet.extra_env[TEST_HANG_ENV] = f"{JOB}:1:1:{HANG_AT_STEP}"
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, "finetunejobs", finetunejob())

        def hung() -> bool:
            return any("test-only hang" in r.stderr() for r in kubelet.runs(ns))

        wait_for(f"rank 1 to block after step {HANG_AT_STEP}", hung, timeout=180, interval=0.2)
        t_hang = time.monotonic()
        marks["hang"] = t_hang - t0
        assert status().get("restarts", 0) == 0, "restarted before the hang: " + explain()
        wait_for("the restart", lambda: status().get("restarts") == 1, timeout=60, interval=0.2)
        marks["restart decided"] = time.monotonic() - t0
        detection = time.monotonic() - t_hang
        st = status()
        assert st["lastFailure"]["reason"] == "TrainerHung", explain()
        assert "no heartbeat from rank 0" in st["lastFailure"]["message"]
        assert 0 < (st.get("progress") or {}).get("step", 0) <= HANG_AT_STEP
        # the heartbeat stopped at the hang, not before, and the timeout is what it took
        assert HEARTBEAT_TIMEOUT - 3 <= detection <= HEARTBEAT_TIMEOUT + 15, detection
        ckpt = st["lastCheckpoint"]
        assert ckpt["step"] >= CHECKPOINT_EVERY

        def attempt2() -> list[Any] | None:
            sel = f"graft.dev/job={JOB},graft.dev/attempt=2"
            pods = core.list_namespaced_pod(ns, label_selector=sel).items
            return pods if len(pods) == 2 else None

        second = wait_for("attempt 2 pods", attempt2, timeout=60)
        for p in second:
            env = {e.name: e.value for e in p.spec.containers[0].env if e.value is not None}
            assert env["GRAFT_RESUME_FROM"] == ckpt["uri"]
        wait_for(
            "the job to finish",
            lambda: "True" in (cond("Succeeded").get("status"), cond("Failed").get("status")),
            timeout=240,
            interval=0.5,
        )
        marks["succeeded"] = time.monotonic() - t0
    except AssertionError as e:
        raise AssertionError(f"{e}\n{explain()}") from None
    finally:
        kubelet.extra_env.pop(TEST_HANG_ENV, None)
        for other in others:
            core.patch_node(other, {"spec": {"unschedulable": False}})
    final = status()
    assert final["phase"] == "Succeeded", explain()
    assert final["restarts"] == 1 and final["attempt"] == 2, explain()
    assert final["progress"]["step"] == MAX_STEPS
    runs = kubelet.runs(ns, lambda r: r.labels.get("graft.dev/attempt") == "2")
    rank0 = next(r for r in runs if r.labels.get("graft.dev/rank") == "0")
    resumed = next(
        (int(rec["step"]) for rec in rank0.json_lines("stderr") if rec.get("msg") == "resuming"),
        None,
    )
    assert resumed == ckpt["step"], "attempt 2 did not resume from the last checkpoint"
    figures = {
        "heartbeatTimeoutSeconds": HEARTBEAT_TIMEOUT,
        "detectionSeconds(step reported -> restart)": round(detection, 1),
        "checkpointResumed": ckpt["step"],
        "timeline": {k: round(v, 1) for k, v in marks.items()},
    }
    print("\n[e2e] hung-trainer figures:\n" + json.dumps(figures, indent=1))
