"""Reading a custom resource from a YAML file, with errors that name the field."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

from graft.api.common import API_VERSION, DNS_LABEL_PATTERN
from graft.api.finetunejob import KIND as FTJ_KIND
from graft.api.finetunejob import FineTuneJobSpec
from graft.api.modelservice import KIND as MSVC_KIND
from graft.api.modelservice import ModelServiceSpec
from graft.validation import InvalidSpec, parse_spec

M = TypeVar("M", bound=BaseModel)

#: Exit code of every command when the file or the spec is invalid (argparse's own code for
#: a usage error), distinct from the trainer's 10 (the data or model is wrong).
EXIT_INVALID = 2


class SpecError(Exception):
    """The file cannot be used as written; the message names the file and the field."""


@dataclass(frozen=True)
class Resource:
    """One custom resource read from a file: its name, raw body and validated spec."""

    path: Path
    name: str
    namespace: str
    body: dict[str, Any]
    annotations: dict[str, str]


@dataclass(frozen=True)
class JobFile(Resource):
    spec: FineTuneJobSpec


@dataclass(frozen=True)
class ServiceFile(Resource):
    spec: ModelServiceSpec


def _documents(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise SpecError(f"{path}: document {i + 1} is not a mapping (a Kubernetes object)")
    return docs


def _pick(path: Path, docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The one document of ``kind`` (a file may also hold other kinds, as kubectl allows)."""
    if not docs:
        raise SpecError(f"{path}: the file is empty")
    matching = [d for d in docs if d.get("kind") == kind]
    if len(matching) > 1:
        raise SpecError(f"{path}: holds {len(matching)} {kind}s; put one per file")
    if not matching:
        kinds = ", ".join(sorted({str(d.get("kind")) for d in docs}))
        raise SpecError(f"{path}: kind: expected {kind}, found {kinds}")
    return matching[0]


def _metadata(path: Path, body: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
    api = body.get("apiVersion")
    if api != API_VERSION:
        raise SpecError(f"{path}: apiVersion: expected {API_VERSION}, found {api!r}")
    meta = body.get("metadata")
    if not isinstance(meta, dict):
        raise SpecError(f"{path}: metadata: required, with a name")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise SpecError(f"{path}: metadata.name: required")
    if len(name) > 63 or not re.fullmatch(DNS_LABEL_PATTERN, name):
        raise SpecError(
            f"{path}: metadata.name: {name!r} is not a DNS label (lower-case letters, digits "
            "and '-', at most 63, starting and ending with a letter or digit)"
        )
    ns = meta.get("namespace") or "default"
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise SpecError(f"{path}: metadata.annotations: must be a mapping of strings")
    return name, str(ns), {str(k): str(v) for k, v in annotations.items()}


def _spec(path: Path, body: dict[str, Any]) -> dict[str, Any]:
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: spec: required (a mapping)")
    return spec


def _load(
    path: str | Path, kind: str, model: type[M]
) -> tuple[Path, str, str, dict[str, Any], dict[str, str], M]:
    """The resource of ``kind`` in ``path``, validated by the models the operator uses."""
    p = Path(path)
    body = _pick(p, _documents(p), kind)
    name, ns, ann = _metadata(p, body)
    try:
        spec = parse_spec(model, _spec(p, body))
    except InvalidSpec as e:
        raise SpecError(f"{p}: {_local_hint(str(e))}") from None
    return p, name, ns, body, ann, spec


def load_job(path: str | Path) -> JobFile:
    """A FineTuneJob from ``path``."""
    return JobFile(*_load(path, FTJ_KIND, FineTuneJobSpec))


def load_service(path: str | Path) -> ServiceFile:
    """A ModelService from ``path``."""
    return ServiceFile(*_load(path, MSVC_KIND, ModelServiceSpec))


def _local_hint(message: str) -> str:
    # parse_spec's advice is written for kubectl; locally the fix is to edit the file.
    return message.replace("apply the resource again", "run the command again")
