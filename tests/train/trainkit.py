"""Helpers of the trainer tests, in a module of their own: every test folder has a
conftest.py, so ``from conftest import ...`` would pick up another folder's."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def make_job(
    assets: dict[str, Path],
    out: Path,
    *,
    stages: list[tuple[str, str, str]] | None = None,
    method: str = "lora",
    max_steps: int = 12,
    every: int | str = 4,
    keep: int = 3,
    lr: float = 3e-3,
    seq: int = 96,
    gbs: int = 8,
    mbs: int = 4,
    dropout: float = 0.0,
    **extra: Any,
) -> dict[str, Any]:
    """A job config as the operator mounts it; stages are (type, asset key, format)."""
    stages = stages or [("SFT", "alpaca", "alpaca")]
    spec: dict[str, Any] = {
        "baseModel": {"uri": f"file://{assets['base']}"},
        "stages": [
            {"type": t, "dataset": {"uri": f"file://{assets[k]}", "format": f}}
            for t, k, f in stages
        ],
        "method": method,
        "lora": {"r": 8, "alpha": 16, "dropout": dropout},
        "hyperparameters": {
            "maxSteps": max_steps,
            "learningRate": lr,
            "globalBatchSize": gbs,
            "microBatchSize": mbs,
            "maxSeqLength": seq,
            "precision": "fp32",
            "warmupSteps": 2,
            "seed": 7,
        },
        "checkpoint": {"uri": f"file://{out}/ckpt", "every": every, "keep": keep},
        "output": {"uri": f"file://{out}/output"},
    }
    for k, v in extra.items():
        spec[k] = copy.deepcopy(v)
    return {"name": "t", "namespace": "default", "attempt": 1, "spec": spec}
