"""The ModelService custom resource: a base model plus LoRA adapters behind an OpenAI API."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, StringConstraints, model_validator

from graft.api.common import (
    ApiModel,
    Condition,
    DnsLabel,
    Quantity,
    S3Access,
    StorageRef,
    StorageUri,
    quantity,
)

DnsSubdomain = Annotated[
    str,
    StringConstraints(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        max_length=253,
    ),
]
SecretKey = Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)]
LabelKey = Annotated[
    str,
    StringConstraints(
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$",
        max_length=317,
    ),
]
LabelValue = Annotated[
    str,
    StringConstraints(pattern=r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$", max_length=63),
]

KIND = "ModelService"
PLURAL = "modelservices"


class Engine(StrEnum):
    AUTO = "auto"
    VLLM = "vllm"
    TRANSFORMERS = "transformers"


_ONE_SOURCE: dict[str, Any] = {"oneOf": [{"required": ["uri"]}, {"required": ["fromFineTuneJob"]}]}


class CanaryRollback(ApiModel):
    """When a canary is rolled back: compared with the stable version over a sliding window."""

    window_seconds: float = Field(
        default=60.0, ge=1, le=3600, description="Length of the window of recent requests."
    )
    min_requests: int = Field(
        default=20,
        ge=1,
        le=100000,
        description="Canary requests the window must hold before any verdict.",
    )
    max_error_rate_increase: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Roll back when the canary's error rate exceeds the stable version's by "
        "more than this (0.05: five percentage points).",
    )
    max_p99_latency_ratio: float = Field(
        default=1.5,
        ge=1,
        le=1000,
        description="Roll back when the canary's p99 latency is more than this many times the "
        "stable version's (compared once both have minRequests in the window).",
    )


class AdapterCanary(ApiModel):
    """A new version of an adapter taking a share of its requests; exactly one of uri,
    fromFineTuneJob."""

    model_config = ApiModel.model_config | {"json_schema_extra": _ONE_SOURCE}

    uri: StorageUri | None = Field(
        default=None, description="Where the new version's peft adapter directory is."
    )
    from_fine_tune_job: DnsLabel | None = Field(
        default=None,
        description="FineTuneJob in the same namespace whose output is the new version.",
    )
    allow_unevaluated: bool = Field(
        default=False,
        description="Serve the new version even if its FineTuneJob's evaluation gate did not pass.",
    )
    weight: int = Field(
        ge=0,
        le=100,
        description="Percent of the requests for this adapter's name sent to the new version.",
    )
    rollback: CanaryRollback = Field(
        default_factory=CanaryRollback,
        description="Automatic rollback when the new version does worse than the stable one.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> AdapterCanary:
        if (self.uri is None) == (self.from_fine_tune_job is None):
            raise ValueError("canary: set exactly one of uri or fromFineTuneJob")
        return self


class Adapter(ApiModel):
    """A LoRA adapter served beside the base model; give exactly one of uri, fromFineTuneJob."""

    model_config = ApiModel.model_config | {"json_schema_extra": _ONE_SOURCE}

    name: DnsLabel = Field(description="Model name clients pass in the OpenAI `model` field.")
    uri: StorageUri | None = Field(default=None, description="Where the peft adapter directory is.")
    from_fine_tune_job: DnsLabel | None = Field(
        default=None,
        description="Name of a FineTuneJob in the same namespace; its status.output is used "
        "once it succeeds and its evaluation gate (if any) passed, and the adapter is added "
        "without restarting the Ray cluster.",
    )
    allow_unevaluated: bool = Field(
        default=False,
        description="Serve a fromFineTuneJob adapter even if the job's evaluation gate failed "
        "or has no result.",
    )
    canary: AdapterCanary | None = Field(
        default=None,
        description="A new version rolled out to a share of this adapter's requests, rolled "
        "back automatically when it does worse than this (stable) version.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Adapter:
        if (self.uri is None) == (self.from_fine_tune_job is None):
            raise ValueError(f"adapter {self.name!r}: set exactly one of uri or fromFineTuneJob")
        return self


class ModelSource(ApiModel):
    """What is served."""

    base_model: StorageRef = Field(description="The base model weights.")
    adapters: list[Adapter] = Field(
        default_factory=list, max_length=64, description="LoRA adapters served beside the base."
    )
    served_name: DnsLabel | None = Field(
        default=None,
        description="Name of the base model in the OpenAI API; unset: the ModelService's name.",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, le=1048576, description="Longest prompt + completion in tokens."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> ModelSource:
        names = [a.name for a in self.adapters]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"adapter names must be unique: {sorted(dup)} repeated")
        return self


#: Bounds of one replica (one node's worth, with room): beyond them a value is a typo.
MAX_REPLICA_CPUS = 1024.0
MAX_REPLICA_MEMORY = float(64 * 2**40)


class ServeResources(ApiModel):
    """Hardware for each replica."""

    node_pool: DnsLabel | None = Field(
        default=None,
        description="Node pool for the GPU workers; unset: the smallest pool that fits.",
    )
    gpus_per_replica: int = Field(
        default=1, ge=0, le=16, description="GPUs per serving replica (0: CPU serving)."
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, le=16, description="vLLM tensor parallel degree (<= gpusPerReplica)."
    )
    cpu: Quantity | None = Field(default=None, description="CPU per replica, e.g. '8'.")
    memory: Quantity | None = Field(default=None, description="Memory per replica, e.g. 64Gi.")

    @model_validator(mode="after")
    def _bounded(self) -> ServeResources:
        for field, value, most, unit in (
            ("cpu", self.cpu, MAX_REPLICA_CPUS, "CPUs"),
            ("memory", self.memory, MAX_REPLICA_MEMORY, "bytes"),
        ):
            if value is not None and quantity(value) > most:
                raise ValueError(
                    f"resources.{field} {value!r} is more than one replica can have "
                    f"(at most {most:g} {unit}); give a per-replica amount such as "
                    + ("'8'" if field == "cpu" else "'64Gi'")
                )
        return self

    @model_validator(mode="after")
    def _tp_fits(self) -> ServeResources:
        if self.gpus_per_replica and self.tensor_parallel_size > self.gpus_per_replica:
            raise ValueError(
                f"tensorParallelSize ({self.tensor_parallel_size}) cannot exceed "
                f"gpusPerReplica ({self.gpus_per_replica})"
            )
        return self


class Autoscaling(ApiModel):
    """Replica autoscaling; maps to Ray Serve autoscaling_config and the Ray autoscaler."""

    min_replicas: int = Field(
        default=1, ge=0, le=1000, description="Fewest replicas; 0 scales GPU workers to zero."
    )
    max_replicas: int = Field(default=1, ge=1, le=1000, description="Most replicas.")
    target_ongoing_requests: float = Field(
        default=4.0, gt=0, le=10000, description="Requests in flight per replica to aim for."
    )
    upscale_delay_seconds: float = Field(
        default=30.0, ge=0, le=3600, description="Load must stay high this long to add replicas."
    )
    downscale_delay_seconds: float = Field(
        default=600.0, ge=0, le=86400, description="Load must stay low this long to remove one."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) cannot exceed maxReplicas ({self.max_replicas})"
            )
        return self


class ApiKeySecretRef(ApiModel):
    """A key of a Secret in the ModelService's namespace holding API keys, one per line."""

    name: DnsSubdomain = Field(description="Name of the Secret.")
    key: SecretKey = Field(description="Key in the Secret's data whose value lists the API keys.")


class ServeAuth(ApiModel):
    """Who may call the OpenAI endpoint."""

    api_key_secret_ref: ApiKeySecretRef | None = Field(
        default=None,
        description="Require `Authorization: Bearer <key>` with a key listed (one per line; "
        "blank lines and # comments ignored) in this Secret. The Secret is mounted into the "
        "serving pods and re-read when it changes, so keys rotate without a restart. "
        "Unset: no API key is asked for.",
    )


class ServeNetwork(ApiModel):
    """Who may reach the OpenAI endpoint over the network (the rest of the Ray cluster is
    reachable only from its own pods and the KubeRay operator)."""

    allow_from_namespaces: list[DnsLabel] = Field(
        default_factory=list,
        max_length=64,
        description="Namespaces, besides the ModelService's own, whose pods may call the "
        "endpoint (an ingress controller's, a gateway's, a client team's).",
    )
    allow_from_namespace_labels: dict[LabelKey, LabelValue] | None = Field(
        default=None,
        max_length=16,
        description="Also namespaces carrying all these labels; {} means every namespace.",
    )


class ModelServiceSpec(ApiModel):
    """Desired state of a ModelService."""

    model: ModelSource = Field(description="Base model and adapters.")
    s3: S3Access | None = Field(
        default=None,
        description="Credentials or workload identity for s3:// models and adapters; see "
        "docs/security.md.",
    )
    engine: Engine = Field(
        default=Engine.AUTO,
        description="vllm (GPUs), transformers (CPU and tests), auto: vllm when "
        "gpusPerReplica > 0, else transformers.",
    )
    resources: ServeResources = Field(
        default_factory=ServeResources, description="Hardware per replica."
    )
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Autoscaling.")
    image: str | None = Field(
        default=None, min_length=1, description="Server image; unset: the operator's default."
    )
    auth: ServeAuth = Field(
        default_factory=ServeAuth, description="Authentication of the OpenAI endpoint."
    )
    network: ServeNetwork = Field(
        default_factory=ServeNetwork,
        description="NetworkPolicy of the serving pods; default: the endpoint is reachable "
        "from the ModelService's own namespace only.",
    )


class ModelServicePhase(StrEnum):
    PENDING = "Pending"
    DEPLOYING = "Deploying"
    READY = "Ready"
    UPDATING = "Updating"
    FAILED = "Failed"


class CanaryState(StrEnum):
    WAITING = "Waiting"
    PROGRESSING = "Progressing"
    ROLLED_BACK = "RolledBack"


class CanaryStatus(ApiModel):
    """Where one adapter's canary stands."""

    name: str = Field(description="The adapter's name.")
    stable_uri: str | None = Field(default=None, description="Where the stable version is.")
    canary_uri: str | None = Field(default=None, description="Where the new version is.")
    version: str | None = Field(
        default=None, description="Short hash of canaryUri that replicas report it under."
    )
    weight: int = Field(
        default=0, ge=0, le=100, description="Percent of requests sent to the new version now."
    )
    state: CanaryState = Field(
        description="Waiting (the new version cannot be served yet), Progressing (it takes "
        "its weight) or RolledBack (it takes nothing until its uri changes)."
    )
    reason: str | None = Field(default=None, description="Why it is waiting or was rolled back.")
    last_transition_time: str | None = Field(default=None, description="When state last changed.")


class ModelServiceStatus(ApiModel):
    """Observed state of a ModelService."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    phase: ModelServicePhase | None = Field(default=None, description="Summary of conditions.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")
    observed_generation: int | None = Field(default=None, description="Last generation seen.")
    endpoint: str | None = Field(default=None, description="URL of the OpenAI-compatible API.")
    replicas: int = Field(default=0, ge=0, description="Serving replicas.")
    ready_replicas: int = Field(default=0, ge=0, description="Replicas ready for traffic.")
    adapters: list[str] = Field(default_factory=list, description="Adapters loaded now.")
    canaries: list[CanaryStatus] = Field(
        default_factory=list, description="Adapter versions being rolled out, one per adapter."
    )


class ModelService(ApiModel):
    """A served model: base + LoRA adapters, OpenAI-compatible, autoscaled on Ray Serve."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    api_version: str = Field(default="graft.dev/v1alpha1", alias="apiVersion")
    kind: str = Field(default=KIND)
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ModelServiceSpec
    status: ModelServiceStatus = Field(default_factory=ModelServiceStatus)
