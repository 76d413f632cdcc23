"""Checkpoint store: atomic writes, manifest verification, fallback, pruning; RNG state as
JSON, and no pickle in a checkpoint can run code."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from graft.runtime.train.checkpoint import (
    CheckpointStore,
    FileEntry,
    checkpoint_name,
    legacy_rng_file,
    load_rng_state,
    load_tensors,
    rng_file,
    rng_state,
    set_rng_state,
)
from graft.runtime.train.config import Location, resolve
from graft.runtime.train.errors import UserError


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


def draws() -> tuple[float, float, float, list[float]]:
    return (
        random.random(),
        random.gauss(0, 1),
        float(np.random.standard_normal()),
        torch.rand(4).tolist(),
    )


def legacy_state() -> dict[str, Any]:
    """The pickled layout older Graft versions wrote to rng-rank<r>.pt."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }


def test_rng_state_is_plain_json_and_restores_exactly(tmp_path: Path) -> None:
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's and NumPy's state
    np.random.standard_normal()
    (tmp_path / rng_file(0)).write_text(json.dumps(rng_state()))
    expected = draws()
    draws()
    state = load_rng_state(tmp_path, 0, allow_legacy=False)
    assert state is not None
    set_rng_state(state)
    assert draws() == expected


class Payload:
    """Unpickling this runs code: it writes the file named in ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_legacy_pickle_is_read_only_on_opt_in_and_never_runs_code(tmp_path: Path) -> None:
    torch.save(legacy_state(), tmp_path / legacy_rng_file(0))
    expected = draws()
    # Without the opt-in the pickle is not opened at all: fresh random streams, a warning.
    assert load_rng_state(tmp_path, 0, allow_legacy=False) is None
    state = load_rng_state(tmp_path, 0, allow_legacy=True)
    assert state is not None
    set_rng_state(state)
    assert draws() == expected

    marker = tmp_path / "pwned"
    torch.save(Payload(marker), tmp_path / legacy_rng_file(1))
    assert load_rng_state(tmp_path, 1, allow_legacy=False) is None
    with pytest.raises(UserError) as e:
        load_rng_state(tmp_path, 1, allow_legacy=True)
    assert e.value.reason == "UnsafeCheckpoint"
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, tmp_path / "model.pt")
    with pytest.raises(UserError, match="holds objects other than tensors"):
        load_tensors(tmp_path / "model.pt")
    assert not marker.exists()
