"""Fixtures for the CLI tests: a tiny model and dataset, and ``graft`` as a real process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from graft.testing.corpus import instruction_records, write_jsonl

# Two shared cores: one intra-op thread per process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from graft.testing.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("cli-assets")
    return {
        "base": build_tiny_model(root / "base", seed=0),
        "alpaca": write_jsonl(root / "alpaca.jsonl", instruction_records(64, seed=3)),
    }
