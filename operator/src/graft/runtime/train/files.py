"""Modes of the files the trainer publishes for other identities to read."""

from __future__ import annotations

import os
from pathlib import Path


def process_umask() -> int:
    """This process's umask, read without changing it where Linux reports it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_with_readers(root: Path) -> None:
    """Give every directory and file under ``root`` the modes the umask allows (0755 and
    0644 under the usual 022).

    safetensors writes its files 0600 whatever the umask. The trainer runs as uid 65532 and
    the model servers that load its adapters and imported models as another user (1000 in
    the server image), sharing only a group at most: a 0600 adapter is one they cannot
    open. Found by the real-kubelet tier (docs/images.md).
    """
    mask = process_umask()
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)
