"""The whole system: a FineTuneJob really trains on two fake A100 nodes, survives losing one
of them, and its adapter is then served by a ModelService on real Ray Serve.

One scenario in two tests (the second needs what the first trained):

1. ``test_finetune_survives_node_loss``: the operator (installed from the Helm chart) places
   a 2-rank LoRA SFT job on two of three fake A100 nodes; the process kubelet runs both
   ranks as local processes that train the tiny model together over gloo. After the first
   checkpoint reaches ``status.lastCheckpoint`` the test takes rank 1's node down (kill -9
   of its processes, node NotReady). The operator must notice, restart the gang on healthy
   nodes (attempt 2, restarts 1, ``GRAFT_RESUME_FROM`` set), the trainer must resume from
   the checkpoint, and the job must succeed with the same final loss as an undisturbed run
   of the same job, with GPU-hours that match the Pods' run times.
2. ``test_modelservice_serves_the_adapter``: a ModelService with ``fromFineTuneJob`` renders
   a RayService whose Serve config carries the adapter; a fake of KubeRay's operator runs
   that Serve config on local Ray Serve and writes the RayService status as KubeRay would;
   the ModelService becomes Ready with an endpoint, and the adapter answers a chat request
   through the openai client.

Figures (detection, restart, losses, GPU-hours, phase times) are printed; run with ``-s``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_support import E2E_POOL, SHARED, FakeKubeRayOperator
from kubernetes import client

from graft.testing.cluster import A100_LABELS, A100_TAINT, FakeKubelet, wait_for
from graft.testing.controlplane import ControlPlane
from graft.testing.corpus import instruction_records, write_jsonl
from graft.testing.operator import OperatorProcess
from graft.testing.process_kubelet import PodRun, ProcessKubelet

JOB = "wind-sft"
SERVICE = "wind-chat"
CLAIMS = ("models", "data", "out")
BASE_URI = "pvc://models/tiny-llama"
OUTPUT_URI = f"pvc://out/{JOB}"
MAX_STEPS = 100
CHECKPOINT_EVERY = 5
GROUP, VERSION = "graft.dev", "v1alpha1"

#: What the first test leaves for the second.
SCENARIO: dict[str, Any] = {}


def finetunejob() -> dict[str, Any]:
    """Two ranks of one "GPU" each; long enough (100 steps of ~0.1 s) that the node loss
    lands mid-training, with a checkpoint every 5 steps to resume from."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": JOB},
        "spec": {
            "baseModel": {"uri": BASE_URI},
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
            "resources": {"nodePool": E2E_POOL["name"], "nodes": 2, "gpusPerNode": 1},
            "checkpoint": {"every": CHECKPOINT_EVERY, "keep": 3},
            "output": {"uri": OUTPUT_URI},
            "restartPolicy": {"maxRestarts": 2, "backoffSeconds": 1},
        },
    }


class Timer:
    """Wall-clock marks of the scenario, printed at the end."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.marks: dict[str, float] = {}

    def mark(self, what: str) -> float:
        self.marks[what] = round(time.monotonic() - self.t0, 1)
        return self.marks[what]


class Cluster:
    """The objects of one namespace, read the way `kubectl get -o json` would."""

    def __init__(self, k8s: client.ApiClient, ns: str) -> None:
        self.custom = client.CustomObjectsApi(k8s)
        self.core = client.CoreV1Api(k8s)
        self.ns = ns

    def create(self, plural: str, obj: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, plural, obj)

    def get(self, plural: str, name: str, group: str = GROUP, version: str = VERSION) -> Any:
        try:
            return self.custom.get_namespaced_custom_object(group, version, self.ns, plural, name)
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def job(self) -> dict[str, Any]:
        return dict(self.get("finetunejobs", JOB) or {})

    def status(self) -> dict[str, Any]:
        return dict(self.job().get("status") or {})

    def cond(self, type_: str, obj: dict[str, Any] | None = None) -> dict[str, Any]:
        st = (obj or self.job()).get("status") or {}
        return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})

    def pods(self, attempt: int) -> list[Any]:
        sel = f"graft.dev/job={JOB},graft.dev/attempt={attempt}"
        pods = self.core.list_namespaced_pod(self.ns, label_selector=sel).items
        live = [p for p in pods if p.metadata.deletion_timestamp is None]
        return sorted(live, key=lambda p: int(p.metadata.labels["graft.dev/rank"]))


def env_of(pod: Any) -> dict[str, str]:
    return {e.name: e.value for e in pod.spec.containers[0].env if e.value is not None}


def explain(cluster: Cluster, kubelet: ProcessKubelet, operator: OperatorProcess) -> str:
    """What to look at when a wait times out: status, pods, trainer logs, operator log."""
    parts = [f"status: {json.dumps(cluster.status(), indent=1)[:3000]}"]
    for run in kubelet.runs(cluster.ns):
        parts.append(
            f"--- {run.name} on {run.node}: exit {run.exit_code}, "
            f"{(run.seconds or 0):.1f}s\n{run.stderr()[-1500:]}"
        )
    parts.append(f"kubelet errors: {kubelet.errors[-5:]}")
    parts.append(f"--- operator log\n{operator.log()[-3000:]}")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def namespace(k8s: client.ApiClient, fake_nodes: FakeKubelet) -> Iterator[str]:
    ns = f"e2e-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(k8s)
    core.create_namespace({"metadata": {"name": ns}})  # type: ignore[arg-type]
    for claim in CLAIMS:
        fake_nodes.add_bound_claim(ns, claim)
    yield ns
    custom = client.CustomObjectsApi(k8s)
    for plural in ("modelservices", "finetunejobs"):
        custom.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, plural)


def test_finetune_survives_node_loss(
    control_plane: ControlPlane,
    k8s: client.ApiClient,
    operator: OperatorProcess,
    fake_nodes: FakeKubelet,
    process_kubelet: ProcessKubelet,
    namespace: str,
    tmp_path: Path,
) -> None:
    timer = Timer()
    kubelet, ns = process_kubelet, namespace
    cluster = Cluster(k8s, ns)

    # -- inputs on the claims: a tiny LLaMA and an instruction set (nothing downloaded) ----
    from graft.testing.tiny_model import build_tiny_model

    build_tiny_model(kubelet.claim_dir(ns, "models") / "tiny-llama", seed=0)
    write_jsonl(kubelet.claim_dir(ns, "data") / "sft.jsonl", instruction_records(160, seed=12))
    timer.mark("inputs built")

    # -- three A100 nodes of one GPU each, run by the process kubelet -----------------------
    nodes = [f"a100-e2e-{i}" for i in range(3)]
    for n in nodes:
        fake_nodes.add_node(
            n,
            labels=A100_LABELS,
            gpus=1,
            taints=[A100_TAINT],
        )
    kubelet.manage(*nodes)

    cluster.create("finetunejobs", finetunejob())

    def running(attempt: int) -> list[Any] | None:
        pods = cluster.pods(attempt)
        ok = (
            len(pods) == 2
            and all(p.status.phase == "Running" for p in pods)
            and cluster.status().get("attempt") == attempt
            and cluster.cond("Running").get("status") == "True"
        )
        return pods if ok else None

    try:
        first = wait_for("attempt 1 running", lambda: running(1), timeout=90)
        timer.mark("attempt 1 running")
        assert {p.spec.node_name for p in first} <= set(nodes)
        assert len({p.spec.node_name for p in first}) == 2, "one rank per node"

        # -- the first checkpoint reaches the job's status --------------------------------
        def checkpointed() -> dict[str, Any] | None:
            st = cluster.status()
            if st.get("phase") == "Succeeded":
                raise AssertionError(
                    "the job finished before the node could be taken down: raise MAX_STEPS"
                )
            ck = st.get("lastCheckpoint") or {}
            return st if ck.get("step", 0) >= CHECKPOINT_EVERY else None

        before = wait_for("a checkpoint in status", checkpointed, timeout=120)
        timer.mark("first checkpoint in status")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{explain(cluster, kubelet, operator)}") from None
    checkpoint_at_kill = before["lastCheckpoint"]
    step_at_kill = (before.get("progress") or {}).get("step", 0)

    # -- rank 1's node dies ------------------------------------------------------------------
    rank1 = first[1]
    dead = rank1.spec.node_name
    t_kill = time.monotonic()
    killed = kubelet.take_node_down(dead)
    assert [r.name for r in killed] == [rank1.metadata.name]
    timer.mark(f"node {dead} taken down (rank 1)")

    try:
        wait_for(
            "the operator notices the lost node",
            lambda: cluster.status().get("restarts") == 1,
            timeout=30,
            interval=0.1,
        )
        detection = time.monotonic() - t_kill
        timer.mark("restart decided")
        st = cluster.status()
        assert st["lastFailure"]["reason"] == "NodeLost", st["lastFailure"]
        assert st["lastFailure"].get("node") == dead

        second = wait_for("attempt 2 running", lambda: running(2), timeout=120)
        restart = time.monotonic() - t_kill
        timer.mark("attempt 2 running")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{explain(cluster, kubelet, operator)}") from None

    # the gang restarted on healthy nodes, told to resume from the checkpoint
    assert dead not in {p.spec.node_name for p in second}
    assert len({p.spec.node_name for p in second}) == 2
    st = cluster.status()
    assert st["attempt"] == 2 and st["restarts"] == 1
    for p in second:
        env = env_of(p)
        assert env["GRAFT_ATTEMPT"] == "2"
        assert env["GRAFT_RESUME_FROM"].startswith(f"{OUTPUT_URI}/checkpoints/ckpt-s00-")
        assert env["GRAFT_RESUME_FROM"] >= checkpoint_at_kill["uri"]
    job_json = json.loads(
        cluster.core.read_namespaced_config_map(f"{JOB}-config", ns).data["job.json"]
    )
    assert (
        job_json["attempt"] == 2
        and job_json["resumeFrom"] == env_of(second[0])["GRAFT_RESUME_FROM"]
    )

    # the undisturbed run of the same job, alongside attempt 2
    baseline: dict[str, Any] = {}
    undisturbed = threading.Thread(
        target=_undisturbed_run,
        args=(job_json, kubelet.pvc_root(ns), tmp_path / "undisturbed", baseline),
        daemon=True,
    )
    undisturbed.start()

    try:
        wait_for(
            "the job to succeed",
            lambda: (
                cluster.cond("Succeeded").get("status") == "True"
                or cluster.cond("Failed").get("status") == "True"
            ),
            timeout=240,
            interval=0.5,
        )
    except AssertionError as e:
        raise AssertionError(f"{e}\n{explain(cluster, kubelet, operator)}") from None
    timer.mark("job succeeded")
    final = cluster.status()
    assert final["phase"] == "Succeeded", explain(cluster, kubelet, operator)
    assert final["restarts"] == 1 and final["attempt"] == 2
    assert final["progress"]["step"] == MAX_STEPS
    # No evaluation gate on this job, so its output is promotable (issue 11).
    assert final["output"] == {"uri": OUTPUT_URI, "kind": "adapter", "promotable": True}
    out_dir = kubelet.claim_dir(ns, "out") / JOB
    assert (out_dir / "adapter_config.json").exists()
    assert (out_dir / "adapter_model.safetensors").exists()

    # -- the trainer resumed from the checkpoint, not from step 0 ---------------------------
    runs = kubelet.runs(ns, lambda r: r.labels.get("graft.dev/job") == JOB)
    resumed = _resumed_step(_rank0(runs, attempt=2))
    assert resumed is not None, "attempt 2 did not log 'resuming'"
    assert resumed >= checkpoint_at_kill["step"] > 0
    first_progress = [
        p
        for p in _rank0(runs, attempt=2).json_lines("stdout")
        if p.get("state") == "training" and p.get("step")
    ]
    assert not first_progress or first_progress[0]["step"] >= resumed

    # -- GPU-hours: the Pods' run times x 1 GPU ----------------------------------------------
    pod_seconds = sum(r.seconds or 0 for r in runs)
    gpu_hours = final["gpuHours"]
    assert gpu_hours > 0
    # The operator closes the books of a failed attempt when it tears it down: the dead
    # node's Pod (no kubelet reports its end) and a Pod still shutting down count up to
    # that moment (lastFailure.time), the others up to their container's exit.
    torn_down = _epoch(st["lastFailure"]["time"])
    counted = 0.0
    for r in runs:
        assert r.started is not None and r.finished is not None
        end = r.finished
        if r.labels.get("graft.dev/attempt") == "1" and (r.killed_with_node or end > torn_down):
            end = torn_down
        counted += end - r.started
    # Pod times in status have one-second resolution (start and end of each Pod).
    assert abs(gpu_hours * 3600 - counted) <= 2.0 * len(runs) + 1, (gpu_hours * 3600, counted)
    assert final["cost"] == pytest.approx(gpu_hours * E2E_POOL["pricePerGpuHour"], abs=0.01)

    # -- the same final loss as the undisturbed run -----------------------------------------
    undisturbed.join(timeout=240)
    timer.mark("undisturbed run finished")
    assert baseline.get("exit_code") == 0, baseline
    loss_resumed = final["progress"]["loss"]
    loss_undisturbed = baseline["progress"]["loss"]
    # Exact: the batch of step s is a pure function of (seed, stage, s), the checkpoint
    # restores weights, AdamW state, schedule and every rank's RNG, and both runs are 2
    # gloo processes on this CPU, so resume is bit-identical (docs/trainer.md, Resume).
    assert loss_resumed == loss_undisturbed, (loss_resumed, loss_undisturbed)

    figures = {
        "stepAtKill": step_at_kill,
        "checkpointAtKill": checkpoint_at_kill["step"],
        "resumedAtStep": resumed,
        "detectionSeconds": round(detection, 2),
        "restartSeconds(kill->attempt 2 running)": round(restart, 2),
        "finalLoss(resumed)": loss_resumed,
        "finalLoss(undisturbed)": loss_undisturbed,
        "gpuHours": gpu_hours,
        "podSeconds(start->exit)": round(pod_seconds, 1),
        "podSeconds(as counted: old attempt up to its teardown)": round(counted, 1),
        "cost": final["cost"],
        "pods": [
            f"{r.name}@{r.node}: {r.seconds:.1f}s exit {r.exit_code}"
            for r in runs
            if r.seconds is not None
        ],
    }
    print("\n[e2e] node-loss scenario figures:\n" + json.dumps(figures, indent=1))
    print("[e2e] timeline:\n" + "\n".join(f"  {v:6.1f}s {k}" for k, v in timer.marks.items()))
    SCENARIO.update(namespace=ns, job=final, figures=figures)


def _epoch(rfc3339: str) -> float:
    return dt.datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def _rank0(runs: list[PodRun], attempt: int) -> PodRun:
    (run,) = [
        r
        for r in runs
        if r.labels.get("graft.dev/attempt") == str(attempt)
        and r.labels.get("graft.dev/rank") == "0"
    ]
    return run


def _resumed_step(run: PodRun) -> int | None:
    for rec in run.json_lines("stderr"):
        if rec.get("msg") == "resuming":
            return int(rec["step"])
    return None


def _undisturbed_run(
    job_json: dict[str, Any], pvc_root: Path, workdir: Path, result: dict[str, Any]
) -> None:
    """The same job (the operator's resolved job.json), 2 gloo processes, never interrupted,
    writing to a directory of its own."""
    from graft.runtime.train import launch_local

    config = json.loads(json.dumps(job_json))
    config.update(attempt=1, resumeFrom=None)
    config["spec"]["output"]["uri"] = "pvc://out/undisturbed"
    config["spec"]["checkpoint"]["uri"] = "pvc://out/undisturbed/checkpoints"
    try:
        run = launch_local(
            config,
            nproc=2,
            workdir=str(workdir),
            pvc_root=str(pvc_root),
            env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        result.update(exit_code=run.exit_code, progress=run.last_progress, term=run.termination)
    except Exception as e:  # reported by the asserting thread
        result.update(exit_code=None, error=repr(e))


# ---------------------------------------------------------------------------------------
# ModelService: rendered as a RayService, run for real on local Ray Serve
# ---------------------------------------------------------------------------------------


def _modelservice_controller_missing() -> str | None:
    """Why the ModelService half cannot run yet, or None when it can."""
    if not SHARED.is_dir():
        return f"{SHARED} (KubeRay's CRDs for the control plane) is not on this machine"
    module = importlib.import_module("graft.reconcile.modelservice")
    if not (hasattr(module, "ModelServiceReconciler") or hasattr(module, "build_rayservice")):
        return (
            "the ModelService controller does not render RayServices yet "
            "(graft.reconcile.modelservice has no ModelServiceReconciler/build_rayservice)"
        )
    return None


def test_modelservice_serves_the_adapter(
    k8s: client.ApiClient,
    operator: OperatorProcess,
    process_kubelet: ProcessKubelet,
    tmp_path: Path,
) -> None:
    why = _modelservice_controller_missing()
    if why:
        pytest.skip(why)
    if "job" not in SCENARIO:
        pytest.skip("the fine-tuning half did not succeed; nothing to serve")
    ns = SCENARIO["namespace"]
    cluster = Cluster(k8s, ns)
    timer = Timer()

    cluster.create(
        "modelservices",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelService",
            "metadata": {"name": SERVICE},
            "spec": {
                "model": {
                    "baseModel": {"uri": BASE_URI},
                    "adapters": [{"name": JOB, "fromFineTuneJob": JOB}],
                },
                "engine": "transformers",
                "resources": {"nodePool": E2E_POOL["name"], "gpusPerReplica": 1, "cpu": "1"},
                "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
            },
        },
    )

    def rendered() -> dict[str, Any] | None:
        rs = cluster.get("rayservices", SERVICE, group="ray.io", version="v1")
        if not rs:
            return None
        config = yaml.safe_load(rs["spec"]["serveConfigV2"])
        adapters = [
            a
            for app in config["applications"]
            for d in app.get("deployments") or []
            for a in (d.get("user_config") or {}).get("adapters") or []
        ]
        return rs if {"name": JOB, "uri": OUTPUT_URI} in adapters else None

    try:
        wait_for("a RayService serving the job's adapter", rendered, timeout=60)
    except AssertionError as e:
        msvc = cluster.get("modelservices", SERVICE)
        raise AssertionError(f"{e}\nModelService: {msvc}\n{operator.log()[-3000:]}") from None
    timer.mark("RayService rendered")

    kuberay = FakeKubeRayOperator(k8s, ns, tmp_path / "ray", process_kubelet.pvc_root(ns))
    try:
        _serve_and_ask(cluster, kuberay, operator, timer)
    finally:
        kuberay.stop()


def _serve_and_ask(
    cluster: Cluster, kuberay: FakeKubeRayOperator, operator: OperatorProcess, timer: Timer
) -> None:
    ns = cluster.ns
    kuberay.reconcile(SERVICE)
    timer.mark("serve config RUNNING on local Ray Serve")

    def ready() -> dict[str, Any] | None:
        msvc = cluster.get("modelservices", SERVICE) or {}
        st = msvc.get("status") or {}
        ok = cluster.cond("Ready", msvc).get("status") == "True" and st.get("endpoint")
        return msvc if ok else None

    try:
        msvc = wait_for("the ModelService Ready", ready, timeout=60)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{operator.log()[-3000:]}") from None
    timer.mark("ModelService Ready")
    endpoint = msvc["status"]["endpoint"]
    assert endpoint.startswith("http://") and endpoint.endswith("/v1"), endpoint
    assert f".{ns}.svc" in endpoint

    from openai import OpenAI

    # Services carry no traffic here: the endpoint's host is replaced by the local proxy.
    api = OpenAI(base_url=f"{kuberay.url}/v1", api_key="unused", max_retries=0, timeout=120)
    raw = api.chat.completions.with_raw_response.create(
        model=JOB,
        messages=[{"role": "user", "content": "The gearbox shows vibration. What do I do?"}],
        max_tokens=16,
        temperature=0,
    )
    assert raw.http_response.status_code == 200
    answer = raw.parse()
    assert answer.model == JOB
    assert isinstance(answer.choices[0].message.content, str)
    timer.mark("chat answered")
    print(
        "\n[e2e] ModelService: endpoint "
        f"{endpoint}, answer {answer.choices[0].message.content!r}\n"
        + "\n".join(f"  {v:6.1f}s {k}" for k, v in timer.marks.items())
    )
