"""Failure classes of the trainer and the exit codes the operator acts on.

The operator reads the exit code and the termination message (docs/runtime-contract.md):
10 fails the job at once, 20 and anything else restart it from the newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USER_ERROR = 10
EXIT_RETRYABLE = 20
EXIT_CRASH = 1


class TrainerError(Exception):
    """Base of every classified trainer failure; ``str(e)`` says what to do."""

    exit_code: int = EXIT_CRASH
    retryable: bool = True
    default_reason: str = "Crashed"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason

    def termination(self) -> Termination:
        return Termination(
            code=self.exit_code, reason=self.reason, retryable=self.retryable, message=self.message
        )


class UserError(TrainerError):
    """The job cannot succeed as written: bad config, bad data, impossible shape. Exit 10."""

    exit_code = EXIT_USER_ERROR
    retryable = False
    default_reason = "InvalidConfig"


class RetryableError(TrainerError):
    """A transient failure (storage, rendezvous, preemption); restarting can succeed. Exit 20."""

    exit_code = EXIT_RETRYABLE
    retryable = True
    default_reason = "Retryable"


class Terminated(RetryableError):
    """SIGTERM arrived; the final checkpoint has been written (or there was nothing to save)."""

    default_reason = "Terminated"


@dataclass(frozen=True)
class Termination:
    """What the trainer tells the operator when it stops with a non-zero code."""

    code: int
    reason: str
    retryable: bool
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "retryable": self.retryable, "message": self.message}

    @classmethod
    def from_json(cls, data: dict[str, Any], code: int) -> Termination:
        return cls(
            code=code,
            reason=str(data.get("reason", "Crashed")),
            retryable=bool(data.get("retryable", True)),
            message=str(data.get("message", "")),
        )


def classify(exc: BaseException, *, started: bool) -> Termination:
    """Map any exception to an exit code; ``started``: the first optimizer step has run."""
    if isinstance(exc, TrainerError):
        return exc.termination()
    text = f"{type(exc).__name__}: {exc}"
    if _is_oom(exc):
        if not started:
            return Termination(
                EXIT_USER_ERROR,
                "OutOfMemory",
                False,
                f"out of memory before the first step ({text}); lower microBatchSize or "
                "maxSeqLength, turn on gradientCheckpointing, use method lora/qlora, or "
                "request more or larger GPUs",
            )
        return Termination(
            EXIT_CRASH, "OutOfMemory", True, f"out of memory during training: {text}"
        )
    if isinstance(exc, OSError):
        return Termination(
            EXIT_RETRYABLE,
            "StorageError",
            True,
            f"storage error: {text}; the job restarts from its newest checkpoint",
        )
    return Termination(EXIT_CRASH, "Crashed", True, f"trainer crashed: {text}")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def write_termination(path: Path | None, term: Termination) -> None:
    """Write the termination message; never raises (the exit code still tells the story)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(term.to_json())
        # Kubernetes keeps at most 4096 bytes of the message.
        if len(data) > 4000:
            short = term.message[:3500] + "..."
            data = json.dumps({**term.to_json(), "message": short})
        with open(path, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        log.warning(
            "could not write termination message", extra={"path": str(path), "error": str(e)}
        )
