"""Helpers of the CLI tests, in a module of their own: every test folder has a
conftest.py, so ``from conftest import ...`` would pick up another folder's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


def job_yaml(path: Path, spec: dict[str, Any], name: str = "tiny-job") -> Path:
    doc = {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def graft_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "graft.cli", *args]


def graft_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", COLUMNS="200", **extra)
    return env


def run_graft(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        graft_cmd(*args),
        cwd=cwd,
        env=graft_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
