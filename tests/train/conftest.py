"""Shared fixtures: one tiny LLaMA per session, small corpora, a job-spec builder."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from graft.testing.corpus import (
    chat_records,
    domain_documents,
    instruction_records,
    write_jsonl,
    write_text,
)
from graft.testing.tiny_model import build_tiny_model

# Two cores shared with other work: one intra-op thread per process keeps runs repeatable
# in time and lets the 2-process DDP tests run side by side.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-assets")
    base = build_tiny_model(root / "base", seed=0)
    return {
        "base": base,
        "cpt": write_text(root / "data" / "cpt.txt", domain_documents(160, seed=11)),
        "alpaca": write_jsonl(root / "data" / "alpaca.jsonl", instruction_records(160, seed=12)),
        "chat": write_jsonl(root / "data" / "chat.jsonl", chat_records(120, seed=13)),
    }


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


@pytest.fixture
def quiet_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k in (
        "POD_NAME",
        "POD_NAMESPACE",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "GRAFT_NNODES",
        "GRAFT_NPROC_PER_NODE",
        "GRAFT_CHECKPOINT_URI",
        "MASTER_ADDR",
    ):
        monkeypatch.delenv(k, raising=False)
    yield
