"""Render a ModelService's Ray Serve config (``serveConfigV2`` of its RayService).

The config must validate against Ray's ``ray.serve.schema.ServeDeploySchema`` (a unit test
checks it; this module does not import ray). Adapters are in the deployment's
``user_config``, so changing them is a Serve reconfigure of the running replicas.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from graft.api.common import quantity
from graft.api.modelservice import AdapterCanary, Engine, ModelService

#: The one application of a ModelService's serve config; its key in RayService status
#: ``activeServiceStatus.applicationStatuses``.
APP_NAME = "llm"
DEPLOYMENT_NAME = "LLMServer"
IMPORT_PATH = "graft.runtime.serve.app:build_app"
ROUTE_PREFIX = "/"
SERVE_PORT = 8000
#: Where the Ray pods mount spec.auth.apiKeySecretRef, and the file its key becomes.
API_KEYS_DIR = "/etc/graft/api-keys"
API_KEYS_FILE = f"{API_KEYS_DIR}/keys"


@dataclass(frozen=True)
class ResolvedCanary:
    """A new version of an adapter with a concrete URI and its share and rollback policy."""

    uri: str
    weight: int
    window_seconds: float = 60.0
    min_requests: int = 20
    max_error_rate_increase: float = 0.05
    max_p99_latency_ratio: float = 1.5

    @property
    def version(self) -> str:
        """What replicas report the new version as (its URI stays out of their endpoints)."""
        return canary_version(self.uri)

    @classmethod
    def of(cls, uri: str, spec: AdapterCanary) -> ResolvedCanary:
        """The canary ``spec`` describes, resolved to ``uri``."""
        r = spec.rollback
        return cls(
            uri,
            spec.weight,
            window_seconds=r.window_seconds,
            min_requests=r.min_requests,
            max_error_rate_increase=r.max_error_rate_increase,
            max_p99_latency_ratio=r.max_p99_latency_ratio,
        )

    def user_config(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "version": self.version,
            "weight": self.weight,
            "windowSeconds": self.window_seconds,
            "minRequests": self.min_requests,
            "maxErrorRateIncrease": self.max_error_rate_increase,
            "maxP99LatencyRatio": self.max_p99_latency_ratio,
        }


def canary_version(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter with a concrete URI (``fromFineTuneJob`` already looked up)."""

    name: str
    uri: str
    canary: ResolvedCanary | None = None

    def user_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "uri": self.uri}
        if self.canary is not None:
            out["canary"] = self.canary.user_config()
        return out


def served_name(msvc: ModelService) -> str:
    """The base model's name in the OpenAI API: spec.model.servedName or the CR's name."""
    return msvc.spec.model.served_name or str(msvc.metadata.get("name", "model"))


def resolved_engine(msvc: ModelService) -> Engine:
    """``auto`` is vLLM when replicas have GPUs, transformers otherwise."""
    if msvc.spec.engine != Engine.AUTO:
        return msvc.spec.engine
    return Engine.VLLM if msvc.spec.resources.gpus_per_replica > 0 else Engine.TRANSFORMERS


def replica_cpus(msvc: ModelService) -> float:
    """Ray CPUs per replica: spec.resources.cpu, else 1."""
    cpu = msvc.spec.resources.cpu
    return quantity(cpu) if cpu else 1.0


def max_ongoing_requests(target: float) -> int:
    # Serve scales on requests in flight per replica and stops sending a replica more than
    # max_ongoing_requests; twice the target leaves room for the autoscaler to see load
    # above target while keeping queues short.
    return max(2, math.ceil(2 * target))


def build_serve_config(msvc: ModelService, adapters: list[ResolvedAdapter]) -> dict[str, Any]:
    """The serveConfigV2 dict of ``msvc`` serving ``adapters`` (in the given order)."""
    spec = msvc.spec
    a = spec.autoscaling
    actor: dict[str, Any] = {
        "num_cpus": replica_cpus(msvc),
        "num_gpus": spec.resources.gpus_per_replica,
    }
    if spec.resources.memory:
        actor["memory"] = int(quantity(spec.resources.memory))
    args: dict[str, Any] = {
        "model": {"name": served_name(msvc), "uri": spec.model.base_model.uri},
        "engine": resolved_engine(msvc).value,
        "maxModelLen": spec.model.max_model_len,
        "tensorParallelSize": spec.resources.tensor_parallel_size,
    }
    if spec.auth.api_key_secret_ref is not None:
        args["apiKeyFile"] = API_KEYS_FILE
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [
            {
                "name": APP_NAME,
                "import_path": IMPORT_PATH,
                "route_prefix": ROUTE_PREFIX,
                "args": args,
                "deployments": [
                    {
                        "name": DEPLOYMENT_NAME,
                        "max_ongoing_requests": max_ongoing_requests(a.target_ongoing_requests),
                        "autoscaling_config": {
                            "min_replicas": a.min_replicas,
                            "max_replicas": a.max_replicas,
                            "target_ongoing_requests": a.target_ongoing_requests,
                            "upscale_delay_s": a.upscale_delay_seconds,
                            "downscale_delay_s": a.downscale_delay_seconds,
                        },
                        "ray_actor_options": actor,
                        "user_config": {"adapters": [x.user_config() for x in adapters]},
                    }
                ],
            }
        ],
    }
