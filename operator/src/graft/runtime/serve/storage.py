"""Turn a model or adapter URI into a local directory the engines can load.

``file://<path>`` is used as is; ``pvc://<claim>/<path>`` is read from
``$GRAFT_PVC_ROOT/<claim>/<path>`` (default ``/mnt/pvc``, where the server pods mount
claims); ``s3://`` is downloaded with fsspec into ``$GRAFT_CACHE_DIR`` (default
``/tmp/graft-cache``) once per replica; ``hf://<repo>[@<revision>]`` is fetched from the
Hugging Face hub only when ``GRAFT_ALLOW_HUB=1``, because air-gapped is the default.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graft.api.common import parse_uri

_COMPLETE = ".graft-complete"


class StorageError(Exception):
    """A URI that cannot be turned into a local directory; the message says why."""


def resolve(uri: str, environ: Mapping[str, str] | None = None) -> Path:
    """Return a local directory holding what ``uri`` points at, fetching it if needed."""
    env = os.environ if environ is None else environ
    try:
        scheme, rest = parse_uri(uri)
    except ValueError as e:
        raise StorageError(str(e)) from e
    if scheme == "file":
        path = Path(rest)
    elif scheme == "pvc":
        path = Path(env.get("GRAFT_PVC_ROOT", "/mnt/pvc")) / rest
    elif scheme == "s3":
        import fsspec

        path = download(fsspec.filesystem("s3"), f"s3://{rest}", cache_dir(env) / "s3" / rest)
    else:
        path = _from_hub(rest, env)
    if not path.is_dir():
        raise StorageError(f"{uri}: {path} is not a directory")
    return path


def cache_dir(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("GRAFT_CACHE_DIR", "/tmp/graft-cache"))


def download(fs: Any, remote: str, local: Path) -> Path:
    """Copy a remote directory to ``local`` once; a marker file says the copy is complete.

    The copy goes to a temporary sibling first and is renamed into place, so a replica
    killed half-way leaves no directory that looks complete.
    """
    if (local / _COMPLETE).exists():
        return local
    if not fs.exists(remote):
        raise StorageError(f"{remote}: not found")
    tmp = local.with_name(f".tmp-{local.name}-{hashlib.sha256(remote.encode()).hexdigest()[:8]}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    root = remote.rstrip("/")
    for src in fs.find(root):
        rel = src[len(fs._strip_protocol(root)) :].lstrip("/")
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(src, str(dst))
    (tmp / _COMPLETE).write_text(remote)
    shutil.rmtree(local, ignore_errors=True)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(local)
    return local


def _from_hub(rest: str, env: Mapping[str, str]) -> Path:
    if env.get("GRAFT_ALLOW_HUB") != "1":
        raise StorageError(
            f"hf://{rest}: the Hugging Face hub is off (air-gapped default); "
            "set GRAFT_ALLOW_HUB=1 on the server to allow it, or use pvc:// or s3://"
        )
    from huggingface_hub import snapshot_download

    repo, _, revision = rest.partition("@")
    return Path(snapshot_download(repo_id=repo, revision=revision or None))
