"""The FineTuneJob controller on a real control plane: the real scheduler places the gang on
fake A100 nodes, a fake kubelet (no kubelet can run here) drives Pod and Node status."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client

from graft.builders import naming
from graft.testing.cluster import FakeKubelet, wait_for
from graft.testing.controlplane import ControlPlane
from graft.testing.faultproxy import Fault, FaultProxy
from graft.testing.operator import OperatorProcess

pytestmark = pytest.mark.integration

NodeFactory = Callable[..., list[str]]


def job(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "baseModel": {"uri": "pvc://models/llama-8b"},
        "stages": [{"type": "SFT", "dataset": {"uri": "pvc://data/sft.jsonl", "format": "alpaca"}}],
        "output": {"uri": "pvc://models/out"},
        "resources": {"nodes": 2, "gpusPerNode": 8},
        "restartPolicy": {"maxRestarts": 3, "backoffSeconds": 0},
    }
    body.update(spec)
    return {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": body,
    }


class Jobs:
    """Small fluent helpers over one namespace."""

    def __init__(self, k8s: client.ApiClient, kubelet: FakeKubelet, ns: str) -> None:
        self.k8s = k8s
        self.custom = client.CustomObjectsApi(k8s)
        self.core = client.CoreV1Api(k8s)
        self.kubelet = kubelet
        self.ns = ns

    def create(self, obj: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(
            "graft.dev", "v1alpha1", self.ns, "finetunejobs", obj
        )

    def patch(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            "graft.dev", "v1alpha1", self.ns, "finetunejobs", name, {"spec": spec}
        )

    def get(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.custom.get_namespaced_custom_object(
            "graft.dev", "v1alpha1", self.ns, "finetunejobs", name
        )
        return out

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).get("status") or {})

    def cond(self, name: str, type_: str) -> dict[str, Any] | None:
        return next(
            (c for c in self.status(name).get("conditions", []) if c["type"] == type_), None
        )

    def wait_cond(
        self, name: str, type_: str, status: str = "True", timeout: float = 30
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            c = self.cond(name, type_)
            return c if c and c["status"] == status else None

        out: dict[str, Any] = wait_for(f"{name} {type_}={status}", probe, timeout)
        return out

    def pods(self, name: str, attempt: int | None = None, live: bool = True) -> list[Any]:
        sel = f"graft.dev/job={name}" + (f",graft.dev/attempt={attempt}" if attempt else "")
        pods = self.kubelet.pods(self.ns, sel)
        if live:
            pods = [p for p in pods if p.metadata.deletion_timestamp is None]
        return sorted(pods, key=lambda p: int(p.metadata.labels["graft.dev/rank"]))

    def wait_scheduled(self, name: str, attempt: int, count: int, timeout: float = 60) -> list[Any]:
        def probe() -> list[Any] | None:
            # the old attempt's trainers exit on SIGTERM; a kubelet then confirms deletion
            self.kubelet.confirm_deletions(self.ns)
            pods = self.pods(name, attempt)
            ok = len(pods) == count and all(p.spec.node_name for p in pods)
            return pods if ok else None

        try:
            out: list[Any] = wait_for(
                f"{count} pods of attempt {attempt} scheduled", probe, timeout
            )
        except AssertionError as e:
            why = [(p.metadata.name, p.status.conditions) for p in self.pods(name, attempt)]
            raise AssertionError(f"{e}; pods: {why}") from None
        return out

    def run_all(self, name: str, attempt: int) -> None:
        for p in self.pods(name, attempt):
            self.kubelet.run_pod(self.ns, p.metadata.name)
        self.wait_cond(name, "Running")

    def as_trainer(self, job: str) -> client.ApiClient:
        """A client with the job's trainer identity (its ServiceAccount, impersonated)."""
        api = client.ApiClient(self.k8s.configuration)
        user = f"system:serviceaccount:{self.ns}:{job}-trainer"
        api.set_default_header("Impersonate-User", user)
        return api

    def report(self, job: str, progress: dict[str, Any], *, heartbeat: bool = True) -> None:
        """What rank 0 does: the report and a heartbeat on the job's Lease, as the trainer."""
        body: dict[str, Any] = {
            "metadata": {
                "annotations": {"graft.dev/progress": json.dumps({"attempt": 1} | progress)}
            }
        }
        if heartbeat:
            now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            body["spec"] = {"renewTime": now, "holderIdentity": f"{job}-a1-r0"}
        lease = client.CoordinationV1Api(self.as_trainer(job))
        lease.patch_namespaced_lease(f"{job}-progress", self.ns, body)


CLAIMS = ("models", "data")


@pytest.fixture
def jobs(
    k8s: client.ApiClient, kubelet: FakeKubelet, namespace: str, operator_process: OperatorProcess
) -> Jobs:
    for claim in CLAIMS:
        kubelet.add_bound_claim(namespace, claim)
    return Jobs(k8s, kubelet, namespace)


def env_of(pod: Any) -> dict[str, str]:
    return {e.name: e.value for e in pod.spec.containers[0].env if e.value is not None}


def test_two_node_gang_lands_on_a100_nodes(
    jobs: Jobs, nodes: NodeFactory, control_plane: ControlPlane
) -> None:
    a100 = nodes(a100=2, cpu=2)[:2]
    jobs.create(job("gang"))
    pods = jobs.wait_scheduled("gang", 1, 2)
    assert {p.spec.node_name for p in pods} == set(a100), "one rank per A100 node"
    for rank, pod in enumerate(pods):
        env = env_of(pod)
        assert env["GRAFT_NODE_RANK"] == str(rank)
        assert env["GRAFT_NNODES"] == "2" and env["GRAFT_NPROC_PER_NODE"] == "8"
        assert env["MASTER_ADDR"].startswith(f"gang-r0.gang-gang.{jobs.ns}.svc")
        assert env["GRAFT_ATTEMPT"] == "1"
        limits = pod.spec.containers[0].resources.limits
        assert limits["nvidia.com/gpu"] == "8"
        assert pod.spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    st = jobs.status("gang")
    assert st["placement"] == {"nodePool": "a100-80g", "nodes": 2, "gpusPerNode": 8}
    assert st["phase"] == "Pending" and st["attempt"] == 1
    svc = jobs.core.read_namespaced_service("gang-gang", jobs.ns)
    assert svc.spec.cluster_ip == "None"
    # rank pods run as the job's trainer identity, which may patch only its own pods
    assert {p.spec.service_account_name for p in pods} == {"gang-trainer"}
    sa = f"--as=system:serviceaccount:{jobs.ns}:gang-trainer"
    # the trainer identity writes only its job's progress Lease, never a Pod (issue 9)
    lease = naming.progress_lease_name("gang")
    can = [
        control_plane.kubectl(
            "auth", "can-i", "patch", obj, sa, "-n", jobs.ns, check=False
        ).stdout.strip()
        for obj in (
            "pods/gang-a1-r0",
            "pods/gang-a1-r1",
            f"leases.coordination.k8s.io/{lease}",
            "leases.coordination.k8s.io/someone-else",
        )
    ]
    assert can == ["no", "no", "yes", "no"]
    jobs.run_all("gang", 1)
    assert jobs.status("gang")["phase"] == "Running"
    out = control_plane.kubectl("get", "ftj", "gang", "-n", jobs.ns).stdout
    assert "Running" in out


@pytest.mark.parametrize("name", ["7b-sft", "llama.v2"])
def test_names_with_a_leading_digit_or_a_dot_run(jobs: Jobs, nodes: NodeFactory, name: str) -> None:
    nodes(a100=2)
    jobs.create(job(name))
    pods = jobs.wait_scheduled(name, 1, 2)
    svc = pods[0].spec.subdomain
    assert jobs.core.read_namespaced_service(svc, jobs.ns).spec.cluster_ip == "None"
    host = pods[0].spec.hostname
    assert env_of(pods[1])["MASTER_ADDR"] == f"{host}.{svc}.{jobs.ns}.svc"
    jobs.run_all(name, 1)
    c = jobs.cond(name, "Accepted")
    assert c is not None and c["status"] == "True"


def test_a_transient_pod_create_error_is_retried_until_it_succeeds(
    jobs: Jobs,
    nodes: NodeFactory,
    control_plane: ControlPlane,
    operator_process: OperatorProcess,
) -> None:
    """With the token controller frozen, the new trainer ServiceAccount has no token yet and
    the apiserver answers the Pod create with a 500; Kopf's retry must then really run."""
    nodes(a100=1)
    name = f"retry-{uuid.uuid4().hex[:6]}"
    with control_plane.frozen("controller-manager"):
        jobs.create(job(name, resources={"nodes": 1, "gpusPerNode": 8}))
        wait_for(
            "a pod create refused for want of a token",
            lambda: (
                f"{name}-trainer" in operator_process.log()
                and "No API token" in operator_process.log()
            ),
            timeout=60,
        )
        assert jobs.pods(name) == []
    jobs.wait_scheduled(name, 1, 1, timeout=60)
    assert jobs.status(name)["attempt"] == 1


def test_transient_500s_and_409s_on_child_creates_are_retried(
    control_plane: ControlPlane,
    k8s: client.ApiClient,
    kubelet: FakeKubelet,
    nodes: NodeFactory,
    tmp_path: Any,
    operator_process: OperatorProcess,
) -> None:
    """Between the operator and the apiserver, a proxy fails the first applies of the
    trainer's ServiceAccount (500, as while its token does not exist) and ConfigMap (409,
    a field-manager conflict), and the first creates of the Pod (twice 500, then a 409 as
    if it existed already): the job must still get its Pod, once, and be Accepted."""
    ns = f"f-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(k8s).create_namespace({"metadata": {"name": ns}})  # type: ignore[arg-type]
    for claim in CLAIMS:
        kubelet.add_bound_claim(ns, claim)
    base = f"/api/v1/namespaces/{ns}"
    token = (
        'No API token found for service account "flaky-trainer", retry after the token is '
        "automatically created and added to the service account"
    )
    faults = [
        Fault("PATCH", f"^{base}/serviceaccounts/", 500, "etcdserver: request timed out", 2),
        Fault("PATCH", f"^{base}/configmaps/", 409, 'Apply failed with 1 conflict: "kubectl"', 2),
        Fault("POST", f"^{base}/pods$", 500, token, 2),
        Fault("POST", f"^{base}/pods$", 409, 'pods "flaky-a1-r0" already exists', 1),
    ]
    # the session's operator watches every namespace and would make the children itself,
    # past the proxy: it is paused for this test
    operator_process.stop()
    proxy = FaultProxy(control_plane, faults, tmp_path).start()
    op = OperatorProcess(
        control_plane,
        tmp_path,
        extra_env={"GRAFT_WATCH_NAMESPACES": ns, "KUBECONFIG": str(proxy.kubeconfig)},
    )
    jobs = Jobs(k8s, kubelet, ns)
    try:
        op.start()
        nodes(a100=1)
        t0 = time.monotonic()
        jobs.create(job("flaky", resources={"nodes": 1, "gpusPerNode": 8}))
        jobs.wait_scheduled("flaky", 1, 1, timeout=60)
        took = time.monotonic() - t0
        assert [f.hits for f in faults] == [f.times for f in faults], op.log()
        c = jobs.wait_cond("flaky", "Accepted")
        assert jobs.status("flaky")["attempt"] == 1
        assert len(jobs.pods("flaky", live=False)) == 1, "a duplicate pod was created"
        print(f"\n[retries] 7 injected faults, job Accepted with its Pod in {took:.1f}s: {c}")
    finally:
        op.stop()
        proxy.stop()
        client.CustomObjectsApi(k8s).delete_collection_namespaced_custom_object(
            "graft.dev", "v1alpha1", ns, "finetunejobs"
        )
        kubelet.force_delete_pods(ns)
        client.CoreV1Api(k8s).delete_namespace(ns)
        operator_process.start()


def test_bad_storage_is_refused_by_the_schema_or_visibly_before_any_pod(
    jobs: Jobs, nodes: NodeFactory
) -> None:
    nodes(a100=1)
    for uri in ("pvc://../etc", "pvc://models/../../../etc", "pvc://My_Claim/x"):
        with pytest.raises(client.ApiException) as e:
            jobs.create(job("bad-path", baseModel={"uri": uri}))
        assert e.value.status == 422 and "baseModel.uri" in str(e.value.body), uri
    jobs.create(job("from-hub", baseModel={"uri": "hf://meta-llama/Llama-3-8B"}))
    c = jobs.wait_cond("from-hub", "Failed")
    assert c["reason"] == "StorageNotAllowed" and "GRAFT_ALLOW_HUB" in c["message"]
    accepted = jobs.cond("from-hub", "Accepted")
    assert accepted is not None and accepted["status"] == "False"
    events = jobs.core.list_namespaced_event(
        jobs.ns, field_selector="involvedObject.name=from-hub"
    ).items
    assert [ev.reason for ev in events if ev.type == "Warning"] == ["StorageNotAllowed"]
    assert jobs.pods("from-hub") == []
    assert jobs.core.list_namespaced_config_map(jobs.ns).items == [] or all(
        not cm.metadata.name.startswith("from-hub")
        for cm in jobs.core.list_namespaced_config_map(jobs.ns).items
    )


def test_job_no_pool_can_hold_is_refused(jobs: Jobs, nodes: NodeFactory) -> None:
    nodes(a100=1)
    jobs.create(job("huge", resources={"gpus": 64}))  # 8 nodes; the pool holds 4
    c = jobs.wait_cond("huge", "Admitted", "False")
    assert c["reason"] == "Unschedulable"
    assert "maxNodes" in c["message"] or "4" in c["message"], c["message"]
    assert jobs.pods("huge") == []


def test_progress_from_rank0_reaches_status_within_5s(
    jobs: Jobs, nodes: NodeFactory, control_plane: ControlPlane
) -> None:
    nodes(a100=2)
    jobs.create(job("prog"))
    jobs.wait_scheduled("prog", 1, 2)
    jobs.run_all("prog", 1)
    t0 = time.monotonic()
    jobs.report(
        "prog",
        {
            "stage": "sft",
            "step": 120,
            "totalSteps": 400,
            "epoch": 0.3,
            "loss": 1.93,
            "tokensPerSecond": 5230.0,
            "eta": "12m30s",
            "lastCheckpoint": {
                "step": 100,
                "uri": "pvc://models/out/checkpoints/ckpt-s00-00000100",
            },
        },
    )
    wait_for(
        "progress in status",
        lambda: (jobs.status("prog").get("progress") or {}).get("step") == 120,
        timeout=5,
    )
    elapsed = time.monotonic() - t0
    assert elapsed < 5
    out = control_plane.kubectl("get", "ftj", "prog", "-n", jobs.ns).stdout
    assert "120/400" in out and "1.93" in out
    st = jobs.status("prog")
    assert st["lastCheckpoint"]["step"] == 100


Failure = Callable[[Jobs, FakeKubelet, Any], None]


def fail_node_not_ready(jobs: Jobs, kubelet: FakeKubelet, pod: Any) -> None:
    kubelet.set_node_ready(pod.spec.node_name, False)


def fail_node_deleted(jobs: Jobs, kubelet: FakeKubelet, pod: Any) -> None:
    kubelet.delete_node(pod.spec.node_name)


def fail_pod_evicted(jobs: Jobs, kubelet: FakeKubelet, pod: Any) -> None:
    kubelet.evict_pod(jobs.ns, pod.metadata.name)


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (fail_node_not_ready, "NodeLost"),
        (fail_node_deleted, "NodeLost"),
        (fail_pod_evicted, "PodEvicted"),
    ],
    ids=["node-not-ready", "node-deleted", "pod-evicted"],
)
def test_failure_restarts_the_gang_from_the_checkpoint(
    jobs: Jobs, kubelet: FakeKubelet, nodes: NodeFactory, failure: Failure, reason: str
) -> None:
    nodes(a100=4)
    jobs.create(job("rec"))
    jobs.wait_scheduled("rec", 1, 2)
    jobs.run_all("rec", 1)
    ckpt = "pvc://models/out/checkpoints/ckpt-s00-00000200"
    _, rank1 = jobs.pods("rec", 1)
    jobs.report(
        "rec",
        {"step": 210, "totalSteps": 400, "lastCheckpoint": {"step": 200, "uri": ckpt}},
    )
    wait_for("checkpoint in status", lambda: jobs.status("rec").get("lastCheckpoint"))
    t0 = time.monotonic()
    failure(jobs, kubelet, rank1)
    wait_for("restart noticed", lambda: jobs.status("rec").get("restarts") == 1, timeout=10)
    detected = time.monotonic() - t0
    assert detected < 10
    new = jobs.wait_scheduled("rec", 2, 2)
    assert rank1.spec.node_name not in {p.spec.node_name for p in new}
    for p in new:
        assert env_of(p)["GRAFT_RESUME_FROM"] == ckpt
        assert env_of(p)["GRAFT_ATTEMPT"] == "2"
    cm = jobs.core.read_namespaced_config_map("rec-config", jobs.ns)
    config = json.loads(cm.data["job.json"])
    assert config["resumeFrom"] == ckpt and config["attempt"] == 2
    st = jobs.status("rec")
    assert st["lastFailure"]["reason"] == reason
    assert st["attempt"] == 2
    jobs.run_all("rec", 2)
    c = jobs.cond("rec", "Restarting")
    assert c is not None and c["status"] == "False"


def test_max_restarts_fails_the_job(jobs: Jobs, kubelet: FakeKubelet, nodes: NodeFactory) -> None:
    nodes(a100=2)
    jobs.create(
        job(
            "flaky",
            resources={"nodes": 1, "gpusPerNode": 8},
            restartPolicy={"maxRestarts": 1, "backoffSeconds": 0},
        )
    )
    for attempt in (1, 2):
        (pod,) = jobs.wait_scheduled("flaky", attempt, 1)
        kubelet.run_pod(jobs.ns, pod.metadata.name)
        kubelet.evict_pod(jobs.ns, pod.metadata.name)
    c = jobs.wait_cond("flaky", "Failed")
    assert c["reason"] == "MaxRestartsExceeded"
    assert "maxRestarts" in c["message"]
    st = jobs.status("flaky")
    assert st["phase"] == "Failed" and st["restarts"] == 1 and st["attempt"] == 2


def test_user_error_fails_without_retry(
    jobs: Jobs, kubelet: FakeKubelet, nodes: NodeFactory
) -> None:
    nodes(a100=2)
    jobs.create(job("usererr"))
    jobs.wait_scheduled("usererr", 1, 2)
    jobs.run_all("usererr", 1)
    rank0 = jobs.pods("usererr", 1)[0]
    kubelet.finish_pod(
        jobs.ns,
        rank0.metadata.name,
        10,
        {
            "reason": "MalformedDataset",
            "retryable": False,
            "message": "data/sft.jsonl line 7: not valid JSON; fix or remove that line",
        },
    )
    c = jobs.wait_cond("usererr", "Failed")
    assert "line 7" in c["message"]
    time.sleep(2)  # would a new attempt appear? it must not
    st = jobs.status("usererr")
    assert st["attempt"] == 1 and st.get("restarts", 0) == 0
    assert jobs.pods("usererr", 2) == []


def test_suspend_and_resume(jobs: Jobs, kubelet: FakeKubelet, nodes: NodeFactory) -> None:
    nodes(a100=2)
    jobs.create(job("sus", resources={"nodes": 1, "gpusPerNode": 8}))
    (pod,) = jobs.wait_scheduled("sus", 1, 1)
    kubelet.run_pod(jobs.ns, pod.metadata.name)
    jobs.wait_cond("sus", "Running")
    jobs.patch("sus", {"suspend": True})
    jobs.wait_cond("sus", "Suspended")
    wait_for("pods told to stop", lambda: not jobs.pods("sus", 1))
    assert jobs.status("sus")["phase"] == "Suspended"
    jobs.patch("sus", {"suspend": False})
    jobs.wait_scheduled("sus", 2, 1, timeout=60)
    assert jobs.status("sus").get("restarts", 0) == 0


def test_spec_change_of_started_job_is_refused(jobs: Jobs, nodes: NodeFactory) -> None:
    nodes(a100=2)
    jobs.create(job("frozen", resources={"nodes": 1, "gpusPerNode": 8}))
    jobs.wait_scheduled("frozen", 1, 1)
    jobs.patch("frozen", {"hyperparameters": {"learningRate": 0.1}})
    c = jobs.wait_cond("frozen", "Accepted", "False")
    assert c["reason"] == "SpecChangeRefused"
    assert len(jobs.pods("frozen")) == 1


@pytest.fixture
def own_operator(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory, k8s: client.ApiClient
) -> Iterator[tuple[OperatorProcess, str]]:
    """A namespace that only a dedicated operator (which the test may kill) watches."""
    ns = f"k-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(k8s).create_namespace({"metadata": {"name": ns}})  # type: ignore[arg-type]
    op = OperatorProcess(
        control_plane, tmp_path_factory.mktemp("op-kill"), extra_env={"GRAFT_WATCH_NAMESPACES": ns}
    )
    yield op, ns
    op.stop()
    FakeKubelet(k8s).force_delete_pods(ns)
    client.CoreV1Api(k8s).delete_namespace(ns)


def test_operator_killed_mid_reconcile_loses_nothing(
    own_operator: tuple[OperatorProcess, str],
    k8s: client.ApiClient,
    kubelet: FakeKubelet,
    nodes: NodeFactory,
) -> None:
    op, ns = own_operator
    jobs = Jobs(k8s, kubelet, ns)
    for claim in CLAIMS:
        kubelet.add_bound_claim(ns, claim)
    nodes(a100=4)
    op.start()
    names = [f"kill-{i}" for i in range(4)]
    for n in names:
        jobs.create(job(n, resources={"nodes": 1, "gpusPerNode": 8}))
    # kill -9 while the first pods are being created
    wait_for("first pod", lambda: any(jobs.pods(n) for n in names), timeout=30, interval=0.05)
    op.kill()
    op.start()
    for n in names:
        jobs.wait_scheduled(n, 1, 1, timeout=60)
    for n in names:
        st = jobs.status(n)
        assert st["attempt"] == 1, st
        assert len(jobs.pods(n, live=False)) == 1, "a duplicate pod was created"
        c = jobs.cond(n, "Accepted")
        assert c is not None and c["status"] == "True"


def test_trainer_identity_writes_only_its_lease(
    jobs: Jobs, nodes: NodeFactory, k8s: client.ApiClient
) -> None:
    """The trainer's ServiceAccount may update its job's Lease, and nothing on Pods (it
    could relabel itself into a Service or drop its owner) nor another job's Lease."""
    nodes(a100=4)
    jobs.create(job("ida"))
    jobs.create(job("idb"))
    jobs.wait_scheduled("ida", 1, 2)
    jobs.wait_scheduled("idb", 1, 2)
    jobs.run_all("ida", 1)
    jobs.report("ida", {"step": 1, "totalSteps": 10})
    lease = client.CoordinationV1Api(k8s).read_namespaced_lease("ida-progress", jobs.ns)
    assert lease.spec.holder_identity == "ida-a1-r0" and lease.spec.renew_time is not None
    assert lease.metadata.owner_references[0].kind == "FineTuneJob"
    trainer = jobs.as_trainer("ida")
    pod = jobs.pods("ida", 1)[0].metadata.name
    denied = [
        lambda: client.CoreV1Api(trainer).patch_namespaced_pod(
            pod, jobs.ns, {"metadata": {"labels": {"app": "serve"}}}
        ),
        lambda: client.CoreV1Api(trainer).read_namespaced_pod(pod, jobs.ns),
        lambda: client.CoordinationV1Api(trainer).patch_namespaced_lease(
            "idb-progress", jobs.ns, {"metadata": {"annotations": {"x": "y"}}}
        ),
        lambda: client.CoordinationV1Api(trainer).delete_namespaced_lease("ida-progress", jobs.ns),
    ]
    for call in denied:
        with pytest.raises(client.ApiException) as e:
            call()
        assert e.value.status == 403


def test_forged_output_uri_is_ignored_with_one_event_per_forged_report(
    jobs: Jobs, nodes: NodeFactory
) -> None:
    nodes(a100=2)
    jobs.create(job("forge"))
    jobs.wait_scheduled("forge", 1, 2)
    jobs.run_all("forge", 1)
    forged = {
        "lastCheckpoint": {"step": 5, "uri": "pvc://other-team/ckpt-s00-00000005"},
        "output": {"uri": "s3://attacker/model", "kind": "adapter"},
    }
    # the same forged report renewed three times (three passes), then another one
    for step in (7, 8, 9):
        jobs.report("forge", {"step": step, "totalSteps": 10} | forged)
        wait_for(
            f"step {step}",
            lambda s=step: (jobs.status("forge").get("progress") or {}).get("step") == s,
        )
    st = jobs.status("forge")
    assert (
        "lastCheckpoint" not in st and (st.get("output") or {}).get("uri") != "s3://attacker/model"
    )
    other = {"output": {"uri": "s3://attacker/other", "kind": "adapter"}}
    jobs.report("forge", {"step": 10, "totalSteps": 10} | other)

    def warnings() -> list[str]:
        events = jobs.core.list_namespaced_event(
            jobs.ns, field_selector="involvedObject.name=forge,reason=UntrustedReport"
        ).items
        return [e.message for e in events]

    # Kopf posts Events in order, so once the second report's is there, every pass's
    # Event about the first is too
    wait_for("second report's Event", lambda: any("s3://attacker/other" in m for m in warnings()))
    first = [m for m in warnings() if "s3://attacker/model" in m]
    assert len(first) == 1 and "pvc://other-team" in first[0], warnings()
    assert len(warnings()) == 2, warnings()


def test_silent_running_gang_is_trainer_hung_and_resumes_from_checkpoint(
    jobs: Jobs, nodes: NodeFactory
) -> None:
    nodes(a100=4)
    jobs.create(job("hang", restartPolicy={"maxRestarts": 3, "heartbeatTimeoutSeconds": 5}))
    jobs.wait_scheduled("hang", 1, 2)
    jobs.run_all("hang", 1)
    ckpt = "pvc://models/out/checkpoints/ckpt-s00-00000020"
    jobs.report(
        "hang", {"step": 25, "totalSteps": 100, "lastCheckpoint": {"step": 20, "uri": ckpt}}
    )
    t0 = time.monotonic()
    c = jobs.wait_cond("hang", "Restarting", timeout=20)
    assert c["reason"] == "TrainerHung" and "no heartbeat from rank 0" in c["message"]
    assert 4 <= time.monotonic() - t0 < 15
    new = jobs.wait_scheduled("hang", 2, 2)
    assert all(env_of(p)["GRAFT_RESUME_FROM"] == ckpt for p in new)
