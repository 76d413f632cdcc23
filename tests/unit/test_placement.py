"""Placement of gangs on node pools, and the ddp/fsdp choice."""

from __future__ import annotations

import pytest
from builders_fixtures import FineTuneJobBuilder, a100_40g, a100_80g, cpu_pool, single_gpu

from graft.api.finetunejob import Method, Parallelism, Placement, Precision, Resources
from graft.config import NodePool
from graft.placement import (
    PlacementError,
    PlacementReason,
    estimate_params_billion,
    estimate_training_memory_gib,
    parallelism,
    parse_params_billion,
    place,
)

POOLS = [a100_80g(), a100_40g(), single_gpu(), cpu_pool()]


def res(**kw: object) -> Resources:
    return Resources.model_validate(kw)


@pytest.mark.parametrize(
    ("resources", "pools", "expected"),
    [
        # 2 nodes x 8 GPUs on the named A100 80G pool
        (res(nodePool="a100-80g", gpus=16), POOLS, ("a100-80g", 2, 8)),
        (res(nodePool="a100-80g", nodes=2, gpusPerNode=8), POOLS, ("a100-80g", 2, 8)),
        # nodes without gpusPerNode: every GPU of each node
        (res(nodePool="a100-80g", nodes=3), POOLS, ("a100-80g", 3, 8)),
        # gpusPerNode without nodes: one node
        (res(nodePool="a100-80g", gpusPerNode=4), POOLS, ("a100-80g", 1, 4)),
        # fewer GPUs than a node has: one partly used node
        (res(nodePool="a100-80g", gpus=4), POOLS, ("a100-80g", 1, 4)),
        # unnamed: no waste wins (the 1-GPU pool for 1 GPU), then price (40G is cheaper)
        (res(gpus=1), POOLS, ("l4", 1, 1)),
        (res(gpus=8), POOLS, ("a100-40g", 1, 8)),
        (res(gpus=16), POOLS, ("a100-40g", 2, 8)),
        # the 40G pool has 2 nodes at most; 24 GPUs need the 80G pool
        (res(gpus=24), POOLS, ("a100-80g", 3, 8)),
        # gpus 0: a CPU rank, on the CPU pool (nothing wasted)
        (res(gpus=0), POOLS, ("cpu", 1, 0)),
        (res(nodePool="cpu", gpus=0), POOLS, ("cpu", 1, 0)),
        # neither: 1 GPU on 1 node; a named CPU pool gives a CPU rank
        (res(), POOLS, ("l4", 1, 1)),
        (res(nodePool="cpu"), POOLS, ("cpu", 1, 0)),
        (res(nodePool="a100-80g"), POOLS, ("a100-80g", 1, 1)),
        # neither, on a cluster with no GPU pool at all (tests, kind): a CPU rank
        (res(), [cpu_pool()], ("cpu", 1, 0)),
        # equal waste and price: the name decides, so the answer is stable
        (
            res(gpus=8),
            [a100_80g(name="b", pricePerGpuHour=1), a100_80g(name="a", pricePerGpuHour=1)],
            ("a", 1, 8),
        ),
    ],
)
def test_place(resources: Resources, pools: list[NodePool], expected: tuple[str, int, int]) -> None:
    pool, n, gpn = expected
    assert place(resources, pools) == Placement(node_pool=pool, nodes=n, gpus_per_node=gpn)


@pytest.mark.parametrize(
    ("resources", "pools", "reason", "fragments"),
    [
        (res(gpus=8), [], PlacementReason.NO_NODE_POOLS, ["nodePools", "Helm values"]),
        (
            res(nodePool="h100", gpus=8),
            POOLS,
            PlacementReason.UNKNOWN_NODE_POOL,
            ["'h100'", "a100-40g, a100-80g, cpu, l4"],
        ),
        (
            res(nodePool="a100-80g", gpus=12),
            POOLS,
            PlacementReason.DOES_NOT_FIT,
            ["12 GPUs do not split evenly", "gpus: 8 or 16", "nodes: 2 with gpusPerNode: 6"],
        ),
        (
            res(nodePool="a100-80g", nodes=1, gpusPerNode=16),
            POOLS,
            PlacementReason.DOES_NOT_FIT,
            ["have 8 GPUs", "16 per node"],
        ),
        (
            res(nodePool="a100-80g", gpus=40),
            POOLS,
            PlacementReason.DOES_NOT_FIT,
            ["at most 4 nodes", "needs 5"],
        ),
        (res(nodePool="cpu", gpus=8), POOLS, PlacementReason.DOES_NOT_FIT, ["no GPUs"]),
        # a job no pool can hold: the message names every pool and why
        (
            res(gpus=64),
            POOLS,
            PlacementReason.DOES_NOT_FIT,
            [
                "no node pool can hold 64 GPUs",
                "'a100-80g': it has at most 4 nodes and the job needs 8",
                "'a100-40g': it has at most 2 nodes",
                "'cpu': it has no GPUs",
            ],
        ),
        (
            res(nodes=2, gpusPerNode=8),
            [single_gpu(), cpu_pool()],
            PlacementReason.DOES_NOT_FIT,
            ["2 nodes x 8 GPUs", "'l4': its nodes have 1 GPUs"],
        ),
    ],
)
def test_refused(
    resources: Resources,
    pools: list[NodePool],
    reason: PlacementReason,
    fragments: list[str],
) -> None:
    with pytest.raises(PlacementError) as err:
        place(resources, pools)
    assert err.value.reason == reason
    for f in fragments:
        assert f in err.value.message


def test_default_request_skips_cpu_pools_when_gpus_exist() -> None:
    assert place(res(), [cpu_pool(), a100_80g()]).node_pool == "a100-80g"


@pytest.mark.parametrize(
    ("params", "method", "precision", "low", "high"),
    [
        (7, Method.FULL, Precision.BF16, 110, 130),  # 16 bytes/param + 20%
        (7, Method.LORA, Precision.BF16, 14, 17),
        (7, Method.QLORA, Precision.BF16, 4, 5),
        (70, Method.LORA, Precision.BF16, 150, 170),
        (1, Method.FULL, Precision.FP32, 17, 19),
    ],
)
def test_memory_estimate(
    params: float, method: Method, precision: Precision, low: float, high: float
) -> None:
    assert low <= estimate_training_memory_gib(params, method, precision) <= high


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7b", 7.0), ("350M", 0.35), ("6.7e9", 6.7), ("7000000000", 7.0), ("big", None), ("-3", None)],
)
def test_parse_params(text: str, expected: float | None) -> None:
    got = parse_params_billion(text)
    assert got == pytest.approx(expected) if expected is not None else got is None


@pytest.mark.parametrize(
    ("uri", "annotations", "expected"),
    [
        ("pvc://models/llama-2-7b-hf", None, 7.0),
        ("pvc://models/Llama-3.1-8B-Instruct/", None, 8.0),
        ("s3://m/qwen2.5-0.5b", None, 0.5),
        ("pvc://models/tinyllama-110m", None, 0.11),
        ("pvc://models/llama", None, None),
        ("pvc://models/llama", {"graft.dev/model-params": "13b"}, 13.0),
        ("pvc://models/llama-7b", {"graft.dev/model-params": "garbage"}, 7.0),
    ],
)
def test_estimate_params(
    uri: str, annotations: dict[str, str] | None, expected: float | None
) -> None:
    got = estimate_params_billion(uri, annotations)
    assert got == pytest.approx(expected) if expected is not None else got is None


@pytest.mark.parametrize(
    ("builder", "params", "expected"),
    [
        # 7B full fine-tune needs ~125 GiB: more than one 80G A100, so fsdp over 16
        (FineTuneJobBuilder().gpus(16).method("full"), 7, Parallelism.FSDP),
        # 7B LoRA fits one GPU: ddp
        (FineTuneJobBuilder().gpus(16).method("lora"), 7, Parallelism.DDP),
        # 70B LoRA does not
        (FineTuneJobBuilder().gpus(16).method("lora"), 70, Parallelism.FSDP),
        # size unknown: ddp
        (FineTuneJobBuilder().gpus(16).method("full"), None, Parallelism.DDP),
        # one GPU: nothing to shard over
        (FineTuneJobBuilder().gpus(1).method("full"), 7, Parallelism.DDP),
        # explicit choices are kept
        (FineTuneJobBuilder().gpus(16).parallelism("fsdp"), 0.1, Parallelism.FSDP),
        (FineTuneJobBuilder().gpus(16).method("full").parallelism("ddp"), 70, Parallelism.DDP),
    ],
)
def test_parallelism(
    builder: FineTuneJobBuilder, params: float | None, expected: Parallelism
) -> None:
    spec = builder.obj().spec
    pool = a100_80g()
    placement = place(spec.resources, [pool])
    assert parallelism(spec, placement, pool, params_billion=params) == expected


def test_parallelism_without_gpu_memory_is_ddp() -> None:
    spec = FineTuneJobBuilder().gpus(16).method("full").obj().spec
    pool = a100_80g(gpuMemoryGiB=0)
    assert parallelism(spec, place(spec.resources, [pool]), pool, params_billion=70) == "ddp"
