"""Serving's security, from the pure builders and decide: restricted Ray pods, Ray token
auth, API keys, the NetworkPolicy, bounded quantities, untrusted adapter URIs."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest
import yaml
from test_serve_builders import A100, ADAPTERS, MS, SETTINGS, _crd_validator, render

from graft.api.common import quantity
from graft.api.modelservice import ModelService
from graft.builders import rayservice as rs
from graft.builders.serve_config import API_KEYS_FILE, build_serve_config
from graft.config import Settings
from graft.reconcile import modelservice as ms
from graft.testing.kuberay_pods import kuberay_pods
from graft.testing.pss import all_violations, restricted_violations

NOW = dt.datetime(2026, 12, 1, 3, 0, tzinfo=dt.UTC)


AUTHED = (
    MS()
    .set("auth.apiKeySecretRef", {"name": "chat-keys", "key": "keys.txt"})
    .set("network.allowFromNamespaces", ["web", "team-a"])
    .set("network.allowFromNamespaceLabels", {"graft.dev/clients": "chat"})
)

CASES = {
    "gpu": MS().obj(),
    "cpu": MS().set("resources.gpusPerReplica", 0).set("resources.nodePool", None).obj(),
    "scale-to-zero": MS().set("autoscaling.minReplicas", 0).set("resources.memory", "64Gi").obj(),
    "auth+network": AUTHED.obj(),
}


def _render(msvc: ModelService) -> dict[str, Any]:
    pool = A100 if msvc.spec.resources.gpus_per_replica else None
    return rs.build_rayservice(msvc, ADAPTERS, SETTINGS, pool=pool)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_ray_pod_is_restricted(case: str) -> None:
    pods = kuberay_pods(_render(CASES[case]))
    assert set(pods) == {"head", "worker"}
    for role, spec in pods.items():
        names = [c["name"] for c in spec["containers"] + spec.get("initContainers", [])]
        expected = (
            ["ray-head", "autoscaler"] if role == "head" else ["ray-worker", "wait-gcs-ready"]
        )
        assert names == expected
        assert all_violations(spec) == [], f"{role}: {all_violations(spec)}"


def test_the_checker_catches_what_main_rendered() -> None:
    """Main @a9d1bd3 set no pod securityContext, no read-only root, no shm sizeLimit and no
    autoscaler securityContext; each of those is caught."""
    rendered = _render(CASES["gpu"])
    cluster = rendered["spec"]["rayClusterConfig"]
    del cluster["autoscalerOptions"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    del head["securityContext"]
    head["containers"][0]["securityContext"] = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    head["volumes"][0]["emptyDir"] = {"medium": "Memory"}
    found = all_violations(kuberay_pods(rendered)["head"])
    assert any("containers[autoscaler]: allowPrivilegeEscalation" in f for f in found)
    assert any("readOnlyRootFilesystem" in f for f in found)
    assert any("runAsUser" in f for f in found)
    assert any("needs a sizeLimit" in f for f in found)
    assert restricted_violations({"containers": [{"name": "x"}], "volumes": []})


def test_worker_memory_and_shm() -> None:
    worker = kuberay_pods(_render(CASES["scale-to-zero"]))["worker"]
    ray = worker["containers"][0]
    assert ray["resources"]["limits"]["memory"] == ray["resources"]["requests"]["memory"]
    shm = next(v for v in worker["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32768Mi"}
    gpu = kuberay_pods(_render(CASES["gpu"]))["worker"]["containers"][0]
    assert gpu["resources"]["limits"]["memory"] == "32Gi"
    mounts = {m["mountPath"] for m in ray["volumeMounts"]}
    assert {"/tmp", "/dev/shm", "/mnt/pvc/models"} <= mounts


def test_ray_token_auth_and_closed_ports() -> None:
    rendered = _render(CASES["gpu"])
    cluster = rendered["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "chat-ray-token"}
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 10001 not in {p["containerPort"] for p in head["ports"]}
    secret = rs.build_ray_token_secret(CASES["gpu"], "t0ken")
    assert secret == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "chat-ray-token",
            "namespace": "team-a",
            "labels": rs.labels(CASES["gpu"]),
        },
        "type": "Opaque",
        "stringData": {"auth_token": "t0ken"},
    }


def test_api_key_secret_is_mounted_and_named_in_the_args() -> None:
    msvc = CASES["auth+network"]
    app = build_serve_config(msvc, [])["applications"][0]
    assert app["args"]["apiKeyFile"] == API_KEYS_FILE
    assert "apiKeyFile" not in build_serve_config(CASES["gpu"], [])["applications"][0]["args"]
    worker = _render(msvc)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    vol = next(v for v in worker["volumes"] if v["name"] == "api-keys")
    assert vol["secret"] == {
        "secretName": "chat-keys",
        "items": [{"key": "keys.txt", "path": "keys"}],
        "defaultMode": 0o440,
    }
    [mount] = [m for m in worker["containers"][0]["volumeMounts"] if m["name"] == "api-keys"]
    assert f"{mount['mountPath']}/keys" == API_KEYS_FILE and mount["readOnly"] is True


def test_network_policy() -> None:
    own = {"graft.dev/modelservice": "chat"}
    dashboard_from = {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
    }
    operator = {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "graft"}},
    }
    assert rs.build_network_policy(CASES["gpu"], SETTINGS)["spec"] == {
        "podSelector": {"matchLabels": own},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": own}}]},
            {"from": [dashboard_from], "ports": [{"protocol": "TCP", "port": 8265}]},
            {"from": [{"podSelector": {}}, operator], "ports": [{"protocol": "TCP", "port": 8000}]},
        ],
    }
    settings = Settings(node_pools=[A100], kuberay_namespace="ray-system")
    policy = rs.build_network_policy(CASES["auth+network"], settings)
    assert policy["metadata"]["name"] == "chat-ray"
    ingress = policy["spec"]["ingress"]
    assert ingress[1]["from"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "ray-system"}
    }
    assert ingress[2]["from"] == [
        {"podSelector": {}},
        operator,
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "web"}}},
        {"namespaceSelector": {"matchLabels": {"graft.dev/clients": "chat"}}},
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_hardened_rayservice_validates_against_kuberay_crd(case: str) -> None:
    validator = _crd_validator()
    errors = list(validator.iter_errors(_render(CASES[case])))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


# --- decide: bad input is a condition, never a crash or a retry loop ---------------------


def _body(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {"name": "chat", "namespace": "team-a", "generation": 3, "uid": "u"},
        "spec": spec,
    }


def _cond(plan: ms.Plan, type_: str) -> Any:
    return next(c for c in plan.status.conditions if c.type == type_)


def test_huge_memory_is_invalid_spec_not_overflow() -> None:
    """resources.memory "1" + 400 zeros passed the quantity pattern, then overflowed."""
    huge = "1" + "0" * 400
    with pytest.raises(ValueError, match="out of range"):
        quantity(huge)
    for memory in (huge, "100Ei", "9999999Ti"):
        spec = copy.deepcopy(MS().set("resources.memory", memory).body["spec"])
        plan = ms.decide(_body(spec), {}, None, SETTINGS, NOW)
        accepted = _cond(plan, "Accepted")
        assert accepted.status == "False" and accepted.reason == "InvalidSpec"
        assert "resources.memory" in accepted.message
        assert plan.rayservice is None
        assert [e[:2] for e in plan.events] == [("Warning", "InvalidSpec")]


@pytest.mark.parametrize(
    "reported",
    [
        "gopher://x",
        "pvc://other-team/secrets",
        "pvc://models/out/../../etc",
        42,
        "s3://b/" + "k" * 3000,
    ],
)
def test_forged_adapter_uri_is_ignored_with_a_warning(reported: Any) -> None:
    spec = MS().set("model.adapters", [{"name": "legal", "fromFineTuneJob": "j"}]).body["spec"]
    job = {
        "spec": {"output": {"uri": "pvc://models/out"}},
        "status": {"phase": "Succeeded", "output": {"uri": reported, "kind": "adapter"}},
    }
    plan = ms.decide(_body(spec), {"j": job}, None, SETTINGS, NOW)
    cond = _cond(plan, "AdaptersReady")
    assert cond.status == "False" and cond.reason == "AdapterUnavailable"
    assert "ignored" in cond.message
    assert ("Warning", "AdapterUnavailable") in [e[:2] for e in plan.events]
    assert plan.rayservice is not None
    assert "legal" not in (plan.rayservice["spec"]["serveConfigV2"])
    good = copy.deepcopy(job)
    good["status"]["output"]["uri"] = "pvc://models/out/final"
    ok = ms.decide(_body(spec), {"j": good}, None, SETTINGS, NOW)
    assert _cond(ok, "AdaptersReady").status == "True"
    cfg = yaml.safe_load(ok.rayservice["spec"]["serveConfigV2"])  # type: ignore[index]
    adapters = cfg["applications"][0]["deployments"][0]["user_config"]["adapters"]
    assert adapters == [{"name": "legal", "uri": "pvc://models/out/final"}]


def test_decide_failure_is_a_condition() -> None:
    body = _body(MS().body["spec"])
    body["status"] = {"conditions": [], "endpoint": None}
    plan = ms.internal_error_plan(body, RuntimeError("boom"), NOW)
    ready = _cond(plan, "Ready")
    assert (ready.status, ready.reason) == ("False", "InternalError")
    assert "boom" in ready.message and "bug in Graft" in ready.message
    assert plan.status.phase == "Failed" and plan.status.observed_generation == 3
    assert plan.events[0][:2] == ("Warning", "InternalError")
    body["status"] = plan.status.wire()
    assert ms.internal_error_plan(body, RuntimeError("boom"), NOW).events == []


def test_network_change_alone_reapplies() -> None:
    body = _body(MS().body["spec"])
    first = ms.decide(body, {}, None, SETTINGS, NOW)
    assert first.rayservice is not None and first.network_policy is not None
    assert first.msvc is not None
    same = ms.decide(body, {}, first.rayservice, SETTINGS, NOW)
    assert same.rayservice is None
    body["spec"]["network"] = {"allowFromNamespaces": ["web"]}
    moved = ms.decide(body, {}, first.rayservice, SETTINGS, NOW)
    assert moved.network_policy is not None and moved.rayservice is not None
    assert moved.rayservice["spec"] == first.rayservice["spec"]


def test_render_is_unchanged_by_network_spec() -> None:
    a = render(MS().obj())
    b = render(MS().set("network.allowFromNamespaces", ["web"]).obj())
    assert a == b


def test_missing_api_key_secret_or_key_is_a_condition_until_it_appears() -> None:
    spec = copy.deepcopy(AUTHED.body["spec"])
    body = _body(spec)
    assert ms.secret_names(body) == ["chat-keys"]
    steps: list[tuple[dict[str, frozenset[str] | None], str]] = [
        ({"chat-keys": None}, "ApiKeySecretNotFound"),
        ({"chat-keys": frozenset({"other"})}, "ApiKeyNotInSecret"),
    ]
    for secrets, reason in steps:
        plan = ms.decide(body, {}, None, SETTINGS, NOW, secrets=secrets)
        auth, ready = _cond(plan, "AuthReady"), _cond(plan, "Ready")
        assert (auth.status, auth.reason) == ("False", reason)
        assert (ready.status, ready.reason) == ("False", reason)
        assert "chat-keys" in auth.message and "keys.txt" in auth.message
        assert plan.rayservice is None and [e[:2] for e in plan.events] == [("Warning", reason)]
        body["status"] = plan.status.model_dump(by_alias=True, exclude_none=True, mode="json")
        assert ms.waits_for_secret(body)
        # the next pass with the same problem posts no second Event
        again = ms.decide(body, {}, None, SETTINGS, NOW, secrets=secrets)
        assert again.events == []
    ok = ms.decide(body, {}, None, SETTINGS, NOW, secrets={"chat-keys": frozenset({"keys.txt"})})
    assert _cond(ok, "AuthReady").status == "True" and ok.rayservice is not None
    body["status"] = ok.status.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert not ms.waits_for_secret(body)
