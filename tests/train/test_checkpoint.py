"""Checkpoint store: atomic writes, manifest verification, fallback, pruning."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from graft.runtime.train.checkpoint import CheckpointStore, FileEntry, checkpoint_name
from graft.runtime.train.config import Location, resolve


def store(root: Path, keep: int = 3) -> CheckpointStore:
    return CheckpointStore(resolve(f"file://{root}", Path("/x")), keep, root / "staging")


def save(st: CheckpointStore, step: int, payload: Any, stage: int = 0) -> None:
    name = checkpoint_name(stage, step)
    st.begin(name)
    entries = st.write(
        name,
        {
            "model.pt": lambda w: torch.save(payload, w),  # type: ignore[arg-type]
            "state.json": lambda w: w.write(json.dumps({"s": step}).encode()),
        },
    )
    st.commit(name, entries, {})


def test_layout_manifest_and_roundtrip(tmp_path: Path) -> None:
    st = store(tmp_path / "ck")
    t = torch.randn(50, 7)
    save(st, 4, {"w": t})
    d = tmp_path / "ck" / "ckpt-s00-00000004"
    man = json.loads((d / "manifest.json").read_text())
    assert man["complete"] and man["step"] == 4 and set(man["files"]) == {"model.pt", "state.json"}
    assert man["files"]["model.pt"]["size"] == (d / "model.pt").stat().st_size
    assert not list((tmp_path / "ck").glob(".tmp-*"))
    info = st.newest_valid()
    assert info is not None and info.name == "ckpt-s00-00000004"
    assert torch.equal(torch.load(d / "model.pt", weights_only=True)["w"], t)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no-manifest"])
def test_damaged_newest_falls_back(tmp_path: Path, damage: str) -> None:
    st = store(tmp_path / "ck", keep=5)
    for step in (2, 4, 6):
        save(st, step, {"w": torch.full((100,), float(step))})
    newest = tmp_path / "ck" / "ckpt-s00-00000006"
    f = newest / "model.pt"
    if damage == "truncate":
        os.truncate(f, f.stat().st_size // 2)
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "delete":
        f.unlink()
    else:
        (newest / "manifest.json").unlink()
    info = st.newest_valid()
    assert info is not None and info.step == 4


def test_stage_orders_before_step(tmp_path: Path) -> None:
    st = store(tmp_path / "ck", keep=5)
    save(st, 90, {"a": 1}, stage=0)
    save(st, 3, {"a": 2}, stage=1)
    assert st.names() == ["ckpt-s00-00000090", "ckpt-s01-00000003"]
    info = st.newest_valid()
    assert info is not None and (info.stage, info.step) == (1, 3)


def test_keep_last_k_and_clean_leftovers(tmp_path: Path) -> None:
    st = store(tmp_path / "ck", keep=2)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / ".tmp-ckpt-s00-00000001").mkdir()  # a writer killed mid-way
    for step in (1, 2, 3, 4):
        save(st, step, {"s": step})
    assert st.names() == ["ckpt-s00-00000003", "ckpt-s00-00000004"]
    assert not list((tmp_path / "ck").glob(".tmp-*"))


def test_object_store_mode_marks_complete_by_manifest(tmp_path: Path) -> None:
    """No rename on object stores: files go straight up, the manifest last."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.rm("/bucket", recursive=True) if fs.exists("/bucket") else None
    st = CheckpointStore(
        Location(uri="memory://bucket/ck", path="/bucket/ck", local=False, protocol="memory"),
        2,
        tmp_path / "staging",
    )
    save(st, 1, {"s": 1})
    # A second checkpoint cut short: files uploaded, no manifest.
    name = checkpoint_name(0, 2)
    st.begin(name)
    st.write(name, {"model.pt": lambda w: torch.save({"s": 2}, w)})  # type: ignore[arg-type]
    info = st.newest_valid()
    assert info is not None and info.step == 1
    local = st.local_dir(info.name)
    assert torch.load(local / "model.pt", weights_only=True) == {"s": 1}
    save(st, 3, {"s": 3})
    assert st.names() == ["ckpt-s00-00000001", "ckpt-s00-00000003"]
    assert isinstance(next(iter(st.verify("ckpt-s00-00000003").manifest["files"])), str)  # type: ignore[union-attr]
    assert FileEntry(1, "x").to_json() == {"size": 1, "sha256": "x"}
