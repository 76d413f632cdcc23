"""``graft plan``: where a FineTuneJob would run and roughly what it would cost.

Placement and parallelism come from ``graft.placement``, the functions the operator uses.
Token counts come from the dataset files when they are on this machine (characters / 4),
else from ``--tokens``. Time and cost come from one stated throughput assumption, derived
from a public reference point (Stanford Alpaca), and are estimates, not measurements.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.api.finetunejob import DatasetFormat, Method, Parallelism, Stage, StageType
from graft.config import NodePool
from graft.local import state as st
from graft.local.spec import JobFile
from graft.placement import (
    PlacementError,
    estimate_params_billion,
    estimate_training_memory_gib,
    parallelism,
    place,
)

# --- the throughput assumption --------------------------------------------------------
#: Stanford Alpaca: 52K instructions, 3 epochs, full fine-tune of LLaMA-7B on 8 A100-80GB
#: in about 3 hours (github.com/tatsu-lab/stanford_alpaca, README).
REF_EXAMPLES = 52_000
REF_EPOCHS = 3
#: Our assumption, not Alpaca's figure: tokens per example including the prompt template.
REF_TOKENS_PER_EXAMPLE = 150
REF_PARAMS_BILLION = 7.0
REF_GPUS = 8
REF_HOURS = 3.0
REF_TOKENS = REF_EXAMPLES * REF_EPOCHS * REF_TOKENS_PER_EXAMPLE  # 23.4M
#: Full fine-tuning of a 7B model: 23.4M tokens / (3 h x 8 GPUs) = about 271 tokens/s/GPU.
FULL_7B_TOKENS_PER_GPU_SECOND = REF_TOKENS / (REF_HOURS * 3600 * REF_GPUS)
#: Per-token work relative to full fine-tuning. LoRA skips the frozen weights' gradients
#: (about 4N instead of 6N FLOPs per token); QLoRA also dequantizes the 4-bit base on
#: every use, taken as 30% slower than LoRA. Estimates from FLOP counts, not measured.
METHOD_SPEEDUP = {Method.FULL: 1.0, Method.LORA: 1.5, Method.QLORA: 1.05}
#: The usual rule of thumb for English text with LLaMA-style BPE tokenizers.
CHARS_PER_TOKEN = 4.0
#: Role headers and separators added to each SFT example by the prompt template.
SFT_TEMPLATE_TOKENS = 8

ASSUMPTION = (
    f"{FULL_7B_TOKENS_PER_GPU_SECOND:.0f} tokens/s per A100 for full fine-tuning of a 7B "
    "model, scaled by 7B / model size, x1.5 for LoRA and x1.05 for QLoRA, linear in GPUs"
)
REFERENCE = (
    "Stanford Alpaca fine-tuned LLaMA-7B (full) on 52K instructions for 3 epochs in about "
    "3 hours on 8 A100-80GB; at an assumed 150 tokens per example that is 23.4M tokens in "
    f"24 GPU-hours = {FULL_7B_TOKENS_PER_GPU_SECOND:.0f} tokens/s/GPU. That is about 4% of "
    "an A100's bf16 peak, so the estimate is conservative: a tuned run (packing, "
    "FlashAttention, larger batches) can be several times faster. Override with "
    "--throughput."
)

#: Used when neither --pools/--node-pools nor the operator's GRAFT_NODE_POOLS/GRAFT_CONFIG
#: name any pool: the pool of the Helm quickstart.
DEFAULT_POOLS = [
    NodePool.model_validate(
        {
            "name": "a100-80g",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
            "gpusPerNode": 8,
            "gpuMemoryGiB": 80,
        }
    )
]


class PlanError(Exception):
    """The plan cannot be made (bad pools file, placement refused); says what to do."""


def tokens_per_gpu_second(params_billion: float, method: Method) -> float:
    """The assumed training throughput of one A100 (see ASSUMPTION)."""
    return (
        FULL_7B_TOKENS_PER_GPU_SECOND
        * (REF_PARAMS_BILLION / params_billion)
        * METHOD_SPEEDUP[method]
    )


def parse_count(text: str) -> int:
    """'12M', '3.5B', '800k', '1e9' or '1000' as an integer."""
    t = text.strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?(?:e\d+)?)([kKmMbBgG]?)", t)
    if not m:
        raise ValueError(f"not a count: {text!r} (use e.g. 12M, 3.5B, 800k)")
    mult = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def params_from_config(model_dir: Path) -> float | None:
    """Parameters (billions) of a LLaMA-style model from its config.json, if readable."""
    try:
        c = json.loads((model_dir / "config.json").read_text())
        h, n_layers = int(c["hidden_size"]), int(c["num_hidden_layers"])
        vocab, inter = int(c["vocab_size"]), int(c.get("intermediate_size", 4 * h))
        heads = int(c.get("num_attention_heads", 1))
        kv = int(c.get("num_key_value_heads", heads))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    head_dim = h // max(heads, 1)
    attn = 2 * h * h + 2 * h * kv * head_dim
    mlp = 3 * h * inter
    embed = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    total = embed + n_layers * (attn + mlp + 2 * h) + h
    return total / 1e9


# --- counting tokens in local datasets ------------------------------------------------


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """JSON objects from a JSONL file or a file holding one JSON array."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            for rec in json.load(f):
                if isinstance(rec, dict):
                    yield rec
            return
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                if isinstance(rec, dict):
                    yield rec


def _example_chars(stage: Stage, path: Path) -> Iterator[int]:
    """Characters of each training document or example of the stage's dataset at ``path``."""
    ds = stage.dataset
    for p in _files(path):
        if ds.format == DatasetFormat.TEXT:
            block = 0
            with open(p, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.strip():
                        block += len(line)
                    elif block:
                        yield block
                        block = 0
            if block:
                yield block
            continue
        for rec in _records(p):
            if ds.format == DatasetFormat.JSONL:
                yield len(str(rec.get(ds.text_field, "")))
            elif ds.format == DatasetFormat.ALPACA:
                yield sum(len(str(rec.get(k) or "")) for k in ("instruction", "input", "output"))
            else:
                msgs = rec.get("messages") or []
                yield sum(len(str(m.get("content", ""))) for m in msgs if isinstance(m, dict))


@dataclass
class StagePlan:
    name: str
    type: str
    source: str
    dataset_tokens: int | None
    examples: int | None
    steps: int | None
    trained_tokens: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "tokensFrom": self.source,
            "datasetTokens": self.dataset_tokens,
            "examples": self.examples,
            "steps": self.steps,
            "trainedTokens": self.trained_tokens,
        }


def _stage_plan(job: JobFile, index: int, given_tokens: int | None, pvc_root: Path) -> StagePlan:
    spec = job.spec
    stage = spec.stages[index]
    hp = spec.hyperparameters
    o = stage.hyperparameters
    seq = (o.max_seq_length if o and o.max_seq_length else None) or hp.max_seq_length
    max_steps = o.max_steps if o and o.max_steps is not None else None
    epochs = o.epochs if o and o.epochs is not None else hp.epochs
    if max_steps is None and not (o and o.epochs is not None):
        max_steps = hp.max_steps
    gbs = hp.global_batch_size
    name = stage.name or f"stage-{index}"
    sft = stage.type == StageType.SFT

    path = st.local_path(stage.dataset.uri, pvc_root)
    counts: list[int] | None = None
    examples: int | None
    dataset_tokens: int | None
    if path is not None and path.exists():
        try:
            counts = [math.ceil(c / CHARS_PER_TOKEN) for c in _example_chars(stage, path)]
        except (OSError, ValueError, UnicodeDecodeError):
            counts = None
    if counts is not None:
        source = "dataset"
        if sft:
            per = [min(c + SFT_TEMPLATE_TOKENS, seq) for c in counts]
            dataset_tokens = sum(per)
            examples = len(per)
            avg = dataset_tokens / max(examples, 1)
        else:
            dataset_tokens = sum(c + 1 for c in counts)  # + EOS per document
            examples = dataset_tokens // seq
            avg = float(seq)
    elif given_tokens is not None:
        source = "--tokens"
        dataset_tokens = given_tokens
        examples = given_tokens // seq if not sft else None
        avg = float(seq)
    else:
        source = "maxSteps" if max_steps else "unknown"
        dataset_tokens = examples = None
        avg = float(seq)

    steps: int | None
    if max_steps is not None:
        steps = max_steps
        trained = int(steps * gbs * avg)
        if source == "unknown":
            source = "maxSteps"
    elif examples is not None:
        steps = epochs * (examples // gbs)
        trained = int(steps * gbs * avg)
    elif dataset_tokens is not None:
        steps = None
        trained = epochs * dataset_tokens
    else:
        steps = None
        trained = None
    return StagePlan(name, stage.type.value, source, dataset_tokens, examples, steps, trained)


def make_plan(
    job: JobFile,
    pools: Sequence[NodePool],
    *,
    tokens: Sequence[int] = (),
    params_billion: float | None = None,
    throughput: float | None = None,
    pvc_root: Path = st.DEFAULT_PVC_ROOT,
) -> dict[str, Any]:
    """The plan as a JSON-able dict (what ``-o json`` prints)."""
    spec = job.spec
    try:
        placement = place(spec.resources, pools)
    except PlacementError as e:
        raise PlanError(f"{job.path}: spec.resources: {e.message}") from None
    pool = next(p for p in pools if p.name == placement.node_pool)
    gpus = placement.nodes * placement.gpus_per_node

    params_source = "--params"
    p_b = params_billion
    if p_b is None:
        p_b = estimate_params_billion(spec.base_model.uri, job.annotations)
        params_source = "name or graft.dev/model-params"
    if p_b is None:
        local = st.local_path(spec.base_model.uri, pvc_root)
        if local is not None:
            p_b = params_from_config(local)
            params_source = "config.json"
    if p_b is None:
        params_source = "unknown"

    par = parallelism(spec, placement, pool, params_billion=p_b)
    memory: dict[str, Any] = {"gpuMemoryGiB": pool.gpu_memory_gi_b or None}
    if p_b is not None:
        whole = estimate_training_memory_gib(p_b, spec.method, spec.hyperparameters.precision)
        per_gpu = whole / gpus if par == Parallelism.FSDP and gpus > 1 else whole
        memory.update(
            unshardedGiB=round(whole, 2),
            perGpuGiB=round(per_gpu, 2),
            fits=(per_gpu <= pool.gpu_memory_gi_b) if pool.gpu_memory_gi_b else None,
        )

    stages = []
    for i in range(len(spec.stages)):
        given = tokens[i] if i < len(tokens) else (tokens[-1] if tokens else None)
        stages.append(_stage_plan(job, i, given, pvc_root))
    known = [s.trained_tokens for s in stages]
    total = sum(t for t in known if t is not None) if all(t is not None for t in known) else None

    if throughput is not None:
        tps, tps_source = throughput, "--throughput"
    elif p_b is not None:
        tps, tps_source = tokens_per_gpu_second(p_b, spec.method), "assumption"
    else:
        tps, tps_source = None, "unknown (pass --params)"
    gpu_hours = wall = cost = None
    if total is not None and tps and gpus > 0:
        gpu_hours = total / tps / 3600
        wall = gpu_hours / gpus
        if pool.price_per_gpu_hour > 0:
            cost = gpu_hours * pool.price_per_gpu_hour
    return {
        "name": job.name,
        "nodePool": placement.node_pool,
        "nodes": placement.nodes,
        "gpusPerNode": placement.gpus_per_node,
        "gpus": gpus,
        "parallelism": par.value,
        "method": spec.method.value,
        "precision": spec.hyperparameters.precision.value,
        "paramsBillion": round(p_b, 6) if p_b is not None else None,
        "paramsFrom": params_source,
        "memory": memory,
        "stages": [s.to_json() for s in stages],
        "tokens": total,
        "throughput": {
            "tokensPerSecondPerGpu": round(tps, 2) if tps else None,
            "from": tps_source,
            "assumption": ASSUMPTION,
            "reference": REFERENCE,
        },
        "gpuHours": _r(gpu_hours),
        "wallHours": _r(wall),
        "pricePerGpuHour": pool.price_per_gpu_hour or None,
        "cost": _r(cost),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def load_pools(pools_file: str | None, node_pools_json: str | None) -> tuple[list[NodePool], str]:
    """Pools from --pools FILE, --node-pools JSON, the operator's environment, or the
    default; and where they came from."""
    import yaml
    from pydantic import ValidationError

    from graft.config import ConfigError, load_settings

    raw: Any
    if node_pools_json is not None:
        try:
            raw = yaml.safe_load(node_pools_json)
        except yaml.YAMLError as e:
            raise PlanError(f"--node-pools: not JSON or YAML: {e}") from None
        source = "--node-pools"
    elif pools_file is not None:
        try:
            raw = yaml.safe_load(Path(pools_file).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise PlanError(f"--pools {pools_file}: cannot read it: {e}") from None
        source = pools_file
    else:
        try:
            settings = load_settings()
        except ConfigError as e:
            raise PlanError(str(e)) from None
        if settings.node_pools:
            return list(settings.node_pools), "GRAFT_NODE_POOLS / GRAFT_CONFIG"
        return list(DEFAULT_POOLS), "default (one a100-80g pool of 8-GPU nodes; see --pools)"
    if isinstance(raw, dict):
        raw = raw.get("nodePools", [])
    if not isinstance(raw, list):
        raise PlanError(f"{source}: expected a list of node pools (or a mapping with nodePools)")
    try:
        return [NodePool.model_validate(p) for p in raw], source
    except ValidationError as e:
        raise PlanError(f"{source}: invalid node pool: {e}") from None


def render(plan: dict[str, Any], pools_source: str, console: Any) -> None:
    """The plan as rich tables."""
    from rich.table import Table

    def fmt(x: Any, unit: str = "", digits: int = 1) -> str:
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:,.{digits}f}{unit}"
        if isinstance(x, int):
            return f"{x:,}{unit}"
        return f"{x}{unit}"

    mem = plan["memory"]
    t = Table(title=f"graft plan: {plan['name']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("node pool", f"{plan['nodePool']}  [dim](pools: {pools_source})[/]")
    t.add_row(
        "gang", f"{plan['nodes']} node(s) x {plan['gpusPerNode']} GPU(s) = {plan['gpus']} GPUs"
    )
    t.add_row("parallelism", plan["parallelism"])
    t.add_row("method", f"{plan['method']} ({plan['precision']})")
    p_b = plan["paramsBillion"]
    t.add_row("model size", f"{fmt(p_b, 'B', 3)} parameters [dim](from {plan['paramsFrom']})[/]")
    if "unshardedGiB" in mem:
        fits = {True: "fits", False: "[red]does not fit[/]", None: "GPU memory unknown"}[
            mem.get("fits")
        ]
        t.add_row(
            "memory",
            f"{fmt(mem['perGpuGiB'], ' GiB')} per GPU ({fmt(mem['unshardedGiB'], ' GiB')} "
            f"unsharded) of {fmt(mem['gpuMemoryGiB'], ' GiB', 0)}: {fits}",
        )
    else:
        t.add_row("memory", "unknown: pass --params (e.g. 7b)")
    t.add_row("tokens", fmt(plan["tokens"]))
    tp = plan["throughput"]
    t.add_row("throughput", f"{fmt(tp['tokensPerSecondPerGpu'])} tokens/s/GPU ({tp['from']})")
    t.add_row("GPU-hours", fmt(plan["gpuHours"], "", 2))
    t.add_row("wall time", fmt(plan["wallHours"], " h", 2))
    price = plan["pricePerGpuHour"]
    t.add_row(
        "cost",
        f"{fmt(plan['cost'], '', 2)} at {price}/GPU-hour"
        if plan["cost"] is not None
        else "- (the pool has no pricePerGpuHour)",
    )
    console.print(t)

    s = Table(title="stages", title_justify="left")
    for col in ("stage", "type", "tokens from", "dataset tokens", "examples", "steps", "trained"):
        s.add_column(col, justify="right" if col in ("dataset tokens", "examples") else "left")
    for sp in plan["stages"]:
        s.add_row(
            sp["name"],
            sp["type"],
            sp["tokensFrom"],
            fmt(sp["datasetTokens"]),
            fmt(sp["examples"]),
            fmt(sp["steps"]),
            fmt(sp["trainedTokens"]),
        )
    console.print(s)
    console.print(f"[dim]Assumption: {tp['assumption']}.[/]")
    console.print(f"[dim]Reference: {tp['reference']}[/]")
    if plan["tokens"] is None:
        console.print(
            "[yellow]Token count unknown for some stage: the dataset is not on this machine; "
            "pass --tokens (per stage, comma-separated, e.g. 50M,10M).[/]"
        )
