"""The trainer runtime (``python -m graft.runtime.train``): see docs/trainer.md.

Public API, imported lazily so that ``launch_local`` and the error types do not pull in
torch:

- ``run_training(job_config, *, workdir, pvc_root, checkpoint_uri, on_progress,
  stop_event) -> TrainResult``: train in this process.
- ``launch_local(job_config, *, nproc, workdir, pvc_root, on_progress) -> LocalRun``: run
  ``python -m graft.runtime.train`` as a child (torchrun with ``nproc`` workers when > 1).
- ``UserError`` (exit 10), ``RetryableError`` and ``Terminated`` (exit 20).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from graft.runtime.train.errors import (
    EXIT_RETRYABLE,
    EXIT_USER_ERROR,
    RetryableError,
    Terminated,
    TrainerError,
    UserError,
)
from graft.runtime.train.launch import LocalRun, launch_local

if TYPE_CHECKING:
    from graft.runtime.train.runner import StageResult, TrainResult, run_training

__all__ = [
    "EXIT_RETRYABLE",
    "EXIT_USER_ERROR",
    "LocalRun",
    "RetryableError",
    "StageResult",
    "Terminated",
    "TrainResult",
    "TrainerError",
    "UserError",
    "launch_local",
    "run_training",
]


def __getattr__(name: str) -> Any:
    if name in ("run_training", "TrainResult", "StageResult"):
        from graft.runtime.train import runner

        return getattr(runner, name)
    raise AttributeError(name)
