"""``python -m graft.runtime.train``: the entry point of trainer pods and ``graft run``."""

from __future__ import annotations

import sys

from graft.runtime.train import logs
from graft.runtime.train.launch import main_entry


def main() -> int:
    logs.setup()
    return main_entry()


if __name__ == "__main__":
    sys.exit(main())
