"""Where ``graft run`` keeps things, and the per-job state file ``graft serve`` reads.

Layout under the work directory (``--workdir``, default ``./.graft``)::

    jobs/<name>.json        state of the job's last local run (this module)
    runs/<name>/            the trainer's run directory: job.json, trainer.log,
                            termination-log, work/ (prepared data, staging)
    checkpoints/<name>/     checkpoints, unless spec.checkpoint.uri says otherwise

``pvc://<claim>/<path>`` is read as ``<pvc root>/<claim>/<path>`` (``--pvc-root``, default
``./.graft/pvc``), as in a pod with the claim mounted under ``GRAFT_PVC_ROOT``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_WORKDIR = Path(".graft")
DEFAULT_PVC_ROOT = Path(".graft") / "pvc"

#: Phases of a local run, as in the state file. Running: a ``graft run`` is (or was, if it
#: died) in progress; Stopped: interrupted with a checkpoint, ``graft run`` again resumes;
#: Failed: the trainer refused the job or crashed; Succeeded: the output is written.
PHASES = ("Running", "Stopped", "Failed", "Succeeded")


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def state_path(workdir: Path, name: str) -> Path:
    return workdir / "jobs" / f"{name}.json"


def run_dir(workdir: Path, name: str) -> Path:
    return workdir / "runs" / name


def default_checkpoint_dir(workdir: Path, name: str) -> Path:
    return workdir / "checkpoints" / name


def read_state(workdir: Path, name: str) -> dict[str, Any] | None:
    """The job's state file, or None when it was never run here (or the file is unreadable)."""
    try:
        data = json.loads(state_path(workdir, name).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_state(workdir: Path, name: str, state: dict[str, Any]) -> Path:
    """Replace the state file atomically (a reader never sees half a file)."""
    path = state_path(workdir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def local_path(uri: str, pvc_root: Path) -> Path | None:
    """The absolute local path of a file:// or pvc:// URI (relative file:// paths are taken
    from the current directory, as the trainer does); None for s3:// and hf://."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return None
    if scheme == "file":
        return Path(rest).absolute() if rest.startswith("/") else (Path.cwd() / rest).absolute()
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        return (pvc_root / claim / sub).absolute()
    return None
