"""Pure builders for serving: the Serve config and the KubeRay RayService."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from graft.api.common import quantity
from graft.api.modelservice import ModelService
from graft.builders.rayservice import (
    RAY_VERSION,
    build_rayservice,
    cluster_spec,
    endpoint,
    rayservice_name,
)
from graft.builders.serve_config import ResolvedAdapter, build_serve_config
from graft.config import NodePool, Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
RAYSERVICE_CRD = REPO_ROOT.parent / "shared" / "thirdparty" / "kuberay" / "ray.io_rayservices.yaml"

A100 = NodePool.model_validate(
    {
        "name": "a100",
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "gpusPerNode": 8,
        "gpuMemoryGiB": 80,
    }
)
SETTINGS = Settings(node_pools=[A100])
ADAPTERS = [ResolvedAdapter("legal", "pvc://models/adapters/legal")]


class MS:
    """Fluent ModelService builder for test inputs."""

    def __init__(self, name: str = "chat") -> None:
        self.body: dict[str, Any] = {
            "metadata": {"name": name, "namespace": "team-a", "generation": 1},
            "spec": {
                "model": {"baseModel": {"uri": "pvc://models/llama-3-8b"}},
                "resources": {"nodePool": "a100", "gpusPerReplica": 1},
                "autoscaling": {"minReplicas": 1, "maxReplicas": 4},
            },
        }

    def set(self, path: str, value: Any) -> MS:
        node = self.body["spec"]
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
        return self

    def obj(self) -> ModelService:
        return ModelService.model_validate(copy.deepcopy(self.body))


def render(msvc: ModelService, adapters: list[ResolvedAdapter] = ADAPTERS) -> dict[str, Any]:
    return build_rayservice(msvc, adapters, SETTINGS, pool=A100)


def test_serve_config_whole_object() -> None:
    msvc = (
        MS()
        .set("model.servedName", "llama")
        .set("model.maxModelLen", 4096)
        .set("resources.cpu", "8")
        .set("resources.memory", "64Gi")
        .set("autoscaling.targetOngoingRequests", 8)
        .set("autoscaling.upscaleDelaySeconds", 10)
        .set("autoscaling.downscaleDelaySeconds", 300)
        .obj()
    )
    assert build_serve_config(msvc, ADAPTERS) == {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [
            {
                "name": "llm",
                "import_path": "graft.runtime.serve.app:build_app",
                "route_prefix": "/",
                "args": {
                    "model": {"name": "llama", "uri": "pvc://models/llama-3-8b"},
                    "engine": "vllm",
                    "maxModelLen": 4096,
                    "tensorParallelSize": 1,
                },
                "deployments": [
                    {
                        "name": "LLMServer",
                        "max_ongoing_requests": 16,
                        "autoscaling_config": {
                            "min_replicas": 1,
                            "max_replicas": 4,
                            "target_ongoing_requests": 8.0,
                            "upscale_delay_s": 10.0,
                            "downscale_delay_s": 300.0,
                        },
                        "ray_actor_options": {
                            "num_cpus": 8.0,
                            "num_gpus": 1,
                            "memory": 64 * 2**30,
                        },
                        "user_config": {
                            "adapters": [{"name": "legal", "uri": "pvc://models/adapters/legal"}]
                        },
                    }
                ],
            }
        ],
    }


@pytest.mark.parametrize(
    ("spec", "engine", "name"),
    [
        ({}, "vllm", "chat"),
        ({"resources.gpusPerReplica": 0, "resources.nodePool": None}, "transformers", "chat"),
        ({"engine": "transformers"}, "transformers", "chat"),
        ({"model.servedName": "m"}, "vllm", "m"),
    ],
)
def test_engine_and_served_name(spec: dict[str, Any], engine: str, name: str) -> None:
    b = MS()
    for k, v in spec.items():
        b.set(k, v)
    app = build_serve_config(b.obj(), [])["applications"][0]
    assert app["args"]["engine"] == engine
    assert app["args"]["model"]["name"] == name


@pytest.mark.parametrize(
    "adapters",
    [[], ADAPTERS, [*ADAPTERS, ResolvedAdapter("med", "s3://bucket/med")]],
)
def test_serve_config_validates_against_ray_schema(adapters: list[ResolvedAdapter]) -> None:
    schema = pytest.importorskip("ray.serve.schema")
    for msvc in [MS().obj(), MS().set("autoscaling.minReplicas", 0).obj()]:
        cfg = build_serve_config(msvc, adapters)
        parsed = schema.ServeDeploySchema.model_validate(cfg)
        dep = parsed.applications[0].deployments[0]
        assert dep.user_config == {"adapters": [{"name": a.name, "uri": a.uri} for a in adapters]}
        # The string in the RayService parses back to the same config.
        rs = render(msvc, adapters)
        assert yaml.safe_load(rs["spec"]["serveConfigV2"]) == cfg


def test_rayservice_shape() -> None:
    rs = render(MS().obj())
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    meta = rs["metadata"]
    assert meta["name"] == "chat" and meta["namespace"] == "team-a"
    assert meta["labels"] == {
        "app.kubernetes.io/name": "graft-server",
        "app.kubernetes.io/instance": "chat",
        "app.kubernetes.io/component": "modelservice",
        "app.kubernetes.io/managed-by": "graft-operator",
        "app.kubernetes.io/part-of": "graft",
        "graft.dev/modelservice": "chat",
    }
    assert len(meta["annotations"]["graft.dev/spec-hash"]) == 16
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == RAY_VERSION
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-gpus": "0", "num-cpus": "0"}
    head_c = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"]["limits"]
    assert head_c["image"] == SETTINGS.server_image
    [group] = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 1, 4)
    pod = group["template"]["spec"]
    assert pod["nodeSelector"] == A100.node_selector
    assert pod["tolerations"] == A100.tolerations
    worker = pod["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "GRAFT_PVC_ROOT", "value": "/mnt/pvc"} in worker["env"]
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    assert mounts["/mnt/pvc/models"]["readOnly"] is True
    assert {
        "name": "pvc-models",
        "persistentVolumeClaim": {"claimName": "models", "readOnly": True},
    } in pod["volumes"]
    assert worker["securityContext"]["runAsNonRoot"] is True


def test_image_override_and_custom_gpu_resource() -> None:
    pool = A100.model_copy(update={"gpu_resource": "amd.com/gpu"})
    rs = build_rayservice(MS().set("image", "reg.local/srv:1").obj(), [], SETTINGS, pool=pool)
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["image"] == "reg.local/srv:1"
    assert worker["containers"][0]["resources"]["limits"]["amd.com/gpu"] == 1


def test_cpu_serving_needs_no_pool() -> None:
    msvc = MS().set("resources.gpusPerReplica", 0).set("resources.nodePool", None).obj()
    rs = build_rayservice(msvc, [], SETTINGS, pool=None)
    pod = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "nodeSelector" not in pod
    assert pod["containers"][0]["resources"]["limits"] == {"cpu": "1", "memory": "8Gi"}


def test_gpu_serving_without_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="node pool"):
        build_rayservice(MS().obj(), [], SETTINGS, pool=None)


def test_scale_to_zero_worker_group() -> None:
    rs = render(MS().set("autoscaling.minReplicas", 0).obj())
    group = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (group["replicas"], group["minReplicas"]) == (0, 0)
    cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert cfg["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"] == 0


def test_adapter_change_touches_only_the_serve_config() -> None:
    msvc = MS().obj()
    before = render(msvc, ADAPTERS)
    after = render(msvc, [*ADAPTERS, ResolvedAdapter("med", "pvc://models/adapters/med")])
    removed = render(msvc, [])
    for other in (after, removed):
        assert other["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]
        assert other["metadata"] == before["metadata"]
        assert other["spec"]["serveConfigV2"] != before["spec"]["serveConfigV2"]
        assert {k: v for k, v in other["spec"].items() if k != "serveConfigV2"} == {
            k: v for k, v in before["spec"].items() if k != "serveConfigV2"
        }


def test_builders_are_deterministic() -> None:
    assert render(MS().obj()) == render(MS().obj())


@pytest.mark.parametrize(
    ("path", "value", "rolls"),
    [
        ("model.baseModel", {"uri": "pvc://models/llama-3-70b"}, True),
        ("engine", "transformers", True),
        ("image", "reg.local/srv:2", True),
        ("resources.gpusPerReplica", 2, True),
        ("resources.memory", "128Gi", True),
        ("autoscaling.maxReplicas", 8, False),
        ("autoscaling.targetOngoingRequests", 2, False),
        ("model.servedName", "other", False),
        ("auth.apiKeySecretRef", {"name": "keys", "key": "list"}, True),
        ("network.allowFromNamespaces", ["web"], False),
    ],
)
def test_spec_hash_covers_cluster_shaping_fields(path: str, value: Any, rolls: bool) -> None:
    before = render(MS().obj())["metadata"]["annotations"]["graft.dev/spec-hash"]
    after = render(MS().set(path, value).obj())["metadata"]["annotations"]["graft.dev/spec-hash"]
    assert (before != after) is rolls


def test_adapter_on_a_new_claim_mounts_it() -> None:
    msvc = MS().obj()
    same = cluster_spec(msvc, ADAPTERS, SETTINGS, A100)
    new = cluster_spec(msvc, [ResolvedAdapter("x", "pvc://outputs/x")], SETTINGS, A100)
    assert same["claims"] == ["models"] and new["claims"] == ["models", "outputs"]


def test_long_names_are_cut_with_hash() -> None:
    long = "m" * 60
    a = rayservice_name(MS(long).obj())
    b = rayservice_name(MS(long + "x").obj())
    assert len(a) <= 47 and a != b
    assert endpoint(MS().obj()) == "http://chat-serve-svc.team-a.svc:8000/v1"


@pytest.mark.parametrize("name", ["llama.v2", "7b-chat", "a." + "b" * 250, "m" * 60])
def test_any_modelservice_name_gives_a_rayservice_name_kuberay_accepts(name: str) -> None:
    """KubeRay's ValidateRayServiceMetadata: a DNS-1035 label of at most 47 characters."""
    got = rayservice_name(MS(name).obj())
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", got) and len(got) <= 47, got
    assert rayservice_name(MS(name.replace(".", "-")).obj()) != got or "." not in name


@pytest.mark.parametrize(
    ("q", "v"), [("500m", 0.5), ("8", 8.0), ("64Gi", 64 * 2**30), ("1.5", 1.5)]
)
def test_quantity(q: str, v: float) -> None:
    assert quantity(q) == v


def test_ray_version_matches_installed_ray() -> None:
    ray = pytest.importorskip("ray")
    assert ray.__version__ == RAY_VERSION


def _crd_validator() -> Any:
    if not RAYSERVICE_CRD.exists():
        pytest.skip(f"{RAYSERVICE_CRD} absent (../shared not checked out)")
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load(RAYSERVICE_CRD.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft202012Validator(version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize(
    "msvc",
    [
        MS().obj(),
        MS().set("autoscaling.minReplicas", 0).set("resources.memory", "64Gi").obj(),
        MS().set("resources.gpusPerReplica", 0).set("resources.nodePool", None).obj(),
    ],
)
def test_rayservice_validates_against_kuberay_crd(msvc: ModelService) -> None:
    validator = _crd_validator()
    pool = A100 if msvc.spec.resources.gpus_per_replica else None
    rs = build_rayservice(msvc, ADAPTERS, SETTINGS, pool=pool)
    errors = sorted(validator.iter_errors(rs), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def test_crd_validation_catches_a_wrong_shape() -> None:
    validator = _crd_validator()
    rs = render(MS().obj())
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = "one"
    assert list(validator.iter_errors(rs))
