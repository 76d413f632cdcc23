"""Structured logs: one JSON object per line on stderr (stdout carries progress only)."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``extra={...}`` fields become top-level keys, so log pipelines can index them."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "rank": self.rank,
        }
        for k, v in vars(record).items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str | None = None) -> None:
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(rank))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("GRAFT_LOG_LEVEL") or "INFO").upper())
    # Libraries' chatter at INFO is noise in a pod log.
    for name in ("torch.distributed", "urllib3", "kubernetes", "datasketch"):
        logging.getLogger(name).setLevel(logging.WARNING)
