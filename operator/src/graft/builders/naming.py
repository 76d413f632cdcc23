"""Deterministic names, standard labels and spec hashes for the children of Graft resources.

Names follow ``<cr>-<role>[-<index>]``. A name that would exceed its Kubernetes limit is
cut and given a short hash of the full name, so two long custom resources that share a
prefix still get distinct children, and the same input always gives the same name.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

#: Limit of a DNS-1123 label: label values, Service names, pod hostnames, volume names.
DNS_LABEL_MAX = 63
#: Limit of a DNS-1123 subdomain: most object names (Pods, ConfigMaps).
DNS_SUBDOMAIN_MAX = 253
#: Hex characters of sha256 kept in a name suffix: 8 (32 bits) makes a clash between two
#: long names of one namespace practically impossible while keeping names readable.
NAME_HASH_LEN = 8
#: Hex characters of sha256 kept in graft.dev/spec-hash.
SPEC_HASH_LEN = 16

LABEL_PREFIX = "graft.dev/"
LABEL_JOB = "graft.dev/job"
LABEL_ATTEMPT = "graft.dev/attempt"
LABEL_RANK = "graft.dev/rank"
ANNOTATION_SPEC_HASH = "graft.dev/spec-hash"
ANNOTATION_PROGRESS = "graft.dev/progress"

APP_NAME = "app.kubernetes.io/name"
APP_INSTANCE = "app.kubernetes.io/instance"
APP_COMPONENT = "app.kubernetes.io/component"
APP_MANAGED_BY = "app.kubernetes.io/managed-by"
APP_PART_OF = "app.kubernetes.io/part-of"

MANAGED_BY = "graft-operator"
PART_OF = "graft"
TRAINER_APP = "graft-trainer"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def short_hash(text: str, length: int = NAME_HASH_LEN) -> str:
    """First ``length`` hex characters of the sha256 of ``text``."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def fit(name: str, limit: int = DNS_SUBDOMAIN_MAX) -> str:
    """``name`` unchanged when it fits ``limit``, else cut and suffixed ``-<hash>``.

    The hash is of the whole uncut name, so names that differ only beyond the cut stay
    distinct. Trailing dashes and dots left by the cut are dropped to stay DNS-1123 valid.
    """
    if len(name) <= limit:
        return name
    suffix = "-" + short_hash(name)
    head = name[: limit - len(suffix)].rstrip("-.")
    return head + suffix


def child_name(
    cr: str, role: str, index: int | None = None, *, limit: int = DNS_SUBDOMAIN_MAX
) -> str:
    """``<cr>-<role>[-<index>]`` cut to ``limit`` (253 for objects, 63 for labels/Services)."""
    name = f"{cr}-{role}" if index is None else f"{cr}-{role}-{index}"
    return fit(name, limit)


def dns_label(name: str, *, letter_first: bool = False, limit: int = DNS_LABEL_MAX) -> str:
    """A DNS-1123 label (or, with ``letter_first``, a DNS-1035 label) for ``name``.

    A resource name is a DNS-1123 subdomain: it may hold dots, start with a digit and run
    to 253 characters; a Service name (DNS-1035), a pod hostname or a volume name may not.
    ``name`` is kept when it already fits; otherwise dots become dashes, a leading digit
    gets an ``x`` in front, and a hash of the whole original name is appended (cutting to
    ``limit``, 63 unless a consumer wants less, where needed), so ``a.b`` and ``a-b`` still
    get distinct names.
    """
    valid = is_dns_label(name) and (not letter_first or name[:1].isalpha())
    if valid:
        return fit(name, limit)
    clean = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "x"
    if letter_first and not clean[0].isalpha():
        clean = "x" + clean
    suffix = "-" + short_hash(name)
    return clean[: limit - len(suffix)].rstrip("-") + suffix


def label_value(value: str) -> str:
    """A label value for ``value`` (a CR name may be 253 characters; label values 63)."""
    return fit(value, DNS_LABEL_MAX)


def is_dns_label(name: str) -> bool:
    return len(name) <= DNS_LABEL_MAX and bool(_DNS_LABEL.match(name))


def is_dns_subdomain(name: str) -> bool:
    return len(name) <= DNS_SUBDOMAIN_MAX and bool(_DNS_SUBDOMAIN.match(name))


# FineTuneJob children -------------------------------------------------------------------


def config_map_name(job: str) -> str:
    """``<job>-config``: the ConfigMap with job.json."""
    return child_name(job, "config")


def gang_service_name(job: str) -> str:
    """``<job>-gang``: the headless Service; a DNS-1035 label (a Service name, and the pods'
    subdomain), so a job named ``7b-sft`` or ``llama.v2`` gets a hashed variant."""
    return dns_label(f"{job}-gang", letter_first=True)


def progress_lease_name(job: str) -> str:
    """``<job>-progress``: the coordination.k8s.io Lease rank 0 writes progress and its
    heartbeat to (the only object the trainer identity may update)."""
    return child_name(job, "progress")


def pod_name(job: str, attempt: int, rank: int) -> str:
    """``<job>-a<attempt>-r<rank>``.

    The attempt is part of the name so that a new attempt never collides with the old
    attempt's pods while those are still terminating (writing their final checkpoint).
    """
    return fit(f"{job}-a{attempt}-r{rank}", DNS_SUBDOMAIN_MAX)


def pod_hostname(job: str, rank: int) -> str:
    """``<job>-r<rank>``: stable across attempts, so MASTER_ADDR never changes."""
    return dns_label(f"{job}-r{rank}")


def master_addr(job: str, namespace: str) -> str:
    """Rank 0's DNS name: ``<job>-r0.<job>-gang.<ns>.svc``."""
    return f"{pod_hostname(job, 0)}.{gang_service_name(job)}.{namespace}.svc"


def trainer_labels(
    job: str, *, component: str, attempt: int | None = None, rank: int | None = None
) -> dict[str, str]:
    """Standard labels of a FineTuneJob's children; attempt and rank only on Pods."""
    labels = {
        APP_NAME: TRAINER_APP,
        APP_INSTANCE: label_value(job),
        APP_COMPONENT: component,
        APP_MANAGED_BY: MANAGED_BY,
        APP_PART_OF: PART_OF,
        LABEL_JOB: label_value(job),
    }
    if attempt is not None:
        labels[LABEL_ATTEMPT] = str(attempt)
    if rank is not None:
        labels[LABEL_RANK] = str(rank)
    return labels


def job_selector(job: str) -> dict[str, str]:
    """Labels selecting every child Pod of a job, across attempts."""
    return {LABEL_JOB: label_value(job)}


def attempt_selector(job: str, attempt: int) -> dict[str, str]:
    """Labels selecting the Pods of one attempt."""
    return {LABEL_JOB: label_value(job), LABEL_ATTEMPT: str(attempt)}


# Spec hashes ----------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(by_alias=True, exclude_none=True, mode="json")
    return obj


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal content, equal text."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def spec_hash(obj: Any) -> str:
    """Short sha256 of the canonical JSON of ``obj`` (a dict, list or pydantic model)."""
    return short_hash(canonical_json(obj), SPEC_HASH_LEN)


def with_spec_hash(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a child object with ``graft.dev/spec-hash`` set to the hash of the rest.

    The hash covers everything the builder produced except the hash annotation itself, so
    the reconciler can compare the desired hash with the live object's annotation.
    """
    body = json.loads(canonical_json(obj))
    meta = body.setdefault("metadata", {})
    annotations = meta.get("annotations") or {}
    annotations.pop(ANNOTATION_SPEC_HASH, None)
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    digest = spec_hash(body)
    out = copy.deepcopy(dict(obj))
    out.setdefault("metadata", {}).setdefault("annotations", {})[ANNOTATION_SPEC_HASH] = digest
    return out
