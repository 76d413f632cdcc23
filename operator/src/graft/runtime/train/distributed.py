"""Process group, device and model wrapping (DDP or FSDP) for one trainer process."""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from graft.api.finetunejob import Method, Parallelism
from graft.runtime.train.errors import RetryableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any_flag(self, *flags: bool) -> tuple[bool, ...]:
        """OR of each flag across ranks, so every rank takes the same decision."""
        if not self.enabled:
            return flags
        t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(x) for x in t.tolist())

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def init(timeout_s: float = 1800) -> Dist:
    """Join the process group torchrun set up (env rendezvous); one process: no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(
                backend=backend,
                timeout=dt.timedelta(seconds=timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
        except (RuntimeError, ValueError) as e:
            raise RetryableError(
                f"joining the process group failed ({e}); the gang is restarted",
                reason="RendezvousFailed",
            ) from e
    return Dist(rank, local, world, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def estimate_train_bytes(n_params: int, n_trainable: int, method: Method) -> int:
    """Rough per-replica memory for weights, grads and AdamW state (activations excluded)."""
    if method == Method.FULL:
        # fp32 weights + fp32 grads + two fp32 Adam moments.
        return n_params * 16
    weight_bytes = n_params // 2 if method == Method.QLORA else n_params * 2
    return weight_bytes + n_trainable * 16


def choose_parallelism(
    requested: Parallelism, *, n_params: int, n_trainable: int, method: Method, device: torch.device
) -> Parallelism:
    """``auto``: DDP when a full replica fits in 80% of one GPU (leaving activations room).

    On CPU (gloo) FSDP is replaced by DDP: with torch 2.13 FSDP refuses a CPU-only process
    unless told its device, and once told, gathering the full state dict for a checkpoint
    crashes (``cpu_offload=True``: SIGSEGV in rank 0) or never returns (``cpu_offload=False``,
    over 10 minutes for a 150k-parameter model); docs/trainer.md has the experiment."""
    if device.type != "cuda":
        if requested == Parallelism.FSDP:
            log.warning(
                "parallelism fsdp needs CUDA GPUs with torch 2.13; training with ddp on CPU "
                "(same results, every rank holds the whole model)"
            )
        return Parallelism.DDP
    if requested != Parallelism.AUTO:
        return requested
    total = torch.cuda.get_device_properties(device).total_memory
    need = estimate_train_bytes(n_params, n_trainable, method)
    choice = Parallelism.DDP if need <= 0.8 * total else Parallelism.FSDP
    log.info(
        "parallelism chosen",
        extra={
            "choice": choice.value,
            "needGiB": round(need / 2**30, 2),
            "gpuGiB": round(total / 2**30, 2),
        },
    )
    return choice


def wrap(model: torch.nn.Module, parallelism: Parallelism, d: Dist) -> torch.nn.Module:
    """The model as the loop drives it; one process: the model itself."""
    if not d.enabled:
        return model
    if parallelism == Parallelism.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        layer_classes = {
            type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")
        }
        return FSDP(
            model,
            auto_wrap_policy=ModuleWrapPolicy(layer_classes) if layer_classes else None,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            device_id=d.device if d.device.type == "cuda" else None,
            use_orig_params=True,
        )
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        model,
        device_ids=[d.device.index] if d.device.type == "cuda" else None,
        # LoRA leaves most parameters frozen; static graph lets DDP skip unused-param scans.
        find_unused_parameters=False,
    )
