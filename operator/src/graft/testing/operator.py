"""Run the real ``graft-operator`` process against a test control plane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graft.testing.cluster import TEST_NODE_POOLS
from graft.testing.controlplane import ControlPlane, free_port


class OperatorProcess:
    """``graft-operator`` as a child process, with its log kept in a file."""

    def __init__(
        self,
        cp: ControlPlane,
        log_dir: Path,
        *,
        node_pools: list[dict[str, Any]] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.cp = cp
        self.log_path = log_dir / f"operator-{time.time_ns()}.log"
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.env = {
            **cp.env(),
            "GRAFT_NODE_POOLS": json.dumps(TEST_NODE_POOLS if node_pools is None else node_pools),
            "GRAFT_HEALTH_PORT": str(self.health_port),
            "GRAFT_METRICS_PORT": str(self.metrics_port),
            "GRAFT_LOG_FORMAT": "json",
            "GRAFT_TERMINATION_GRACE_SECONDS": "30",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> OperatorProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "graft.operator_main"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"graft-operator exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.health_port}/healthz", timeout=1
                ) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"graft-operator not healthy after {timeout}s:\n{self.log()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            body: bytes = r.read()
        return body.decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def repo_root() -> Path:
    return Path(os.environ.get("GRAFT_REPO_ROOT", Path(__file__).resolve().parents[4]))
