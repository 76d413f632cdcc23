"""The foundation on a real control plane: CRDs, schema validation, the operator accepting."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from graft.testing.cluster import wait_for
from graft.testing.controlplane import ControlPlane
from graft.testing.operator import OperatorProcess

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def ftj(name: str, **spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "baseModel": {"uri": "pvc://models/llama"},
        "stages": [{"type": "SFT", "dataset": {"uri": "pvc://data/sft.jsonl", "format": "alpaca"}}],
        "output": {"uri": "pvc://models/out"},
        "resources": {"gpus": 8},
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def apply(cp: ControlPlane, ns: str, obj: dict[str, Any]) -> Any:
    # --validate=false: the apiserver's own schema check must refuse, not kubectl's copy of it
    return cp.kubectl(
        "apply", "--validate=false", "-n", ns, "-f", "-", input=json.dumps(obj), check=False
    )


def get(k8s: client.ApiClient, ns: str, plural: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = client.CustomObjectsApi(k8s).get_namespaced_custom_object(
        "graft.dev", "v1alpha1", ns, plural, name
    )
    return out


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return dict(c)
    return None


def test_crds_are_established_with_short_names(control_plane: ControlPlane) -> None:
    out = control_plane.kubectl("api-resources", "--api-group=graft.dev", "-o", "wide").stdout
    assert "ftj" in out and "msvc" in out
    assert "finetunejobs" in out and "modelservices" in out


def test_kubectl_explain_prints_field_descriptions(control_plane: ControlPlane) -> None:
    # the apiserver publishes a new CRD's OpenAPI a few seconds after it is Established
    out = wait_for(
        "explain",
        lambda: control_plane.kubectl("explain", "finetunejob.spec.stages", check=False).stdout,
        timeout=30,
    )
    assert "Ordered training stages" in out
    assert "ContinuedPretraining" in out
    out = control_plane.kubectl("explain", "modelservice.spec.autoscaling.minReplicas").stdout
    assert "scales GPU workers to zero" in out


# (name, mutate(spec), words the apiserver's message must contain)
BAD: list[tuple[str, Any, list[str]]] = [
    ("wrong-type-gpus", lambda s: s["resources"].update(gpus="eight"), ["spec.resources.gpus"]),
    ("negative-gpus", lambda s: s["resources"].update(gpus=-1), ["spec.resources.gpus"]),
    ("unknown-method", lambda s: s.update(method="prefix-tuning"), ["spec.method", "lora"]),
    ("missing-dataset", lambda s: s["stages"][0].pop("dataset"), ["dataset", "Required"]),
    ("bad-uri-scheme", lambda s: s["baseModel"].update(uri="ftp://x/y"), ["spec.baseModel.uri"]),
    ("no-stages", lambda s: s.update(stages=[]), ["spec.stages"]),
    ("unknown-stage-type", lambda s: s["stages"][0].update(type="RLHF"), ["spec.stages"]),
    ("unknown-format", lambda s: s["stages"][0]["dataset"].update(format="parquet"), ["format"]),
    (
        "lr-zero",
        lambda s: s.update(hyperparameters={"learningRate": 0}),
        ["spec.hyperparameters.learningRate"],
    ),
    (
        "bad-precision",
        lambda s: s.update(hyperparameters={"precision": "int8"}),
        ["spec.hyperparameters.precision"],
    ),
    ("bad-duration", lambda s: s.update(checkpoint={"every": "soon"}), ["spec.checkpoint.every"]),
    ("lora-rank-zero", lambda s: s.update(lora={"r": 0}), ["spec.lora.r"]),
    ("missing-output", lambda s: s.pop("output"), ["spec.output", "Required"]),
    ("dropout-one", lambda s: s.update(lora={"dropout": 1.0}), ["spec.lora.dropout"]),
    (
        "bad-pool-name",
        lambda s: s["resources"].update(nodePool="A100_80G"),
        ["spec.resources.nodePool"],
    ),
]


@pytest.mark.parametrize(("name", "mutate", "words"), BAD, ids=[b[0] for b in BAD])
def test_apiserver_refuses_invalid_finetunejob(
    control_plane: ControlPlane, namespace: str, name: str, mutate: Any, words: list[str]
) -> None:
    obj = ftj(name)
    mutate(obj["spec"])
    r = apply(control_plane, namespace, obj)
    assert r.returncode != 0, f"apiserver accepted an invalid spec: {obj['spec']}"
    for w in words:
        assert w in r.stderr, f"{w!r} not in: {r.stderr}"


def test_apiserver_refuses_invalid_modelservice(
    control_plane: ControlPlane, namespace: str
) -> None:
    base = yaml.safe_load((EXAMPLES / "modelservice.yaml").read_text())
    cases = [
        (lambda s: s["autoscaling"].update(minReplicas=-1), "spec.autoscaling.minReplicas"),
        (lambda s: s.update(engine="tgi"), "spec.engine"),
        (
            lambda s: s["model"]["adapters"].append(
                {"name": "both", "uri": "pvc://a/b", "fromFineTuneJob": "x"}
            ),
            "oneOf",
        ),
        (lambda s: s["model"]["adapters"].append({"name": "neither"}), "oneOf"),
    ]
    for mutate, word in cases:
        obj = copy.deepcopy(base)
        mutate(obj["spec"])
        r = apply(control_plane, namespace, obj)
        assert r.returncode != 0 and word in r.stderr, r.stderr


def test_examples_apply_and_print_columns(
    control_plane: ControlPlane,
    operator_process: OperatorProcess,
    k8s: client.ApiClient,
    namespace: str,
) -> None:
    r = control_plane.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES))
    assert "finetunejob.graft.dev/support-assistant created" in r.stdout
    assert "modelservice.graft.dev/llama-3-8b created" in r.stdout
    wait_for(
        "examples accepted",
        lambda: all(
            (c := condition(get(k8s, namespace, plural, name), "Accepted"))
            and c["status"] == "True"
            for plural, name in [
                ("finetunejobs", "support-assistant"),
                ("finetunejobs", "energy-llm"),
                ("modelservices", "llama-3-8b"),
            ]
        ),
        timeout=30,
    )
    out = control_plane.kubectl("get", "ftj,msvc", "-n", namespace).stdout
    header = out.splitlines()[0]
    for col in ("NAME", "PHASE", "PROGRESS", "LOSS", "RESTARTS", "AGE"):
        assert col in header, out
    assert "READY" in out and "REPLICAS" in out
    out = control_plane.kubectl("get", "graft", "-n", namespace, "-o", "name").stdout
    assert "finetunejob.graft.dev/energy-llm" in out


def test_valid_job_is_accepted_by_the_operator(
    control_plane: ControlPlane,
    operator_process: OperatorProcess,
    k8s: client.ApiClient,
    namespace: str,
) -> None:
    assert apply(control_plane, namespace, ftj("ok-job")).returncode == 0
    obj = wait_for(
        "Accepted=True",
        lambda: (
            (o := get(k8s, namespace, "finetunejobs", "ok-job"))
            and (c := condition(o, "Accepted"))
            and c["status"] == "True"
            and o
        ),
    )
    c = condition(obj, "Accepted")
    assert c is not None and c["reason"] == "Valid"
    assert c["observedGeneration"] == obj["metadata"]["generation"]
    # FineTuneJobs are driven from watch events (docs/operator.md): Kopf keeps no
    # bookkeeping on them, neither kopf.zalando.org annotations nor status.graft, and no
    # finalizer (children go with owner references)
    time.sleep(2)  # a bookkeeping PATCH would follow the status write within a pass
    obj = get(k8s, namespace, "finetunejobs", "ok-job")
    annotations = obj["metadata"].get("annotations", {})
    assert not any(k.startswith("kopf.zalando.org") for k in annotations), annotations
    assert "graft" not in obj["status"], obj["status"]["graft"]
    assert not obj["metadata"].get("finalizers"), obj["metadata"]["finalizers"]


def test_cross_field_error_becomes_an_invalid_spec_condition(
    control_plane: ControlPlane,
    operator_process: OperatorProcess,
    k8s: client.ApiClient,
    namespace: str,
) -> None:
    # The schema cannot say "a multiple of": the operator reports it, naming the field.
    obj = ftj("bad-batch", hyperparameters={"globalBatchSize": 10, "microBatchSize": 4})
    assert apply(control_plane, namespace, obj).returncode == 0
    got = wait_for(
        "Failed=True",
        lambda: (
            (o := get(k8s, namespace, "finetunejobs", "bad-batch"))
            and (c := condition(o, "Failed"))
            and c["status"] == "True"
            and o
        ),
    )
    c = condition(got, "Failed")
    assert c is not None and c["reason"] == "InvalidSpec"
    assert "spec.hyperparameters" in c["message"] and "globalBatchSize" in c["message"]
    assert got["status"]["phase"] == "Failed"
    events = control_plane.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert "InvalidSpec" in events
