"""Turn a raw custom-resource body into a typed model, or a message that names the bad field."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class InvalidSpec(Exception):
    """The spec passed the CRD schema but not the cross-field rules; message names the field."""


def _pattern_help(pattern: str) -> str | None:
    """What a value of a well-known pattern must look like, in words."""
    from graft.api.common import DNS_LABEL_PATTERN, URI_PATTERN

    if pattern == URI_PATTERN:
        return (
            "not a usable storage URI: use pvc://<claim>/<path> (the claim a "
            "PersistentVolumeClaim name: lower-case letters, digits, '-' and '.'; no '..' in "
            "the path), s3://<bucket>/<key>, file://<path> or hf://<repo>"
        )
    if pattern == DNS_LABEL_PATTERN:
        return "not a DNS label: lower-case letters, digits and '-', at most 63 characters"
    if pattern.startswith("^[0-9]{1,12}"):
        return "not a quantity like '8', '500m' or '64Gi' (at most 12 digits)"
    return None


def describe(err: ValidationError, prefix: str = "spec") -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "string_pattern_mismatch":
            msg = _pattern_help(str((e.get("ctx") or {}).get("pattern", ""))) or msg
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_spec(model: type[M], spec: Mapping[str, Any]) -> M:
    """Validate ``spec`` (camelCase, as stored) into ``model``; InvalidSpec names the field."""
    try:
        return model.model_validate(dict(spec))
    except ValidationError as e:
        raise InvalidSpec(describe(e) + ". Fix the field and apply the resource again.") from e


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def cluster_uri_problem(field: str, uri: str, *, allow_hub: bool) -> str | None:
    """Why ``uri`` cannot be used by pods in a cluster, naming ``field`` and the fix; None
    when it can.

    ``pvc://<claim>/<path>``: the claim must be a PersistentVolumeClaim name (DNS-1123
    subdomain) and the path must stay inside the claim (no ``..`` segment). ``file://`` is a
    path on the machine of ``graft run``, which no pod has; ``hf://`` needs egress to the
    hub, which the operator allows only when configured to (air-gapped by default).
    """
    scheme, _, rest = uri.partition("://")
    if scheme == "file":
        return (
            f"{field}: file:// paths exist only for `graft run` on one machine; in a cluster "
            "use pvc://<claim>/<path> or s3://<bucket>/<key>"
        )
    if scheme == "hf":
        if allow_hub:
            return None
        return (
            f"{field}: hf:// needs egress to the Hugging Face hub, which this operator does "
            "not allow; copy the model to a PVC or an in-cluster S3 store (pvc:// or s3://), "
            "or ask the operator's admin to set allowHub (GRAFT_ALLOW_HUB=true)"
        )
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        if len(claim) > 253 or not _DNS_SUBDOMAIN.match(claim):
            return (
                f"{field}: {claim!r} is not a PersistentVolumeClaim name (lower-case letters, "
                "digits, '-' and '.', starting and ending with a letter or digit)"
            )
        if ".." in path.split("/"):
            return f"{field}: the path may not contain '..'; name the file inside the claim"
    return None
