"""Atomic, verifiable checkpoints on a shared filesystem (PVC) or S3-compatible storage.

Layout (docs/runtime-contract.md): ``<root>/ckpt-s<stage:02d>-<step:08d>/`` holding the
files of one checkpoint and ``manifest.json`` listing each file's size and SHA-256.

On a filesystem the files are written into ``.tmp-<name>/``, fsynced, the manifest is
written and fsynced last, then the directory is renamed: a directory with the final name
is always whole. Object stores have no rename, so there the manifest is uploaded last and
its presence is what marks the checkpoint complete. Resume verifies sizes and hashes and
falls back to an older checkpoint when the newest is damaged.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from graft.runtime.train.config import Location
from graft.runtime.train.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: Set to 1 to read the RNG state of checkpoints written before it was JSON (a pickle).
LEGACY_PICKLE_ENV = "GRAFT_ALLOW_LEGACY_PICKLE"
NAME_RE = re.compile(r"^ckpt-s(\d{2})-(\d{8})$")
CHUNK = 4 << 20


def checkpoint_name(stage: int, step: int) -> str:
    return f"ckpt-s{stage:02d}-{step:08d}"


def parse_name(name: str) -> tuple[int, int] | None:
    m = NAME_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.json"


def legacy_rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Every RNG a step draws from, as plain JSON: the file can be read without unpickling.

    Floats survive exactly (JSON keeps Python's shortest round-trip repr)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "format": 1,
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {
            "keys": [int(k) for k in np.asarray(keys, dtype=np.uint32)],
            "pos": int(pos),
            "hasGauss": int(has_gauss),
            "cachedGaussian": float(cached),
        },
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np.asarray(n["keys"], dtype=np.uint32),
            int(n["pos"]),
            int(n["hasGauss"]),
            float(n["cachedGaussian"]),
        )
    )
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _from_legacy(old: dict[str, Any]) -> dict[str, Any]:
    """The pickled layout of older checkpoints, in the JSON layout."""
    py, n = old["python"], old["numpy"]
    out: dict[str, Any] = {
        "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
        "numpy": {
            "keys": [int(k) for k in n["keys"].numpy().astype(np.uint32)],
            "pos": n["pos"],
            "hasGauss": n["has_gauss"],
            "cachedGaussian": n["cached_gaussian"],
        },
        "torch": _b64(old["torch"]),
    }
    if "cuda" in old:
        out["cuda"] = [_b64(s) for s in old["cuda"]]
    return out


def load_tensors(path: Path) -> Any:
    """``torch.load`` with the weights-only unpickler: tensors and plain containers only,
    so a forged file cannot run code; anything else is a clear, permanent error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"checkpoint file {path} holds objects other than tensors, so it was not loaded "
            f"(it may have been tampered with): {str(e).splitlines()[0]}. Delete that "
            "checkpoint directory or use a new checkpoint.uri",
            reason="UnsafeCheckpoint",
        ) from None


def load_rng_state(ckpt_dir: Path, rank: int, allow_legacy: bool) -> dict[str, Any] | None:
    """This rank's RNG state from a checkpoint, or None (with the reason logged).

    Checkpoints written before the JSON layout hold a pickle; it is read only when
    ``allow_legacy`` (``GRAFT_ALLOW_LEGACY_PICKLE=1``), and then with the weights-only
    unpickler, never with ``weights_only=False``."""
    path = ckpt_dir / rng_file(rank)
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(
                f"checkpoint file {path} is not valid JSON ({e}): delete that checkpoint "
                "directory or use a new checkpoint.uri",
                reason="CheckpointMismatch",
            ) from None
        return data if isinstance(data, dict) else None
    legacy = ckpt_dir / legacy_rng_file(rank)
    if legacy.exists():
        if not allow_legacy:
            log.warning(
                "checkpoint from an older Graft keeps its RNG state as a pickle; not read "
                f"(set {LEGACY_PICKLE_ENV}=1 to read it with the weights-only loader). "
                "Training resumes with fresh random streams, so results differ slightly "
                "from an uninterrupted run",
                extra={"file": str(legacy)},
            )
            return None
        return _from_legacy(load_tensors(legacy))
    log.warning(
        "no RNG state for this rank (world size changed); results will differ from an "
        "uninterrupted run",
        extra={"rank": rank},
    )
    return None


class HashingWriter:
    """A binary file that hashes what passes through it, so nothing is read back to hash."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    stage: int
    step: int
    uri: str
    manifest: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str, fs: Any = None) -> FileEntry:
    h = hashlib.sha256()
    size = 0
    opener = fs.open if fs is not None else open
    with opener(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return FileEntry(size, h.hexdigest())


class CheckpointStore:
    """Checkpoints of one job under one root, shared by all ranks.

    ``begin`` (rank 0) -> ``write`` (every rank, its own files) -> ``commit`` (rank 0 with
    every rank's entries). Between the steps the caller puts barriers.
    """

    def __init__(self, root: Location, keep: int, staging: Path) -> None:
        self.root = root
        self.keep = keep
        self.staging = staging
        self.fs: Any = root.filesystem()

    # --- paths -----------------------------------------------------------------------
    def _dir(self, name: str) -> str:
        return self.root.path.rstrip("/") + "/" + name

    def _write_dir(self, name: str) -> Path:
        """Where ranks put the files of checkpoint ``name`` before commit."""
        if self.root.local:
            return Path(self._dir(f".tmp-{name}"))
        return self.staging / f".tmp-{name}"

    def uri(self, name: str) -> str:
        return self.root.uri.rstrip("/") + "/" + name

    # --- writing ---------------------------------------------------------------------
    def begin(self, name: str) -> None:
        d = self._write_dir(name)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        if not self.root.local and self.fs.exists(self._dir(name)):
            self.fs.rm(self._dir(name), recursive=True)

    @contextmanager
    def open_for_write(self, name: str, filename: str) -> Iterator[HashingWriter]:
        path = self._write_dir(name) / filename
        with open(path, "wb") as raw:
            w = HashingWriter(raw)
            yield w
            raw.flush()
            os.fsync(raw.fileno())

    def write(
        self, name: str, files: dict[str, Callable[[HashingWriter], None]]
    ) -> dict[str, FileEntry]:
        """Write this rank's files; each callable serializes into the writer it is given."""
        out: dict[str, FileEntry] = {}
        for filename, produce in files.items():
            with self.open_for_write(name, filename) as w:
                produce(w)
            out[filename] = FileEntry(w.size, w.sha.hexdigest())
            if not self.root.local:
                self.fs.put_file(
                    str(self._write_dir(name) / filename), self._dir(name) + "/" + filename
                )
        return out

    def commit(
        self, name: str, entries: dict[str, FileEntry], meta: dict[str, Any]
    ) -> CheckpointInfo:
        stage_step = parse_name(name)
        assert stage_step is not None
        manifest = {
            "version": 1,
            "name": name,
            "stage": stage_step[0],
            "step": stage_step[1],
            "complete": True,
            "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "files": {k: v.to_json() for k, v in sorted(entries.items())},
            "meta": meta,
        }
        tmp = self._write_dir(name)
        data = json.dumps(manifest, indent=1).encode()
        with open(tmp / MANIFEST, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if self.root.local:
            _fsync_dir(tmp)
            final = Path(self._dir(name))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        else:
            self.fs.put_file(str(tmp / MANIFEST), self._dir(name) + "/" + MANIFEST)
            shutil.rmtree(tmp, ignore_errors=True)
        info = CheckpointInfo(name, stage_step[0], stage_step[1], self.uri(name), manifest)
        self.prune()
        return info

    # --- reading ---------------------------------------------------------------------
    def names(self) -> list[str]:
        """Checkpoint directories by (stage, step), oldest first; complete or not."""
        if not self.fs.exists(self.root.path):
            return []
        found = []
        for p in self.fs.ls(self.root.path, detail=False):
            name = str(p).rstrip("/").rsplit("/", 1)[-1]
            if parse_name(name):
                found.append(name)
        return sorted(found, key=lambda n: parse_name(n) or (0, 0))

    def read_manifest(self, name: str) -> dict[str, Any] | None:
        path = self._dir(name) + "/" + MANIFEST
        try:
            with self.fs.open(path, "rb") as f:
                data = json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict) or not data.get("complete"):
            return None
        return data

    def verify(self, name: str) -> CheckpointInfo | None:
        """The checkpoint if its manifest is there and every file matches it, else None."""
        manifest = self.read_manifest(name)
        if manifest is None:
            log.warning("checkpoint has no complete manifest; skipped", extra={"checkpoint": name})
            return None
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            return None
        for filename, want in files.items():
            path = self._dir(name) + "/" + filename
            try:
                got = sha256_file(path, self.fs)
            except FileNotFoundError:
                log.warning(
                    "checkpoint file missing; skipped", extra={"checkpoint": name, "file": filename}
                )
                return None
            if got.size != want.get("size") or got.sha256 != want.get("sha256"):
                log.warning(
                    "checkpoint file damaged (size or SHA-256 differs); skipped",
                    extra={
                        "checkpoint": name,
                        "file": filename,
                        "size": got.size,
                        "expectedSize": want.get("size"),
                    },
                )
                return None
        stage, step = parse_name(name) or (0, 0)
        return CheckpointInfo(name, stage, step, self.uri(name), manifest)

    def newest_valid(self) -> CheckpointInfo | None:
        for name in reversed(self.names()):
            info = self.verify(name)
            if info is not None:
                return info
        return None

    def local_dir(self, name: str) -> Path:
        """A local directory with the checkpoint's files (downloaded from object storage)."""
        if self.root.local:
            return Path(self._dir(name))
        dest = self.staging / "restore" / name
        if not (dest / MANIFEST).exists():
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            self.fs.get(self._dir(name) + "/", str(dest) + "/", recursive=True)
        return dest

    # --- housekeeping ----------------------------------------------------------------
    def prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older ones and leftovers."""
        names = self.names()
        complete = [n for n in names if self.read_manifest(n) is not None]
        doomed = set(complete[: max(0, len(complete) - self.keep)])
        newest_complete = parse_name(complete[-1]) if complete else None
        for n in names:
            # Incomplete directories (object stores: a write cut short) older than the newest
            # complete checkpoint can never be completed again.
            key = parse_name(n)
            if n not in complete and newest_complete and key and key < newest_complete:
                doomed.add(n)
        for n in sorted(doomed):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._dir(n), recursive=True)
        if self.root.local and Path(self.root.path).exists():
            for p in Path(self.root.path).glob(".tmp-ckpt-*"):
                shutil.rmtree(p, ignore_errors=True)

    def clean_stale(self) -> None:
        """Remove half-written ``.tmp-*`` directories left by a killed writer."""
        if self.root.local and Path(self.root.path).exists():
            for p in Path(self.root.path).glob(".tmp-ckpt-*"):
                log.info("removing unfinished checkpoint", extra={"path": str(p)})
                shutil.rmtree(p, ignore_errors=True)
