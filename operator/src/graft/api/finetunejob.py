"""The FineTuneJob custom resource: continued pre-training and fine-tuning of a base model."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, StringConstraints, field_validator, model_validator

from graft.api.common import (
    ApiModel,
    Condition,
    DnsLabel,
    Quantity,
    S3Access,
    StorageRef,
    StorageUri,
)

KIND = "FineTuneJob"
PLURAL = "finetunejobs"

DURATION_PATTERN = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"


class StageType(StrEnum):
    CONTINUED_PRETRAINING = "ContinuedPretraining"
    SFT = "SFT"


class DatasetFormat(StrEnum):
    TEXT = "text"
    JSONL = "jsonl"
    ALPACA = "alpaca"
    CHAT = "chat"


class EvaluationFormat(StrEnum):
    """Formats of an evaluation set: the training formats, plus qa for the fact score."""

    TEXT = "text"
    JSONL = "jsonl"
    ALPACA = "alpaca"
    CHAT = "chat"
    QA = "qa"


class AnswerMatch(StrEnum):
    EXACT = "exact"
    CONTAINS = "contains"


class Method(StrEnum):
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"


class Scheduler(StrEnum):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class Precision(StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class Parallelism(StrEnum):
    AUTO = "auto"
    DDP = "ddp"
    FSDP = "fsdp"


class Dataset(ApiModel):
    """Where a stage's data is and how to read it."""

    uri: StorageUri = Field(
        description="File or directory of the data: pvc://, s3://, file:// (or hf:// with egress)."
    )
    format: DatasetFormat = Field(
        default=DatasetFormat.JSONL,
        description="text: plain text, one document per blank-line-separated block (or per file); "
        "jsonl: one JSON object per line with a text field; alpaca: instruction/input/output "
        "records (JSON array or JSONL); chat: JSONL of {messages: [{role, content}]}.",
    )
    text_field: str = Field(
        default="text",
        min_length=1,
        max_length=256,
        description="For format jsonl: the key holding each document's text.",
    )


class StageHyperparameters(ApiModel):
    """Per-stage overrides of the job's hyperparameters; unset fields inherit."""

    epochs: int | None = Field(default=None, ge=1, le=1000, description="Passes over the data.")
    max_steps: int | None = Field(
        default=None, ge=1, le=10**9, description="Optimizer steps; when set, wins over epochs."
    )
    learning_rate: float | None = Field(default=None, gt=0, le=1, description="Peak learning rate.")
    warmup_steps: int | None = Field(
        default=None, ge=0, le=10**9, description="Linear warm-up steps."
    )
    max_seq_length: int | None = Field(
        default=None, ge=8, le=1048576, description="Tokens per training sequence."
    )


class Stage(ApiModel):
    """One training stage; stages run in order, each from the previous stage's weights."""

    name: DnsLabel | None = Field(
        default=None, description="Name shown in progress and logs; defaults to stage-<index>."
    )
    type: StageType = Field(
        description="ContinuedPretraining: causal-LM loss on packed raw domain text. "
        "SFT: supervised fine-tuning on instruction data, loss on response tokens only."
    )
    dataset: Dataset = Field(description="The stage's training data.")
    hyperparameters: StageHyperparameters | None = Field(
        default=None, description="Overrides of spec.hyperparameters for this stage."
    )


class NearDedup(ApiModel):
    """Near-duplicate removal with MinHash LSH."""

    enabled: bool = Field(default=True, description="Remove near-duplicate documents.")
    threshold: float = Field(
        default=0.85,
        ge=0.5,
        le=1.0,
        description="Estimated Jaccard similarity of word shingles above which two documents "
        "count as near-duplicates.",
    )
    num_perm: int = Field(
        default=128, ge=16, le=1024, description="MinHash permutations (accuracy vs speed)."
    )
    shingle_size: int = Field(default=5, ge=1, le=32, description="Words per shingle.")


class DataPrep(ApiModel):
    """Cleaning and de-duplication before training; counts go to status.data."""

    exact_dedup: bool = Field(
        default=True,
        description="Drop documents whose normalized text (case, whitespace) was already seen.",
    )
    near_dedup: NearDedup = Field(
        default_factory=NearDedup, description="MinHash near-duplicate removal."
    )
    min_chars: int = Field(
        default=16, ge=0, le=10**9, description="Drop documents shorter than this."
    )
    max_chars: int | None = Field(
        default=None,
        ge=1,
        le=10**9,
        description="Drop documents longer than this (unset: no limit).",
    )
    max_non_alpha_ratio: float = Field(
        default=0.6,
        ge=0,
        le=1,
        description="Quality filter: drop documents where more than this share of characters "
        "is neither a letter nor whitespace (markup, tables of numbers, binary junk).",
    )
    eval_fraction: float = Field(
        default=0.05,
        ge=0,
        le=0.5,
        description="Share of documents held out for evaluation, chosen by a hash of the text "
        "so the split is deterministic.",
    )


class Lora(ApiModel):
    """LoRA adapter shape (method lora or qlora)."""

    r: int = Field(default=16, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: int = Field(default=32, ge=1, le=4096, description="Scaling numerator (alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        max_length=64,
        description="Names of the modules that get adapters (for LLaMA: q_proj, k_proj, v_proj, "
        "o_proj, gate_proj, up_proj, down_proj).",
    )


class Hyperparameters(ApiModel):
    """Training hyperparameters for every stage (stages may override some)."""

    epochs: int = Field(default=1, ge=1, le=1000, description="Passes over each stage's data.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=10**9,
        description="Optimizer steps per stage; when set, wins over epochs.",
    )
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    scheduler: Scheduler = Field(
        default=Scheduler.COSINE, description="Learning-rate schedule after warm-up."
    )
    warmup_steps: int = Field(default=0, ge=0, le=10**9, description="Linear warm-up steps.")
    global_batch_size: int = Field(
        default=8,
        ge=1,
        le=2**20,
        description="Sequences per optimizer step across all ranks "
        "(micro-batch x ranks x gradient-accumulation steps).",
    )
    micro_batch_size: int = Field(
        default=1, ge=1, le=2**16, description="Sequences per rank per forward."
    )
    max_seq_length: int = Field(
        default=2048, ge=8, le=1048576, description="Tokens per training sequence."
    )
    seed: int = Field(
        default=42,
        ge=0,
        le=2**53,
        description="Seed for weights init, shuffling, dropout (at most 2^53, exact in JSON).",
    )
    precision: Precision = Field(
        default=Precision.BF16,
        description="Compute precision: bf16 (A100 and newer), fp16, or fp32 (CPU).",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in backward to save memory."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(
        default=1.0, ge=0, le=1e6, description="Gradient clipping norm (0 turns clipping off)."
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> Hyperparameters:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"globalBatchSize ({self.global_batch_size}) must be a multiple of "
                f"microBatchSize ({self.micro_batch_size})"
            )
        return self


class Resources(ApiModel):
    """Where and on how much hardware the job runs."""

    node_pool: DnsLabel | None = Field(
        default=None,
        description="Name of a node pool from the operator's configuration; unset: the "
        "smallest pool that fits.",
    )
    gpus: int | None = Field(
        default=None,
        ge=0,
        le=4096,
        description="Total GPUs; split into nodes of the pool's gpusPerNode. Use either gpus "
        "or nodes x gpusPerNode.",
    )
    nodes: int | None = Field(default=None, ge=1, le=512, description="Nodes (ranks) in the gang.")
    gpus_per_node: int | None = Field(
        default=None, ge=0, le=16, description="GPUs per node; with nodes."
    )
    cpu: Quantity | None = Field(default=None, description="CPU request per pod, e.g. '8'.")
    memory: Quantity | None = Field(default=None, description="Memory request per pod, e.g. 64Gi.")
    parallelism: Parallelism = Field(
        default=Parallelism.AUTO,
        description="ddp: a full replica per GPU; fsdp: shard weights and optimizer state; "
        "auto: ddp when the model and optimizer fit one GPU, else fsdp.",
    )

    @model_validator(mode="after")
    def _one_way(self) -> Resources:
        if self.gpus is not None and (self.nodes is not None or self.gpus_per_node is not None):
            raise ValueError("set either gpus or nodes/gpusPerNode, not both")
        return self


class Checkpoint(ApiModel):
    """How often and where checkpoints are written."""

    uri: StorageUri | None = Field(
        default=None,
        description="Directory for checkpoints (pvc:// or s3://); unset: <output.uri>/checkpoints.",
    )
    every: int | Annotated[str, StringConstraints(pattern=DURATION_PATTERN, min_length=2)] = Field(
        default="30m",
        description="A step count (500) or a duration ('30m', '1h', '90s'). A final checkpoint "
        "is also written on SIGTERM.",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    keep: int = Field(default=3, ge=1, le=100, description="Complete checkpoints kept (last K).")

    @field_validator("every")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("every must be a positive step count or a duration like '30m'")
        if isinstance(v, str) and duration_seconds(v) <= 0:
            raise ValueError("every must be a duration like '30m', '1h' or '90s'")
        return v


def duration_seconds(text: str) -> int:
    """Seconds in a duration like '1h30m', '45s'."""
    m = re.fullmatch(DURATION_PATTERN, text)
    if not m or not text:
        raise ValueError(f"not a duration: {text!r} (use for example '30m', '1h', '90s')")
    h, mi, s = (int(g[:-1]) if g else 0 for g in m.groups())
    return h * 3600 + mi * 60 + s


class Output(ApiModel):
    """Where the result goes."""

    uri: StorageUri = Field(description="Directory for the final adapter or model.")
    merge: bool = Field(
        default=False,
        description="For lora: also write the adapter merged into the base weights.",
    )


class RestartPolicy(ApiModel):
    """Retries after node loss, eviction, preemption or retryable trainer exits."""

    max_restarts: int = Field(
        default=3, ge=0, le=1000, description="New attempts allowed before the job fails."
    )
    backoff_seconds: int = Field(
        default=10, ge=0, le=3600, description="Wait before the first restart; doubles each time."
    )
    max_backoff_seconds: int = Field(
        default=300, ge=0, le=86400, description="Upper bound of the doubling backoff."
    )
    heartbeat_timeout_seconds: int | None = Field(
        default=None,
        ge=5,
        le=86400,
        description="A running gang whose trainer heartbeat (the progress Lease's renewTime) "
        "is older than this is hung: it is torn down and restarted from the last checkpoint "
        "(reason TrainerHung). Unset: the operator's GRAFT_HEARTBEAT_TIMEOUT_SECONDS "
        "(default 600). Must exceed the longest optimizer step plus checkpoint write.",
    )


class EvaluationDataset(ApiModel):
    """One held-out set the trainer evaluates before training, after each stage and at the end."""

    name: DnsLabel = Field(description="Name shown in status.evaluation and in TensorBoard.")
    uri: StorageUri = Field(
        description="File or directory of the data: pvc://, s3://, file:// (or hf:// with egress)."
    )
    format: EvaluationFormat = Field(
        default=EvaluationFormat.JSONL,
        description="text, jsonl, alpaca, chat: as for a stage's dataset; loss and perplexity "
        "on it (for alpaca and chat, on the response tokens only). qa: JSONL of "
        "{question, answer} (answer a string or a list of accepted strings); the model answers "
        "each question by greedy generation and the score is the share answered right.",
    )
    text_field: str = Field(
        default="text",
        min_length=1,
        max_length=256,
        description="For format jsonl: the key holding each document's text.",
    )
    max_examples: int = Field(
        default=200,
        ge=1,
        le=100000,
        description="Evaluate at most this many documents or questions (the first ones), so an "
        "evaluation stays a small share of the training time.",
    )


class EvaluationGate(ApiModel):
    """What the final evaluation must show for the output to be promotable."""

    max_perplexity_ratio: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="Highest allowed final / baseline perplexity on the held-out text sets "
        "(0.9: at least 10% lower than the base model; 1.0: no worse).",
    )
    min_score: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Lowest allowed final fact score on the qa sets (share of questions "
        "answered right, 0 to 1).",
    )


class Evaluation(ApiModel):
    """Held-out evaluation of the model before, during and after training, and its gate."""

    datasets: list[EvaluationDataset] = Field(
        min_length=1,
        max_length=16,
        description="Held-out sets; names must be unique. Keep them out of the training data.",
    )
    gate: EvaluationGate | None = Field(
        default=None,
        description="Conditions on the final figures; unset: evaluate and report, never block. "
        "A job whose gate fails still ends Succeeded, with status.output.promotable false.",
    )
    match: AnswerMatch = Field(
        default=AnswerMatch.CONTAINS,
        description="How a qa answer counts as right after lower-casing and collapsing "
        "whitespace: exact (the whole generated answer) or contains (the expected answer "
        "appears in it).",
    )
    max_new_tokens: int = Field(
        default=48, ge=1, le=1024, description="Tokens generated per qa question (greedy)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Evaluation:
        names = [d.name for d in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"evaluation dataset names must be unique; repeated: {dupes}")
        gate = self.gate
        formats = {d.format for d in self.datasets}
        if gate is not None and gate.min_score is not None and EvaluationFormat.QA not in formats:
            raise ValueError("gate.minScore needs a dataset with format qa; add one or unset it")
        if (
            gate is not None
            and gate.max_perplexity_ratio is not None
            and not formats - {EvaluationFormat.QA}
        ):
            raise ValueError(
                "gate.maxPerplexityRatio needs a text, jsonl, alpaca or chat dataset; "
                "add one or unset it"
            )
        return self


class FineTuneJobSpec(ApiModel):
    """Desired state of a FineTuneJob."""

    base_model: StorageRef = Field(description="The open base model to start from.")
    stages: list[Stage] = Field(
        min_length=1,
        max_length=16,
        description="Ordered training stages; each starts from the previous stage's weights.",
    )
    data: DataPrep = Field(
        default_factory=DataPrep, description="Cleaning and de-duplication of every dataset."
    )
    method: Method = Field(
        default=Method.LORA,
        description="full: all weights; lora: adapters (peft); qlora: adapters on a 4-bit "
        "base (CUDA only).",
    )
    lora: Lora = Field(default_factory=Lora, description="Adapter shape for lora and qlora.")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Training hyperparameters."
    )
    resources: Resources = Field(
        default_factory=Resources, description="Node pool, GPUs and parallelism."
    )
    checkpoint: Checkpoint = Field(
        default_factory=Checkpoint, description="Checkpoint storage and frequency."
    )
    output: Output = Field(description="Where the final adapter or model is written.")
    restart_policy: RestartPolicy = Field(
        default_factory=RestartPolicy, description="Recovery from failures."
    )
    evaluation: Evaluation | None = Field(
        default=None,
        description="Held-out evaluation before training (baseline), after each stage and at "
        "the end, with an optional gate on the result.",
    )
    suspend: bool = Field(
        default=False,
        description="true: checkpoint and remove the pods; false again: resume from there.",
    )
    queue_name: DnsLabel | None = Field(
        default=None, description="Kueue LocalQueue; adds the kueue.x-k8s.io/queue-name label."
    )
    s3: S3Access | None = Field(
        default=None,
        description="Credentials or workload identity for s3:// URIs; see docs/security.md.",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="Trainer image; unset: the operator's default.",
    )


class Progress(ApiModel):
    """Training progress, rolled up from rank 0."""

    stage: str | None = Field(default=None, description="Name of the stage in progress.")
    step: int = Field(default=0, ge=0, description="Optimizer steps done in this stage.")
    total_steps: int = Field(default=0, ge=0, description="Optimizer steps in this stage.")
    epoch: float = Field(default=0.0, ge=0, description="Fractional epoch.")
    loss: float | None = Field(default=None, description="Recent training loss.")
    tokens_per_second: float | None = Field(default=None, ge=0, description="Throughput.")
    eta: str | None = Field(default=None, description="Estimated time left, e.g. 1h20m.")


class CheckpointRef(ApiModel):
    step: int = Field(ge=0, description="Step the checkpoint holds.")
    uri: str = Field(description="Where it is.")
    time: str | None = Field(default=None, description="When it was completed (RFC 3339).")


class DataCounts(ApiModel):
    documents_in: int = Field(default=0, ge=0, description="Documents read.")
    documents_out: int = Field(default=0, ge=0, description="Documents kept for training.")
    duplicates_removed: int = Field(default=0, ge=0, description="Exact and near duplicates.")
    filtered: int = Field(default=0, ge=0, description="Dropped by length or quality filters.")


class OutputKind(StrEnum):
    ADAPTER = "adapter"
    MODEL = "model"


class OutputStatus(ApiModel):
    uri: str = Field(description="Where the result is.")
    kind: OutputKind = Field(description="adapter (peft directory) or model (full weights).")
    promotable: bool | None = Field(
        default=None,
        description="Set by the operator when the job succeeds: false when spec.evaluation.gate "
        "failed (or could not be checked); true otherwise. A ModelService serves a "
        "fromFineTuneJob adapter only when it is not false.",
    )


class EvaluationMetrics(ApiModel):
    """Figures of one evaluation over all held-out sets."""

    loss: float | None = Field(
        default=None, ge=0, description="Mean token loss over the text sets (token-weighted)."
    )
    perplexity: float | None = Field(default=None, ge=1, description="exp(loss).")
    score: float | None = Field(
        default=None, ge=0, le=1, description="Share of qa questions answered right."
    )


class StageEvaluation(EvaluationMetrics):
    """The evaluation after one stage."""

    name: str = Field(description="The stage evaluated after.")


class EvaluationStatus(ApiModel):
    """Results of spec.evaluation, reported by the trainer and checked by the operator."""

    baseline: EvaluationMetrics | None = Field(
        default=None, description="The base model, before any training."
    )
    stages: list[StageEvaluation] = Field(
        default_factory=list, description="After each finished stage, in order."
    )
    final: EvaluationMetrics | None = Field(
        default=None, description="The trained model (base + adapter, or full weights)."
    )
    passed: bool | None = Field(
        default=None,
        description="The gate's verdict on final vs baseline; null while unknown or without "
        "a gate.",
    )


class Placement(ApiModel):
    node_pool: str = Field(description="The pool the gang runs on.")
    nodes: int = Field(ge=1, description="Pods (ranks) in the gang.")
    gpus_per_node: int = Field(ge=0, description="GPUs requested by each pod.")


class FailureRecord(ApiModel):
    reason: str = Field(description="Why the attempt failed (NodeLost, PodEvicted, UserError...).")
    message: str = Field(default="", description="What happened and what to do.")
    time: str | None = Field(default=None, description="When the operator noticed (RFC 3339).")
    node: str | None = Field(default=None, description="Node of the failed rank, if any.")
    rank: int | None = Field(default=None, description="Rank that failed, if one did.")


class FineTuneJobPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class FineTuneJobStatus(ApiModel):
    """Observed state of a FineTuneJob."""

    # status.graft holds the operator's own bookkeeping (Kopf progress and diff base).
    model_config = ApiModel.model_config | {"extra": "ignore"}

    phase: FineTuneJobPhase | None = Field(
        default=None, description="Summary derived from conditions, for printer columns."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")
    observed_generation: int | None = Field(default=None, description="Last generation seen.")
    placement: Placement | None = Field(default=None, description="Resolved pool and gang shape.")
    progress: Progress | None = Field(default=None, description="Training progress.")
    progress_summary: str | None = Field(
        default=None, description="step/totalSteps for the printer column."
    )
    last_checkpoint: CheckpointRef | None = Field(default=None, description="Newest checkpoint.")
    restarts: int = Field(default=0, ge=0, description="Attempts restarted after a failure.")
    attempt: int = Field(default=0, ge=0, description="Current attempt number (1-based).")
    gpu_hours: float = Field(default=0.0, ge=0, description="GPU-hours used by all attempts.")
    cost: float | None = Field(
        default=None, ge=0, description="gpuHours x the pool's pricePerGpuHour."
    )
    data: DataCounts | None = Field(default=None, description="Data preparation counts.")
    evaluation: EvaluationStatus | None = Field(
        default=None, description="Held-out evaluation results (spec.evaluation)."
    )
    output: OutputStatus | None = Field(default=None, description="The result, once succeeded.")
    last_failure: FailureRecord | None = Field(
        default=None, description="The most recent failure of an attempt."
    )
    restart_at: str | None = Field(
        default=None, description="While Restarting: when the next attempt starts (backoff)."
    )
    avoid_nodes: list[str] = Field(
        default_factory=list,
        description="Nodes where attempts failed; new attempts prefer other nodes.",
    )
    untrusted_reports: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Digests of the trainer reports whose URIs were dropped (newest last, "
        "at most 16): each distinct forged report gets one UntrustedReport Event, not one "
        "per pass.",
    )
    completed_attempts_gpu_hours: float = Field(
        default=0.0,
        ge=0,
        description="GPU-hours of attempts already torn down; gpuHours adds the current one.",
    )
    spec_hash: str | None = Field(
        default=None,
        description="Hash of the spec (minus suspend) the job started with; later changes "
        "are refused.",
    )
    start_time: str | None = Field(default=None, description="When the first attempt started.")
    completion_time: str | None = Field(default=None, description="When the job finished.")


class FineTuneJob(ApiModel):
    """A fine-tuning job: base model + data in, adapter or model out."""

    api_version: str = Field(default="graft.dev/v1alpha1", alias="apiVersion")
    kind: str = Field(default=KIND)
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus)

    model_config = ApiModel.model_config | {"extra": "ignore"}
