"""Which adapter URIs a ModelService takes from a FineTuneJob's status.

``status.output`` is written by the operator from what the trainer reported, and a user
who may patch the job's status can write anything there. The ModelService takes it only
when it is a storage URI the runtime can read and lies under the job's own
``spec.output.uri``; anything else (``gopher://x``, another tenant's claim, a ``..`` walk)
is refused with a message saying why, never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from graft.api.common import URI_PATTERN, parse_uri


def output_uri_problem(job: Mapping[str, Any], uri: Any) -> str | None:
    """Why the job's reported output ``uri`` cannot be served; None when it can."""
    if not isinstance(uri, str) or len(uri) > 2048 or not re.match(URI_PATTERN, uri):
        return f"reported an output URI that is not a storage URI ({str(uri)[:80]!r})"
    try:
        _, rest = parse_uri(uri)
    except ValueError as e:
        return f"reported an unusable output URI: {e}"
    if ".." in rest.split("/"):
        return f"reported an output URI with a '..' segment ({uri!r})"
    base = str(((job.get("spec") or {}).get("output") or {}).get("uri") or "").rstrip("/")
    if not base or not (uri.rstrip("/") == base or uri.startswith(base + "/")):
        return (
            f"reported output {uri!r}, which is not under its spec.output.uri ({base or 'unset'!r})"
        )
    return None
