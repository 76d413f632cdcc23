"""The trainer publishes adapters and models readable by the servers' user."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from graft.runtime.train.files import process_umask, share_with_readers


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_process_umask_reads_the_current_mask(umask_022: None) -> None:
    assert process_umask() == 0o022
    os.umask(0o077)
    assert process_umask() == 0o077


def test_files_written_0600_become_readable_by_other_users(tmp_path: Path, umask_022: None) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    out = tmp_path / "adapter"
    (out / "merged").mkdir(parents=True)
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(out / "adapter_model.safetensors"))
    (out / "merged" / "config.json").write_text("{}")
    (out / "merged").chmod(0o700)
    assert (out / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o600  # safetensors
    share_with_readers(out)
    assert (out / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (out / "merged" / "config.json").stat().st_mode & 0o777 == 0o644
    assert (out / "merged").stat().st_mode & 0o777 == 0o755
    assert out.stat().st_mode & 0o777 == 0o755
