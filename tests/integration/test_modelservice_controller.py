"""The ModelService controller on a real control plane with KubeRay's CRDs installed.

KubeRay's Go operator cannot run here; ``write_status_as_kuberay`` (a stand-in for it)
writes RayService status the way it does, which is all the controller reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from graft.testing.cluster import FakeKubelet, wait_for
from graft.testing.operator import OperatorProcess

KUBERAY = Path(__file__).resolve().parents[3] / "shared" / "thirdparty" / "kuberay"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not KUBERAY.is_dir(), reason=f"KubeRay CRDs not found at {KUBERAY}"),
]


def msvc(name: str, adapters: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"baseModel": {"uri": "pvc://models/llama-8b"}, "adapters": adapters},
        "resources": {"gpusPerReplica": 1},
        "autoscaling": {"minReplicas": 0, "maxReplicas": 4},
    }
    body.update(spec)
    return {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {"name": name},
        "spec": body,
    }


class Api:
    def __init__(self, k8s: client.ApiClient, ns: str) -> None:
        self.custom = client.CustomObjectsApi(k8s)
        self.ns = ns

    def create(self, plural: str, obj: dict[str, Any]) -> None:
        group, version = obj["apiVersion"].split("/")
        self.custom.create_namespaced_custom_object(group, version, self.ns, plural, obj)

    def get(self, group: str, version: str, plural: str, name: str) -> dict[str, Any] | None:
        try:
            out: dict[str, Any] = self.custom.get_namespaced_custom_object(
                group, version, self.ns, plural, name
            )
            return out
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def msvc(self, name: str) -> dict[str, Any]:
        out = self.get("graft.dev", "v1alpha1", "modelservices", name)
        assert out is not None
        return out

    def rayservice(self, name: str) -> dict[str, Any] | None:
        return self.get("ray.io", "v1", "rayservices", name)

    def cond(self, name: str, type_: str) -> dict[str, Any] | None:
        return next(
            (
                c
                for c in self.msvc(name).get("status", {}).get("conditions", [])
                if c["type"] == type_
            ),
            None,
        )

    def write_status_as_kuberay(self, name: str, *, ready: bool, workers: int = 1) -> None:
        """What KubeRay's controller writes once the Serve app runs (a stand-in for it)."""
        rsvc = self.rayservice(name)
        assert rsvc is not None
        now = "2026-11-25T21:00:00Z"
        status = {
            "observedGeneration": rsvc["metadata"]["generation"],
            "serviceStatus": "Running" if ready else "",
            "numServeEndpoints": workers if ready else 0,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "False",
                    "reason": "NonZeroServeEndpoints" if ready else "Initializing",
                    "message": "Number of serve endpoints is greater than 0"
                    if ready
                    else "RayService is initializing",
                    "lastTransitionTime": now,
                },
                {
                    "type": "UpgradeInProgress",
                    "status": "False",
                    "reason": "NoPendingCluster",
                    "message": "no pending cluster",
                    "lastTransitionTime": now,
                },
            ],
            "activeServiceStatus": {
                "rayClusterName": f"{name}-abcde",
                "applicationStatuses": {
                    "llm": {
                        "status": "RUNNING" if ready else "DEPLOYING",
                        "serveDeploymentStatuses": {
                            "LLMServer": {"status": "HEALTHY" if ready else "UPDATING"}
                        },
                    }
                },
                "rayClusterStatus": {
                    "desiredWorkerReplicas": workers,
                    "readyWorkerReplicas": workers if ready else 0,
                    "availableWorkerReplicas": workers if ready else 0,
                },
            },
        }
        self.custom.patch_namespaced_custom_object_status(
            "ray.io", "v1", self.ns, "rayservices", name, {"status": status}
        )


@pytest.fixture
def api(k8s: client.ApiClient, namespace: str, operator_process: OperatorProcess) -> Api:
    return Api(k8s, namespace)


def serve_config(rsvc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = yaml.safe_load(rsvc["spec"]["serveConfigV2"])
    return out


def adapters_in(rsvc: dict[str, Any]) -> list[str]:
    deployments = serve_config(rsvc)["applications"][0]["deployments"]
    return [a["name"] for a in deployments[0]["user_config"]["adapters"]]


def test_rendered_rayservice_is_accepted_and_status_makes_it_ready(api: Api) -> None:
    api.create("modelservices", msvc("chat", [{"name": "legal", "uri": "pvc://models/legal"}]))
    rsvc = wait_for("RayService accepted by the apiserver", lambda: api.rayservice("chat"))
    workers = rsvc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert workers[0]["minReplicas"] == 0 and workers[0]["maxReplicas"] == 4
    assert rsvc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    pod = workers[0]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
    assert adapters_in(rsvc) == ["legal"]
    assert rsvc["metadata"]["ownerReferences"][0]["kind"] == "ModelService"
    c = api.cond("chat", "Ready")
    assert c is not None and c["status"] == "False"
    # Pending until the operator's pass that sees the RayService it created
    wait_for("Deploying", lambda: api.msvc("chat")["status"]["phase"] == "Deploying")

    api.write_status_as_kuberay("chat", ready=True, workers=2)
    wait_for("Ready", lambda: (c := api.cond("chat", "Ready")) and c["status"] == "True")
    st = api.msvc("chat")["status"]
    assert st["phase"] == "Ready"
    assert st["endpoint"] == f"http://chat-serve-svc.{api.ns}.svc:8000/v1"
    assert st["readyReplicas"] == 2 and st["replicas"] == 2
    assert st["adapters"] == ["legal"]


def test_missing_finetunejob_gives_a_clear_condition(api: Api) -> None:
    api.create("modelservices", msvc("svc", [{"name": "a", "fromFineTuneJob": "nope"}]))
    c = wait_for("AdaptersReady=False", lambda: api.cond("svc", "AdaptersReady"))
    assert c["status"] == "False" and c["reason"] == "AdapterUnavailable"
    assert "'nope' not found" in c["message"]
    # the base model is still served meanwhile
    rsvc = wait_for("RayService", lambda: api.rayservice("svc"))
    assert adapters_in(rsvc) == []


def test_succeeded_job_adds_its_adapter_in_place(
    api: Api, k8s: client.ApiClient, kubelet: FakeKubelet, nodes: Any
) -> None:
    for claim in ("models", "data"):
        kubelet.add_bound_claim(api.ns, claim)
    nodes(a100=1)
    api.create("finetunejobs", finetunejob("support"))
    api.create(
        "modelservices",
        msvc(
            "svc2",
            [
                {"name": "legal", "uri": "pvc://models/legal"},
                {"name": "support", "fromFineTuneJob": "support"},
            ],
        ),
    )
    before = wait_for("RayService", lambda: api.rayservice("svc2"))
    assert adapters_in(before) == ["legal"]
    c = wait_for("waiting", lambda: api.cond("svc2", "AdaptersReady"))
    assert c["reason"] == "WaitingForFineTuneJob"

    finish_job(
        api,
        k8s,
        kubelet,
        "support",
        {
            "state": "succeeded",
            "output": {"uri": "pvc://models/adapters/support", "kind": "adapter"},
        },
    )

    after = wait_for(
        "adapter added", lambda: (r := api.rayservice("svc2")) and "support" in adapters_in(r) and r
    )
    assert adapters_in(after) == ["legal", "support"]
    user_config = serve_config(after)["applications"][0]["deployments"][0]["user_config"]
    assert {"name": "support", "uri": "pvc://models/adapters/support"} in user_config["adapters"]
    # the Ray cluster is not replaced: same cluster spec, same hash
    assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]
    key = "graft.dev/spec-hash"
    assert after["metadata"]["annotations"][key] == before["metadata"]["annotations"][key]
    c = wait_for(
        "AdaptersReady",
        lambda: (c := api.cond("svc2", "AdaptersReady")) and c["status"] == "True" and c,
    )
    assert c["reason"] == "AllResolved"


def finetunejob(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "baseModel": {"uri": "pvc://models/llama-8b"},
        "stages": [{"type": "SFT", "dataset": {"uri": "pvc://data/sft.jsonl", "format": "alpaca"}}],
        "output": {"uri": f"pvc://models/adapters/{name}"},
        "resources": {"nodes": 1, "gpusPerNode": 8},
    }
    body.update(spec)
    return {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": body,
    }


def finish_job(
    api: Api, k8s: client.ApiClient, kubelet: FakeKubelet, name: str, report: dict[str, Any]
) -> dict[str, Any]:
    """The job's trainer pod runs, reports ``report`` as its trainer would, and exits 0;
    returns the job once Succeeded."""
    pod = wait_for("trainer pod", lambda: kubelet.pods(api.ns, f"graft.dev/job={name}"))[0]
    kubelet.run_pod(api.ns, pod.metadata.name)
    progress = {"attempt": 1, "step": 50, "totalSteps": 50, **report}
    client.CoordinationV1Api(k8s).patch_namespaced_lease(
        f"{name}-progress",
        api.ns,
        {"metadata": {"annotations": {"graft.dev/progress": json.dumps(progress)}}},
    )

    def job() -> dict[str, Any]:
        return api.get("graft.dev", "v1alpha1", "finetunejobs", name) or {}

    wait_for("progress seen", lambda: job().get("status", {}).get("output"))
    kubelet.finish_pod(api.ns, pod.metadata.name, 0)
    return wait_for(
        "Succeeded", lambda: (j := job()).get("status", {}).get("phase") == "Succeeded" and j
    )


def test_failed_evaluation_gate_keeps_the_adapter_out_until_allowed(
    api: Api, k8s: client.ApiClient, kubelet: FakeKubelet, nodes: Any
) -> None:
    for claim in ("models", "data"):
        kubelet.add_bound_claim(api.ns, claim)
    nodes(a100=1)
    evaluation = {
        "datasets": [{"name": "held-out", "uri": "pvc://data/held-out.jsonl", "format": "jsonl"}],
        "gate": {"maxPerplexityRatio": 0.8},
    }
    api.create("finetunejobs", finetunejob("worse", evaluation=evaluation))
    api.create(
        "modelservices",
        msvc(
            "gated",
            [
                {"name": "legal", "uri": "pvc://models/legal"},
                {"name": "worse", "fromFineTuneJob": "worse"},
            ],
        ),
    )
    # The trainer's figures: perplexity 20 -> 19 (ratio 0.95 > 0.8); its own "passed" claim
    # counts for nothing, the operator recomputes the verdict.
    figures = {"loss": 2.9, "perplexity": 19.0}
    job = finish_job(
        api,
        k8s,
        kubelet,
        "worse",
        {
            "state": "succeeded",
            "output": {"uri": "pvc://models/adapters/worse", "kind": "adapter"},
            "evaluation": {
                "baseline": {"loss": 3.0, "perplexity": 20.0},
                "stages": [{"name": "stage-0", **figures}],
                "final": figures,
                "passed": True,
            },
        },
    )
    assert job["status"]["evaluation"]["passed"] is False

    c = wait_for(
        "gate refusal",
        lambda: (
            (c := api.cond("gated", "AdaptersReady"))
            and c["reason"] == "EvaluationGateFailed"
            and c
        ),
    )
    assert c["status"] == "False"
    assert "FineTuneJob 'worse' did not pass its evaluation gate" in c["message"]
    assert "allowUnevaluated: true" in c["message"]
    rsvc = api.rayservice("gated")
    assert rsvc is not None and adapters_in(rsvc) == ["legal"]

    # an explicit override serves it, in place
    api.custom.patch_namespaced_custom_object(
        "graft.dev",
        "v1alpha1",
        api.ns,
        "modelservices",
        "gated",
        {
            "spec": {
                "model": {
                    "adapters": [
                        {"name": "legal", "uri": "pvc://models/legal"},
                        {"name": "worse", "fromFineTuneJob": "worse", "allowUnevaluated": True},
                    ]
                }
            }
        },
    )
    wait_for(
        "served when allowed",
        lambda: (r := api.rayservice("gated")) and adapters_in(r) == ["legal", "worse"],
    )
    c = wait_for(
        "AdaptersReady",
        lambda: (c := api.cond("gated", "AdaptersReady")) and c["status"] == "True" and c,
    )
    assert c["reason"] == "AllResolved"


def test_base_model_change_rolls_the_cluster(api: Api) -> None:
    # A base model on another claim needs a new volume: a new Ray cluster (KubeRay rolls it
    # when rayClusterConfig changes). On the same claim only the Serve app is redeployed.
    api.create("modelservices", msvc("roll", []))
    before = wait_for("RayService", lambda: api.rayservice("roll"))
    api.custom.patch_namespaced_custom_object(
        "graft.dev",
        "v1alpha1",
        api.ns,
        "modelservices",
        "roll",
        {"spec": {"model": {"baseModel": {"uri": "pvc://big-models/llama-70b"}}}},
    )
    key = "graft.dev/spec-hash"
    after = wait_for(
        "new cluster spec",
        lambda: (
            (r := api.rayservice("roll"))
            and r["metadata"]["annotations"][key] != before["metadata"]["annotations"][key]
            and r
        ),
    )
    assert after["spec"]["rayClusterConfig"] != before["spec"]["rayClusterConfig"]
    args = serve_config(after)["applications"][0]["args"]
    assert args["model"]["uri"] == "pvc://big-models/llama-70b"
