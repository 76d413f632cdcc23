"""Operator settings: one typed object read from ``GRAFT_*`` environment variables.

Every setting is documented where it is declared. Node pools come from ``GRAFT_NODE_POOLS``
(a JSON or YAML list) or from the YAML file named by ``GRAFT_CONFIG`` (which the Helm chart
mounts from its values: a mapping with ``nodePools`` and, optionally, any other setting
in camelCase). Environment variables win over the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from graft.api.common import ApiModel, DnsLabel
from graft.validation import describe


class ConfigError(Exception):
    """The operator's configuration is unusable; the message says what to fix."""


class NodePool(ApiModel):
    """A group of identical nodes that jobs and services can be placed on."""

    name: DnsLabel = Field(description="Name that specs refer to in resources.nodePool.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Labels that select the pool's nodes."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Tolerations for the pool's taints (core/v1 shape)."
    )
    gpu_resource: str = Field(
        default="nvidia.com/gpu", description="Extended resource name of the GPUs."
    )
    gpus_per_node: int = Field(default=0, ge=0, le=16, description="GPUs on each node.")
    gpu_memory_gi_b: float = Field(
        default=0, ge=0, alias="gpuMemoryGiB", description="Memory of one GPU in GiB."
    )
    price_per_gpu_hour: float = Field(
        default=0, ge=0, description="Price of one GPU-hour, for cost in status and plans."
    )
    max_nodes: int | None = Field(
        default=None,
        ge=1,
        description="Nodes the pool can grow to; unset: not checked. Jobs needing more nodes "
        "are refused as Unschedulable.",
    )


class Settings(ApiModel):
    """Everything the operator process can be told."""

    model_config = ApiModel.model_config | {"extra": "forbid"}

    watch_namespaces: list[str] = Field(
        default_factory=list,
        description="GRAFT_WATCH_NAMESPACES: comma-separated namespaces; empty: all namespaces.",
    )
    node_pools: list[NodePool] = Field(
        default_factory=list, description="GRAFT_NODE_POOLS: the node pools (JSON or YAML list)."
    )
    trainer_image: str = Field(
        default="ghcr.io/graft-dev/graft-trainer:0.1.0",
        description="GRAFT_TRAINER_IMAGE: image of FineTuneJob pods unless a spec overrides it.",
    )
    server_image: str = Field(
        default="ghcr.io/graft-dev/graft-server:0.1.0",
        description="GRAFT_SERVER_IMAGE: image of ModelService Ray pods unless overridden.",
    )
    metrics_port: int = Field(
        default=8080, ge=0, le=65535, description="GRAFT_METRICS_PORT: Prometheus port (0: off)."
    )
    health_port: int = Field(
        default=8081,
        ge=0,
        le=65535,
        description="GRAFT_HEALTH_PORT: liveness/readiness port (0: off).",
    )
    termination_grace_seconds: int = Field(
        default=300,
        ge=10,
        description="GRAFT_TERMINATION_GRACE_SECONDS: trainer pods' grace period; long enough "
        "to write a final checkpoint after SIGTERM.",
    )
    gang_pending_timeout_seconds: int = Field(
        default=300,
        ge=1,
        description="GRAFT_GANG_PENDING_TIMEOUT_SECONDS: ranks Pending longer than this are "
        "reported in the GangPending condition.",
    )
    max_concurrent_passes: int = Field(
        default=16,
        ge=1,
        le=1000,
        description="GRAFT_MAX_CONCURRENT_PASSES: FineTuneJob passes that run at once; the "
        "others wait their turn. A burst of new jobs then finishes job by job instead of all "
        "together, and the apiserver and the controllers it waits on (on v1.20, the token "
        "controller) are not flooded.",
    )
    allow_hub: bool = Field(
        default=False,
        description="GRAFT_ALLOW_HUB: true lets FineTuneJobs read hf:// URIs (the cluster "
        "must allow egress to the hub); false (air-gapped, the default) refuses them.",
    )
    heartbeat_timeout_seconds: int = Field(
        default=600,
        ge=5,
        le=86400,
        description="GRAFT_HEARTBEAT_TIMEOUT_SECONDS: a running gang whose trainer heartbeat "
        "is older than this is restarted from its last checkpoint (reason TrainerHung); "
        "a job's spec.restartPolicy.heartbeatTimeoutSeconds overrides it.",
    )
    kuberay_namespace: str | None = Field(
        default=None,
        description="GRAFT_KUBERAY_NAMESPACE: namespace of the KubeRay operator; each "
        "ModelService's NetworkPolicy lets only its pods (label app.kubernetes.io/name="
        "kuberay-operator) reach the Ray dashboard. Unset: such pods in any namespace.",
    )
    log_format: str = Field(
        default="json", pattern="^(json|plain)$", description="GRAFT_LOG_FORMAT: json or plain."
    )
    log_level: str = Field(
        default="INFO",
        pattern="^(DEBUG|INFO|WARNING|ERROR)$",
        description="GRAFT_LOG_LEVEL: DEBUG, INFO, WARNING or ERROR.",
    )

    @field_validator("watch_namespaces", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [n.strip() for n in v.split(",") if n.strip()]
        return v

    @field_validator("node_pools")
    @classmethod
    def _unique(cls, v: list[NodePool]) -> list[NodePool]:
        names = [p.name for p in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"node pool names must be unique: {dup} repeated")
        return v

    def pool(self, name: str) -> NodePool | None:
        return next((p for p in self.node_pools if p.name == name), None)


_ENV_PREFIX = "GRAFT_"


def _field_for_env(env_key: str) -> str | None:
    suffix = env_key[len(_ENV_PREFIX) :].lower()
    return suffix if suffix in Settings.model_fields else None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment (and the GRAFT_CONFIG file if named)."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    cfg_path = env.get("GRAFT_CONFIG")
    if cfg_path:
        try:
            loaded = yaml.safe_load(Path(cfg_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"GRAFT_CONFIG={cfg_path}: cannot read it ({e})") from e
        if isinstance(loaded, list):
            loaded = {"nodePools": loaded}
        if not isinstance(loaded, dict):
            raise ConfigError(f"GRAFT_CONFIG={cfg_path}: expected a mapping with nodePools")
        raw.update(loaded)
    for key, value in env.items():
        if not key.startswith(_ENV_PREFIX) or key == "GRAFT_CONFIG":
            continue
        field = _field_for_env(key)
        if field is None:
            continue
        if field == "node_pools":
            try:
                raw["nodePools"] = yaml.safe_load(value) or []  # JSON is YAML too
            except yaml.YAMLError as e:
                raise ConfigError(f"GRAFT_NODE_POOLS is not JSON or YAML: {e}") from e
            raw.pop("node_pools", None)
        else:
            raw.pop(Settings.model_fields[field].alias or field, None)
            raw[field] = value
    try:
        return Settings.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(
            f"invalid operator configuration: {describe(e, prefix='config')}. Fix it in the "
            "Helm values (config.*) or the matching GRAFT_* variable; see docs/operator.md."
        ) from e
