"""``python -m graft.runtime.train``: the entry point of trainer pods and ``graft run``."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn

from graft.runtime.train import logs
from graft.runtime.train.launch import main_entry


def main() -> int:
    logs.setup()
    return main_entry()


def _exit(code: int) -> NoReturn:
    """Exit without the interpreter's teardown. With torch and the model libraries loaded,
    its final garbage collection takes seconds (tens on a busy node), during which a
    trainer that has finished still holds its GPUs and, its heartbeat over, looks hung to
    the operator. Everything the trainer writes is closed (and checkpoints fsynced) before
    ``main`` returns; only logging and the standard streams need a flush."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
