"""The ModelService custom resource: a base model plus LoRA adapters behind an OpenAI API."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field, model_validator

from graft.api.common import ApiModel, Condition, DnsLabel, Quantity, StorageRef, StorageUri

KIND = "ModelService"
PLURAL = "modelservices"


class Engine(StrEnum):
    AUTO = "auto"
    VLLM = "vllm"
    TRANSFORMERS = "transformers"


class Adapter(ApiModel):
    """A LoRA adapter served beside the base model; give exactly one of uri, fromFineTuneJob."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {"oneOf": [{"required": ["uri"]}, {"required": ["fromFineTuneJob"]}]}
    }

    name: DnsLabel = Field(description="Model name clients pass in the OpenAI `model` field.")
    uri: StorageUri | None = Field(default=None, description="Where the peft adapter directory is.")
    from_fine_tune_job: DnsLabel | None = Field(
        default=None,
        description="Name of a FineTuneJob in the same namespace; its status.output is used "
        "once it succeeds, and the adapter is added without restarting the Ray cluster.",
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


class ModelServiceSpec(ApiModel):
    """Desired state of a ModelService."""

    model: ModelSource = Field(description="Base model and adapters.")
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


class ModelServicePhase(StrEnum):
    PENDING = "Pending"
    DEPLOYING = "Deploying"
    READY = "Ready"
    UPDATING = "Updating"
    FAILED = "Failed"


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


class ModelService(ApiModel):
    """A served model: base + LoRA adapters, OpenAI-compatible, autoscaled on Ray Serve."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    api_version: str = Field(default="graft.dev/v1alpha1", alias="apiVersion")
    kind: str = Field(default=KIND)
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ModelServiceSpec
    status: ModelServiceStatus = Field(default_factory=ModelServiceStatus)
