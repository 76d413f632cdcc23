"""FSDP on CPU with the pinned torch (2.13): what torch refuses, and what runs instead.

FSDP needs CUDA here: without a device it refuses a CPU-only process (shown below); told
``device_id=cpu`` it trains, but gathering the full state dict for a checkpoint crashes
rank 0 (SIGSEGV with ``cpu_offload=True``) or never returns (``cpu_offload=False``); see
docs/trainer.md. So ``parallelism: fsdp`` on CPU trains with DDP, whose 2-process gloo
runs are tested in test_resume.py (kill -9 then resume, bitwise).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from graft.api.finetunejob import Method, Parallelism
from graft.runtime.train.distributed import choose_parallelism


def test_torch_fsdp_refuses_a_cpu_only_process(tmp_path: Path) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        with pytest.raises(RuntimeError, match="non-CPU accelerator"):
            FSDP(torch.nn.Linear(4, 4))
    finally:
        dist.destroy_process_group()


def test_fsdp_on_cpu_becomes_ddp() -> None:
    cpu = torch.device("cpu")
    for requested in (Parallelism.FSDP, Parallelism.AUTO, Parallelism.DDP):
        got = choose_parallelism(
            requested, n_params=10, n_trainable=10, method=Method.FULL, device=cpu
        )
        assert got == Parallelism.DDP
