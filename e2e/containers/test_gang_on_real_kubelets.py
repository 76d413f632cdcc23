"""A 2-rank FineTuneJob in containers under real kubelets; one node dies mid-run.

The gang spans two of three nodes. When the node of a rank is killed (it drops off the
network, as a machine that loses power does, then its kubelet and its containers stop at
once), the node lifecycle controller marks it NotReady, the operator
tears the gang down and starts attempt 2 on the two healthy nodes from the last checkpoint,
and the job finishes with the same final loss as the same job run undisturbed on the same
kubelets. GPU-hours and restarts are checked against the Pods' own times.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from containers_support import GROUP, NODES, POOL, SCENARIO, VERSION
from kubernetes import client

from graft.testing.cluster import wait_for
from graft.testing.corpus import instruction_records, write_jsonl
from graft.testing.docker_nodes import DockerNode
from graft.testing.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

MAX_STEPS = 400  # the kill must land mid-run: status shows a checkpoint ~10 s in
CHECKPOINT_EVERY = 10


def job_spec(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
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
                "globalBatchSize": 32,
                "microBatchSize": 8,
                "maxSeqLength": 128,
                "precision": "fp32",
                "warmupSteps": 2,
                "seed": 7,
            },
            "resources": {
                "nodePool": POOL["name"],
                "nodes": 2,
                "gpusPerNode": 1,
                # three nodes share this host's 2 cores and 24 GiB
                "cpu": "1",
                "memory": "3Gi",
            },
            "checkpoint": {"every": CHECKPOINT_EVERY, "keep": 3},
            "output": {"uri": f"pvc://out/{name}"},
            "restartPolicy": {"maxRestarts": 2, "backoffSeconds": 1},
        },
    }


class Job:
    def __init__(self, k8s: client.ApiClient, ns: str, name: str) -> None:
        self.custom = client.CustomObjectsApi(k8s)
        self.core = client.CoreV1Api(k8s)
        self.ns, self.name = ns, name

    def create(self) -> None:
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.ns, "finetunejobs", job_spec(self.name)
        )

    def status(self) -> dict[str, Any]:
        obj = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.ns, "finetunejobs", self.name
        )
        return dict(obj.get("status") or {})

    def cond(self, type_: str) -> dict[str, Any]:
        return next((c for c in self.status().get("conditions") or [] if c["type"] == type_), {})

    def pods(self, attempt: int | None = None) -> list[Any]:
        sel = f"graft.dev/job={self.name}" + (
            f",graft.dev/attempt={attempt}" if attempt is not None else ""
        )
        pods = self.core.list_namespaced_pod(self.ns, label_selector=sel).items
        return sorted(
            (p for p in pods if p.metadata.deletion_timestamp is None),
            key=lambda p: int(p.metadata.labels["graft.dev/rank"]),
        )

    def running(self, attempt: int) -> list[Any] | None:
        pods = self.pods(attempt)
        ok = (
            len(pods) == 2
            and all(p.status.phase == "Running" for p in pods)
            and self.status().get("attempt") == attempt
        )
        return pods if ok else None

    def finished(self) -> bool:
        return self.status().get("phase") in ("Succeeded", "Failed")

    def explain(self) -> str:
        pods = self.core.list_namespaced_pod(self.ns).items
        lines = [json.dumps(self.status(), indent=1, default=str)]
        for p in pods:
            lines.append(f"pod {p.metadata.name} on {p.spec.node_name}: {p.status.phase}")
            for cs in p.status.container_statuses or []:
                lines.append(f"  {cs.name}: {cs.state}")
        return "\n".join(lines)


def test_gang_survives_a_killed_node_under_real_kubelets(
    k8s: client.ApiClient,
    nodes: dict[str, DockerNode],
    operator_release: str,
    claims_namespace: tuple[str, Path],
) -> None:
    ns, claims = claims_namespace
    build_tiny_model(claims / "models" / "tiny-llama", seed=0)
    write_jsonl(claims / "data" / "sft.jsonl", instruction_records(160, seed=12))
    for p in claims.rglob("*"):
        p.chmod(0o777 if p.is_dir() else 0o644)

    job = Job(k8s, ns, "wind-sft")
    job.create()
    t0 = time.monotonic()
    try:
        first = wait_for("attempt 1 running", lambda: job.running(1), timeout=240)
        on = [p.spec.node_name for p in first]
        assert len(set(on)) == 2 and set(on) <= set(NODES), on
        t_running = time.monotonic() - t0

        def checkpointed() -> dict[str, Any] | None:
            st = job.status()
            assert st.get("phase") != "Succeeded", "finished before the kill: raise MAX_STEPS"
            return (
                st if (st.get("lastCheckpoint") or {}).get("step", 0) >= CHECKPOINT_EVERY else None
            )

        before = wait_for("a checkpoint in status", checkpointed, timeout=240, interval=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{job.explain()}") from None

    step_at_kill = (before.get("progress") or {}).get("step", 0)
    assert step_at_kill < MAX_STEPS, "the kill must land mid-run: raise MAX_STEPS"
    # Kill the node of a rank that does not also run the operator.
    victim = next(p for p in reversed(first) if p.spec.node_name != operator_release)
    dead = victim.spec.node_name
    t_kill = time.monotonic()
    nodes[dead].kill()
    try:
        wait_for(
            "the operator to restart the gang",
            lambda: job.status().get("restarts") == 1,
            timeout=120,
            interval=0.5,
        )
        detection = time.monotonic() - t_kill
        st = job.status()
        assert st["lastFailure"]["reason"] == "NodeLost", st["lastFailure"]
        second = wait_for("attempt 2 running", lambda: job.running(2), timeout=240)
        assert dead not in {p.spec.node_name for p in second}
        resumed_from = next(
            e.value for e in second[0].spec.containers[0].env if e.name == "GRAFT_RESUME_FROM"
        )
        assert resumed_from >= before["lastCheckpoint"]["uri"], resumed_from
        wait_for("the job to finish", job.finished, timeout=600, interval=1)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{job.explain()}") from None
    final = job.status()
    assert final["phase"] == "Succeeded", job.explain()
    assert final["restarts"] == 1 and final["attempt"] == 2
    assert final["progress"]["step"] == MAX_STEPS
    assert (claims / "out" / "wind-sft" / "adapter_model.safetensors").exists()
    t_done = time.monotonic()
    # GPU-hours: 1 GPU per Pod; attempt 1's two Pods ran at least from Running to the kill,
    # and no Pod ran before the job was created or after it finished.
    seconds = final["gpuHours"] * 3600
    assert 2 * (t_kill - (t0 + t_running)) - 2 <= seconds <= 2 * (t_done - t0) + 2, (
        seconds,
        t_kill - t0,
        t_done - t0,
    )
    assert final["cost"] == pytest.approx(final["gpuHours"] * POOL["pricePerGpuHour"], abs=0.01)

    # -- the same job, undisturbed, on the same kubelets: the same final loss ---------------
    calm = Job(k8s, ns, "wind-sft-calm")
    calm.create()
    try:
        wait_for("the undisturbed job to finish", calm.finished, timeout=600, interval=1)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{calm.explain()}") from None
    undisturbed = calm.status()
    assert undisturbed["phase"] == "Succeeded", calm.explain()
    assert undisturbed["restarts"] == 0
    assert final["progress"]["loss"] == undisturbed["progress"]["loss"], (
        final["progress"],
        undisturbed["progress"],
    )
    # test_serving_on_real_kubelets serves this adapter
    SCENARIO.update(namespace=ns, job="wind-sft", base="pvc://models/tiny-llama")
    print(
        "\n[e2e-containers] "
        + json.dumps(
            {
                "attempt1RunningSeconds": round(t_running, 1),
                "stepAtKill": step_at_kill,
                "checkpointAtKill": before["lastCheckpoint"]["step"],
                "resumedFrom": resumed_from,
                "killedNode": dead,
                "detectionSeconds": round(detection, 1),
                "finalLoss(resumed)": final["progress"]["loss"],
                "finalLoss(undisturbed)": undisturbed["progress"]["loss"],
                "gpuHours": final["gpuHours"],
                "gpuHours(undisturbed)": undisturbed["gpuHours"],
            }
        )
    )
