"""Placement of a FineTuneJob gang on a node pool, and the choice of ddp or fsdp.

Pure functions of the spec and the operator's node-pool list; the reconciler and
``graft plan`` both call them.

Rules (documented for users in docs/finetunejob.md):

* ``resources.nodePool`` names a pool: that pool or a refusal. Unset: every pool that
  fits is a candidate and the smallest wins: fewest GPUs wasted (GPUs on the gang's nodes
  that the job does not use, since one rank occupies one node), then fewest nodes (less
  traffic between nodes), then the lowest pricePerGpuHour, then the name (for a stable
  answer).
* ``gpus: G``: ``gpusPerNode = min(G, pool.gpusPerNode)``, ``nodes = G / gpusPerNode``,
  which must divide evenly; otherwise the job is refused with valid counts suggested.
  ``gpus: 0`` runs one CPU-only rank.
* ``nodes`` and/or ``gpusPerNode``: taken as given; unset ``nodes`` is 1, unset
  ``gpusPerNode`` is every GPU of the pool's nodes.
* Neither: one node with one GPU; on a pool without GPUs (or when no pool has any, as in a
  CPU-only test cluster) one CPU-only rank.
* Refused: ``gpusPerNode`` above the pool's, ``nodes`` above the pool's ``maxNodes``, GPUs
  on a CPU pool, an unknown pool name, no pools configured.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from graft.api.finetunejob import (
    FineTuneJobSpec,
    Method,
    Parallelism,
    Placement,
    Precision,
    Resources,
)
from graft.config import NodePool

#: Annotation on a FineTuneJob giving the base model's size when its URI does not say it,
#: e.g. "7b", "350m" or "6.7e9". Only ``parallelism: auto`` and ``graft plan`` read it.
ANNOTATION_MODEL_PARAMS = "graft.dev/model-params"


class PlacementReason(StrEnum):
    """Why a job cannot be placed; the condition reason stays Unschedulable."""

    NO_NODE_POOLS = "NoNodePools"
    UNKNOWN_NODE_POOL = "UnknownNodePool"
    DOES_NOT_FIT = "DoesNotFit"


class PlacementError(Exception):
    """The job cannot be placed; ``message`` says what to change."""

    def __init__(self, reason: PlacementReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class _Shape:
    nodes: int
    gpus_per_node: int


def _shape_on(resources: Resources, pool: NodePool, cpu_default: bool) -> _Shape:
    """The gang shape on ``pool``, or PlacementError(DOES_NOT_FIT) saying why not.

    ``cpu_default``: with no GPU count in the spec, a CPU pool is acceptable (it was named,
    or no pool has GPUs); otherwise the default of one GPU rules CPU pools out.
    """
    per_node = pool.gpus_per_node
    if resources.gpus is not None:
        total = resources.gpus
        if total == 0:
            return _Shape(1, 0)
        if per_node == 0:
            raise _no_fit(pool, f"it has no GPUs and the job asks for {total}")
        gpn = min(total, per_node)
        if total % gpn:
            raise _no_fit(pool, _uneven_hint(total, per_node))
        shape = _Shape(total // gpn, gpn)
    elif resources.nodes is not None or resources.gpus_per_node is not None:
        gpn = per_node if resources.gpus_per_node is None else resources.gpus_per_node
        shape = _Shape(resources.nodes or 1, gpn)
    else:
        if per_node == 0 and not cpu_default:
            raise _no_fit(pool, "it has no GPUs and the job asks for 1 by default")
        shape = _Shape(1, 1 if per_node > 0 else 0)
    if shape.gpus_per_node > per_node:
        raise _no_fit(
            pool,
            f"its nodes have {per_node} GPUs and the job asks for {shape.gpus_per_node} per node",
        )
    if pool.max_nodes is not None and shape.nodes > pool.max_nodes:
        raise _no_fit(
            pool, f"it has at most {pool.max_nodes} nodes and the job needs {shape.nodes}"
        )
    return shape


def _uneven_hint(total: int, per_node: int) -> str:
    lower = (total // per_node) * per_node
    upper = lower + per_node
    options = [str(n) for n in (lower, upper) if n > 0]
    nodes = math.ceil(total / per_node)
    alt = ""
    if total % nodes == 0:
        alt = f", or nodes: {nodes} with gpusPerNode: {total // nodes}"
    return (
        f"{total} GPUs do not split evenly into nodes of {per_node}; "
        f"use gpus: {' or '.join(options)}{alt}"
    )


def _no_fit(pool: NodePool, why: str) -> PlacementError:
    return PlacementError(PlacementReason.DOES_NOT_FIT, f"node pool {pool.name!r}: {why}")


def place(resources: Resources, pools: Sequence[NodePool]) -> Placement:
    """Where and in what shape the gang runs; raises PlacementError when nowhere."""
    if not pools:
        raise PlacementError(
            PlacementReason.NO_NODE_POOLS,
            "the operator has no node pools configured; set nodePools in the Helm values "
            "(or GRAFT_NODE_POOLS)",
        )
    any_gpu_pool = any(p.gpus_per_node > 0 for p in pools)
    if resources.node_pool is not None:
        pool = next((p for p in pools if p.name == resources.node_pool), None)
        if pool is None:
            known = ", ".join(sorted(p.name for p in pools))
            raise PlacementError(
                PlacementReason.UNKNOWN_NODE_POOL,
                f"unknown node pool {resources.node_pool!r}; known pools: {known}",
            )
        shape = _shape_on(resources, pool, cpu_default=True)
        return Placement(node_pool=pool.name, nodes=shape.nodes, gpus_per_node=shape.gpus_per_node)

    fits: list[tuple[int, int, float, str, _Shape]] = []
    reasons: list[str] = []
    for pool in pools:
        try:
            shape = _shape_on(resources, pool, cpu_default=not any_gpu_pool)
        except PlacementError as e:
            reasons.append(e.message)
            continue
        wasted = shape.nodes * (pool.gpus_per_node - shape.gpus_per_node)
        fits.append((wasted, shape.nodes, pool.price_per_gpu_hour, pool.name, shape))
    if not fits:
        raise PlacementError(
            PlacementReason.DOES_NOT_FIT,
            f"no node pool can hold {describe_request(resources)}: " + "; ".join(reasons),
        )
    *_, name, shape = min(fits, key=lambda f: f[:4])
    return Placement(node_pool=name, nodes=shape.nodes, gpus_per_node=shape.gpus_per_node)


def describe_request(resources: Resources) -> str:
    """The request in the user's own terms, for messages."""
    if resources.gpus is not None:
        return f"{resources.gpus} GPUs"
    if resources.nodes is not None or resources.gpus_per_node is not None:
        gpn = "all" if resources.gpus_per_node is None else str(resources.gpus_per_node)
        return f"{resources.nodes or 1} nodes x {gpn} GPUs"
    return "1 GPU"


# Parallelism ----------------------------------------------------------------------------

#: Bytes per parameter held on the GPUs while training, before sharding.
#: full: weights and gradients in the compute precision, plus fp32 Adam moments (8) and,
#: with bf16/fp16, an fp32 master copy (4): the usual 16 bytes per parameter.
#: lora: frozen weights in the compute precision; adapters and their optimizer state are
#: small (well under 1% of the weights) and covered by the overhead factor.
#: qlora: 4-bit weights plus quantization constants.
_WEIGHT_BYTES = {Precision.BF16: 2.0, Precision.FP16: 2.0, Precision.FP32: 4.0}
_QLORA_BYTES = 0.55
#: Activations, CUDA context, allocator fragmentation: a rough 20% on top.
_OVERHEAD = 1.2
_GIB = 1024**3


def estimate_training_memory_gib(
    params_billion: float, method: Method, precision: Precision
) -> float:
    """Rough GPU memory (GiB) to train a model of ``params_billion`` on one unsharded GPU."""
    w = _WEIGHT_BYTES[precision]
    if method == Method.FULL:
        per_param = w + w + 8.0 + (4.0 if precision != Precision.FP32 else 0.0)
    elif method == Method.LORA:
        per_param = w
    else:
        per_param = _QLORA_BYTES
    return params_billion * 1e9 * per_param * _OVERHEAD / _GIB


_SIZE = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", re.IGNORECASE)


def parse_params_billion(text: str) -> float | None:
    """Parameters in billions from '7b', '350M', '6.7e9' or '7000000000'; None if unclear."""
    t = text.strip().lower()
    try:
        n = float(t)
    except ValueError:
        pass
    else:
        return n / 1e9 if n > 0 and math.isfinite(n) else None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bm])", t)
    if not m:
        return None
    value = float(m.group(1))
    return value if m.group(2) == "b" else value / 1000


def estimate_params_billion(
    base_model_uri: str, annotations: Mapping[str, Any] | None = None
) -> float | None:
    """The base model's size: the graft.dev/model-params annotation, else a size in the
    URI's last path segment (``llama-2-7b-hf`` -> 7, ``tinyllama-110m`` -> 0.11)."""
    if annotations:
        raw = annotations.get(ANNOTATION_MODEL_PARAMS)
        if isinstance(raw, str):
            parsed = parse_params_billion(raw)
            if parsed is not None:
                return parsed
    last = base_model_uri.rstrip("/").rsplit("/", 1)[-1]
    found = _SIZE.findall(last)
    if not found:
        return None
    value, unit = found[-1]
    size = float(value)
    return size if unit.lower() == "b" else size / 1000


def parallelism(
    spec: FineTuneJobSpec,
    placement: Placement,
    pool: NodePool,
    *,
    params_billion: float | None = None,
) -> Parallelism:
    """``ddp`` or ``fsdp`` (never ``auto``).

    auto: fsdp when the estimated training memory exceeds one GPU of the pool and there is
    more than one GPU to shard over; ddp when it fits, when the size is unknown (pass
    ``params_billion`` from :func:`estimate_params_billion`), on CPU, or when the pool does
    not declare gpuMemoryGiB.
    """
    chosen = spec.resources.parallelism
    if chosen != Parallelism.AUTO:
        return chosen
    gpus = placement.nodes * placement.gpus_per_node
    if params_billion is None or gpus <= 1 or pool.gpu_memory_gi_b <= 0:
        return Parallelism.DDP
    need = estimate_training_memory_gib(params_billion, spec.method, spec.hyperparameters.precision)
    return Parallelism.FSDP if need > pool.gpu_memory_gi_b else Parallelism.DDP
