"""The trainer's inputs: the job config file, the ``GRAFT_*`` environment, storage URIs.

Everything the operator hands a trainer pod is read here (docs/runtime-contract.md), so the
rest of the package works on typed values and never looks at ``os.environ``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from graft.api.common import parse_uri
from graft.api.finetunejob import FineTuneJobSpec, duration_seconds
from graft.runtime.train.errors import UserError

DEFAULT_JOB_CONFIG = "/etc/graft/job.json"
DEFAULT_PVC_ROOT = "/mnt/pvc"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {key}={raw!r} must be an integer") from None


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key, "")
    if raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise UserError(f"environment variable {key}={raw!r} must be a number") from None


@dataclass(frozen=True)
class RuntimeEnv:
    """The trainer's environment, one field per documented variable (docs/trainer.md)."""

    job_config_path: Path = Path(DEFAULT_JOB_CONFIG)
    job_name: str | None = None
    attempt: int = 1
    resume_from: str | None = None
    nnodes: int = 1
    node_rank: int = 0
    nproc_per_node: int = 1
    master_addr: str | None = None
    master_port: int = 29500
    pvc_root: Path = Path(DEFAULT_PVC_ROOT)
    checkpoint_uri: str | None = None
    pod_name: str | None = None
    pod_namespace: str | None = None
    progress_lease: str | None = None
    heartbeat_interval: float = 10.0
    termination_log: Path | None = Path(DEFAULT_TERMINATION_LOG)
    workdir: Path | None = None
    allow_hub: bool = False
    allow_legacy_pickle: bool = False
    progress_interval: float = 5.0
    annotation_interval: float = 10.0
    # Set by torchrun in each worker; absent when the trainer runs in one process.
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RuntimeEnv:
        e = os.environ if env is None else env
        term = e.get("GRAFT_TERMINATION_LOG", DEFAULT_TERMINATION_LOG)
        workdir = e.get("GRAFT_WORKDIR", "")
        return cls(
            job_config_path=Path(e.get("GRAFT_JOB_CONFIG") or DEFAULT_JOB_CONFIG),
            job_name=e.get("GRAFT_JOB_NAME") or None,
            attempt=_int(e, "GRAFT_ATTEMPT", 1),
            resume_from=e.get("GRAFT_RESUME_FROM") or None,
            nnodes=_int(e, "GRAFT_NNODES", 1),
            node_rank=_int(e, "GRAFT_NODE_RANK", 0),
            nproc_per_node=_int(e, "GRAFT_NPROC_PER_NODE", 1),
            master_addr=e.get("MASTER_ADDR") or None,
            master_port=_int(e, "MASTER_PORT", 29500),
            pvc_root=Path(e.get("GRAFT_PVC_ROOT") or DEFAULT_PVC_ROOT),
            checkpoint_uri=e.get("GRAFT_CHECKPOINT_URI") or None,
            pod_name=e.get("POD_NAME") or None,
            pod_namespace=e.get("POD_NAMESPACE") or None,
            progress_lease=e.get("GRAFT_PROGRESS_LEASE") or None,
            heartbeat_interval=_float(e, "GRAFT_HEARTBEAT_INTERVAL_SECONDS", 10.0),
            termination_log=Path(term) if term else None,
            workdir=Path(workdir) if workdir else None,
            allow_hub=e.get("GRAFT_ALLOW_HUB", "") in ("1", "true", "True", "yes"),
            allow_legacy_pickle=e.get("GRAFT_ALLOW_LEGACY_PICKLE", "") in ("1", "true", "yes"),
            progress_interval=_float(e, "GRAFT_PROGRESS_INTERVAL", 5.0),
            annotation_interval=_float(e, "GRAFT_ANNOTATION_INTERVAL", 10.0),
            rank=_int(e, "RANK", 0),
            local_rank=_int(e, "LOCAL_RANK", 0),
            world_size=_int(e, "WORLD_SIZE", 1),
        )

    @property
    def launch_world_size(self) -> int:
        return max(1, self.nnodes) * max(1, self.nproc_per_node)


@dataclass(frozen=True)
class JobConfig:
    """The mounted job config: identity, attempt and the FineTuneJob spec."""

    name: str
    namespace: str | None
    attempt: int
    resume_from: str | None
    spec: FineTuneJobSpec


def parse_job_config(data: Mapping[str, Any], env: RuntimeEnv | None = None) -> JobConfig:
    """Accept the operator's ``{"name", "spec", ...}``, a whole FineTuneJob, or a bare spec."""
    env = env or RuntimeEnv()
    if not isinstance(data, Mapping):
        raise UserError("the job config must be a JSON object with a 'spec' field")
    raw = dict(data)
    if "spec" in raw:
        spec_raw = raw["spec"]
        meta = raw.get("metadata") if isinstance(raw.get("metadata"), Mapping) else {}
        name = raw.get("name") or (meta or {}).get("name") or env.job_name or "job"
        namespace = raw.get("namespace") or (meta or {}).get("namespace")
    else:
        spec_raw = raw
        name = env.job_name or "job"
        namespace = None
    try:
        spec = FineTuneJobSpec.model_validate(spec_raw)
    except ValidationError as e:
        problems = "; ".join(
            f"spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise UserError(f"invalid FineTuneJob spec: {problems}", reason="InvalidSpec") from None
    attempt = int(raw.get("attempt") or env.attempt or 1)
    resume = raw.get("resumeFrom") or env.resume_from
    return JobConfig(
        name=str(name),
        namespace=str(namespace) if namespace else None,
        attempt=attempt,
        resume_from=str(resume) if resume else None,
        spec=spec,
    )


def load_job_config(env: RuntimeEnv) -> JobConfig:
    path = env.job_config_path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"job config {path} not found: set GRAFT_JOB_CONFIG to the JSON file holding the "
            "FineTuneJob spec",
            reason="InvalidConfig",
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"job config {path} is not valid JSON: {e}") from None
    return parse_job_config(data, env)


@dataclass(frozen=True)
class Location:
    """A resolved storage URI: a local path, or an fsspec filesystem and a path on it."""

    uri: str
    path: str
    local: bool
    protocol: str = "file"

    def filesystem(self) -> Any:
        import fsspec

        if self.local:
            return fsspec.filesystem("file")
        try:
            return fsspec.filesystem(self.protocol)
        except ImportError:
            raise UserError(
                f"{self.uri}: reading {self.protocol}:// needs the s3 extra "
                "(pip install 'graft[s3]'); set AWS_ENDPOINT_URL for in-cluster object stores",
                reason="InvalidConfig",
            ) from None

    def join(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *parts])
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return Location(uri=uri, path=path, local=self.local, protocol=self.protocol)


def resolve(uri: str, pvc_root: Path, *, what: str = "path") -> Location:
    """Turn ``file://``, ``pvc://`` or ``s3://`` into something fsspec or ``open`` can read."""
    try:
        scheme, rest = parse_uri(uri)
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None
    if scheme == "file":
        # file:///abs is absolute; file://rel/path is relative to the working directory.
        path = rest if rest.startswith("/") else str(Path.cwd() / rest)
        return Location(uri=uri, path=path, local=True)
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        return Location(uri=uri, path=str(pvc_root / claim / sub).rstrip("/"), local=True)
    if scheme == "s3":
        return Location(uri=uri, path=rest, local=False, protocol="s3")
    raise UserError(
        f"{what}: {uri} uses hf://, which only the base model may use (and only with "
        "GRAFT_ALLOW_HUB=1); copy the data to a PVC or S3 bucket",
        reason="InvalidConfig",
    )


def checkpoint_uri(spec: FineTuneJobSpec, env: RuntimeEnv) -> str:
    if env.checkpoint_uri:
        return env.checkpoint_uri
    if spec.checkpoint.uri:
        return spec.checkpoint.uri
    return spec.output.uri.rstrip("/") + "/checkpoints"


def checkpoint_every(spec: FineTuneJobSpec) -> tuple[int | None, float | None]:
    """(steps, seconds): one of them is set, from ``checkpoint.every``."""
    every = spec.checkpoint.every
    if isinstance(every, int):
        return every, None
    if every.isdigit():
        return int(every), None
    return None, float(duration_seconds(every))


def default_workdir(job_name: str) -> Path:
    return Path(tempfile.gettempdir()) / f"graft-{job_name}"
