"""Shared fixtures: one tiny LLaMA per session, small corpora, a job-spec builder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
