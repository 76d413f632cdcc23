"""What the operator asks a running Serve app: the replicas' canary reports.

Behind a Protocol (as KubeRay's ``RayDashboardClientInterface``) so that the reconciler is
tested with a fake and runs against the real app with :class:`HttpServeClient`.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

import aiohttp

log = logging.getLogger(__name__)


class ServeClient(Protocol):
    async def reports(self, base_url: str, *, samples: int) -> list[dict[str, Any]]:
        """Up to ``samples`` replica reports (``/readyz`` bodies) from the app at
        ``base_url``; an empty list when it cannot be reached."""
        ...


class HttpServeClient:
    """GETs ``/readyz`` through the app's Service; each answer comes from one replica, so
    several samples see several replicas (Serve spreads requests across them)."""

    def __init__(self, timeout_s: float = 3.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def reports(self, base_url: str, *, samples: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        try:
            async with aiohttp.ClientSession(timeout=self._timeout) as session:
                for _ in range(max(1, samples)):
                    async with session.get(f"{base_url}/readyz") as r:
                        if r.status != 200:
                            continue
                        body = json.loads(await r.read())
                        if isinstance(body, dict):
                            out.append(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            # Not reachable yet (no replica, DNS, NetworkPolicy): no report means no
            # rollback from the operator; replicas still roll back on their own.
            log.debug("no canary report from %s: %s", base_url, e)
        return out
