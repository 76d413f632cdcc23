"""What the trainer wrote to its progress Lease, checked before the operator believes it.

Trainer code is user code (``spec.image`` is arbitrary), so its report is a claim: a
report from another attempt is ignored, and an output or checkpoint URI outside the job's
own configured storage is dropped (the caller posts a Warning Event) so that a forged URI
never reaches ``status.output`` (which a ModelService serves from) or the resume point.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from graft.api.finetunejob import FineTuneJobSpec
from graft.builders.finetunejob import checkpoint_uri
from graft.builders.naming import ANNOTATION_PROGRESS, short_hash
from graft.status import ProgressUpdate, parse_time, progress_from_annotation

#: How many forged reports ``status.untrustedReports`` remembers.
UNTRUSTED_REPORTS_KEPT = 16


@dataclasses.dataclass(frozen=True)
class Report:
    update: ProgressUpdate
    #: Human-readable reasons for each URI that was dropped.
    rejected: tuple[str, ...] = ()


def remember_rejection(seen: list[str], report: Report) -> list[str] | None:
    """``seen`` with this report's rejection added, or None when there is nothing new to
    warn about: the trainer renews its Lease every few seconds and each renewal wakes the
    operator, so a forged report would otherwise post an Event per pass."""
    if not report.rejected:
        return None
    digest = short_hash("\n".join(report.rejected), 16)
    if digest in seen:
        return None
    return [*seen, digest][-UNTRUSTED_REPORTS_KEPT:]


def under(uri: str, root: str) -> bool:
    """``uri`` is ``root`` or below it, with no ``..`` or empty segment climbing out."""
    base = root.rstrip("/")
    if uri.rstrip("/") == base:
        return True
    if not uri.startswith(base + "/"):
        return False
    rest = uri[len(base) + 1 :].rstrip("/")
    return all(part not in ("", ".", "..") for part in rest.split("/"))


def read_report(
    lease: Mapping[str, Any] | None, spec: FineTuneJobSpec, attempt: int
) -> Report | None:
    """The Lease's report for ``attempt``; None when there is none (or it is older)."""
    text = ((lease or {}).get("metadata") or {}).get("annotations", {}).get(ANNOTATION_PROGRESS)
    upd = progress_from_annotation(text)
    if upd.extra.get("attempt", attempt) != attempt:
        return None
    rejected: list[str] = []
    ck_root = checkpoint_uri(spec)
    if upd.last_checkpoint is not None and not under(upd.last_checkpoint.uri, ck_root):
        rejected.append(
            f"lastCheckpoint.uri {upd.last_checkpoint.uri[:200]!r} is not under the job's "
            f"checkpoint URI {ck_root}"
        )
        upd = dataclasses.replace(upd, last_checkpoint=None)
    if upd.output is not None and not under(upd.output.uri, spec.output.uri):
        rejected.append(
            f"output.uri {upd.output.uri[:200]!r} is not under the job's output.uri "
            f"{spec.output.uri}"
        )
        upd = dataclasses.replace(upd, output=None)
    return Report(upd, tuple(rejected))


def last_heartbeat(lease: Mapping[str, Any] | None) -> dt.datetime | None:
    return parse_time(((lease or {}).get("spec") or {}).get("renewTime"))


def hung_for(
    lease: Mapping[str, Any] | None,
    running_since: dt.datetime | None,
    now: dt.datetime,
    timeout: int,
) -> tuple[float | None, float]:
    """(seconds without a heartbeat if that exceeds ``timeout``, else None; seconds until
    it would). The clock starts when the gang was last seen all Running, so a heartbeat
    left over from an earlier attempt, or none yet, is measured from there."""
    marks = [t for t in (last_heartbeat(lease), running_since) if t is not None]
    if not marks:
        return None, float(timeout)
    quiet = (now - max(marks)).total_seconds()
    return (quiet if quiet > timeout else None), max(0.0, timeout - quiet)
