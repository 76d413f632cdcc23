"""Map Kubernetes API errors to Kopf's retry semantics."""

from __future__ import annotations

import kopf
from kubernetes_asyncio.client.exceptions import ApiException


def api_error(e: ApiException, what: str) -> Exception:
    """409, 429, 5xx and not-ready are temporary (retried); the rest are permanent."""
    status = e.status or 0
    body = e.body.decode(errors="replace") if isinstance(e.body, bytes) else e.body
    detail = (e.reason or "") + (f": {body}" if body else "")
    if status in (409, 429) or status >= 500 or status == 0:
        return kopf.TemporaryError(f"{what}: {status} {detail}", delay=2)
    return kopf.PermanentError(f"{what}: {status} {detail}")
