"""Pieces shared by both custom resources: the base model class, URIs, conditions."""

from __future__ import annotations

import datetime as dt
import math
import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

GROUP = "graft.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

#: Schemes a storage URI may use. ``pvc://<claim>/<path>`` is a PersistentVolumeClaim in the
#: resource's namespace; ``s3://`` an S3-compatible bucket (in-cluster object stores);
#: ``file://`` a local path (``graft run`` and tests); ``hf://`` the Hugging Face hub, only
#: where egress is allowed (air-gapped is the default assumption).
URI_SCHEMES = ("pvc", "s3", "file", "hf")
#: A path segment other than ".." (RE2 has no lookahead: ".", "..x", or a name not
#: starting with two dots).
_SEGMENT = r"(\.|\.\.[^/\s]+|\.?[^./\s][^/\s]*)"
#: pvc://<claim>/<path>: the claim a DNS-1123 subdomain and no ".." in the path, so a path
#: cannot leave the claim's mount; the other schemes: anything without spaces.
URI_PATTERN = (
    r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
    rf"(/{_SEGMENT}?)*|(s3|file|hf)://[^\s]+)$"
)
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

StorageUri = Annotated[str, StringConstraints(pattern=URI_PATTERN, max_length=2048)]
DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, max_length=63)]
#: A Kubernetes quantity, bounded (12 digits, 6 decimals) so that no arithmetic on it
#: overflows: "1" followed by 400 zeros is refused by the schema.
Quantity = Annotated[
    str,
    StringConstraints(
        pattern=r"^[0-9]{1,12}(\.[0-9]{1,6})?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$", max_length=24
    ),
]


class ApiModel(BaseModel):
    """Base for every API object: camelCase on the wire, unknown keys refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=False,
        validate_default=True,
    )

    def wire(self) -> dict[str, Any]:
        """The object as it is written to the API: camelCase keys, no unset optionals."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str = Field(description="Type of condition, in CamelCase (for example Accepted).")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="One-word CamelCase reason for the last transition (for example InvalidSpec)."
    )
    message: str = Field(default="", description="Human-readable details; says what to do.")
    last_transition_time: str = Field(
        description="When the status last changed (RFC 3339); unchanged while status holds."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation this condition was set from."
    )


class StorageRef(ApiModel):
    """A location of model weights or data."""

    uri: StorageUri = Field(
        description="pvc://<claim>/<path>, s3://<bucket>/<key>, file://<path> (local runs) or "
        "hf://<repo> (only where egress is allowed)."
    )


DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DnsSubdomain = Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]


class S3Access(ApiModel):
    """How the pods reach s3:// URIs: a Secret with keys, or a workload identity."""

    credentials_secret: DnsSubdomain | None = Field(
        default=None,
        description="Secret in the resource's namespace holding AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN); they become the pods' "
        "environment variables of the same names. Unset: no keys (workload identity, or a "
        "store that needs none).",
    )
    endpoint_url: (
        Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=2048)] | None
    ) = Field(
        default=None,
        description="S3 endpoint of an in-cluster store (MinIO, Ceph RGW), passed as "
        "AWS_ENDPOINT_URL; unset: AWS.",
    )
    region: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,32}$")] | None = Field(
        default=None, description="AWS_REGION for the pods."
    )
    service_account_name: DnsSubdomain | None = Field(
        default=None,
        description="ServiceAccount the pods run as, for workload identity (EKS IRSA, GKE or "
        "Azure workload identity): the cloud maps it to a role that may read the buckets. "
        "It must exist in the resource's namespace.",
    )


def s3_env(s3: S3Access | None) -> list[dict[str, Any]]:
    """Environment variables giving a container the S3 access ``s3`` describes."""
    if s3 is None:
        return []
    env: list[dict[str, Any]] = []
    if s3.credentials_secret:
        for key, optional in (
            ("AWS_ACCESS_KEY_ID", False),
            ("AWS_SECRET_ACCESS_KEY", False),
            ("AWS_SESSION_TOKEN", True),
        ):
            ref: dict[str, Any] = {"name": s3.credentials_secret, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    if s3.endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": s3.endpoint_url})
    if s3.region:
        env.append({"name": "AWS_REGION", "value": s3.region})
    return env


def now_rfc3339(clock: dt.datetime | None = None) -> str:
    """UTC time in the format Kubernetes uses for timestamps."""
    t = clock or dt.datetime.now(dt.UTC)
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_uri(uri: str) -> tuple[str, str]:
    """Split a storage URI into (scheme, rest); raises ValueError for an unknown scheme."""
    m = re.match(r"^([a-z0-9]+)://(.+)$", uri)
    if not m or m.group(1) not in URI_SCHEMES:
        raise ValueError(
            f"unsupported URI {uri!r}: use one of " + ", ".join(f"{s}://" for s in URI_SCHEMES)
        )
    return m.group(1), m.group(2)


_SUFFIX = {
    "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def quantity(value: str) -> float:
    """A Kubernetes quantity (``500m``, ``8``, ``64Gi``) as a finite number."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", value)
    if not m or (m.group(2) and m.group(2) not in _SUFFIX):
        raise ValueError(f"not a quantity: {value!r}")
    number = float(m.group(1)) * _SUFFIX.get(m.group(2), 1.0)
    if not math.isfinite(number):
        raise ValueError(f"quantity out of range: {value!r}")
    return number


def set_condition(
    conditions: list[Condition],
    new: Condition,
) -> list[Condition]:
    """Return conditions with ``new`` merged in, Kubernetes-style.

    The transition time only moves when the status changes; reason, message and
    observedGeneration always take the new values.
    """
    out: list[Condition] = []
    replaced = False
    for c in conditions:
        if c.type == new.type:
            replaced = True
            if c.status == new.status:
                out.append(new.model_copy(update={"last_transition_time": c.last_transition_time}))
            else:
                out.append(new)
        else:
            out.append(c)
    if not replaced:
        out.append(new)
    return out


def find_condition(conditions: list[Condition], type_: str) -> Condition | None:
    for c in conditions:
        if c.type == type_:
            return c
    return None


def is_true(conditions: list[Condition], type_: str) -> bool:
    c = find_condition(conditions, type_)
    return c is not None and c.status == ConditionStatus.TRUE
