"""What both reconcilers share: one pass at a time per object, and minimal status patches."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from graft.api.common import ApiModel
from graft.kube import omit_empty_strings


def status_patch(old: Mapping[str, Any], new: ApiModel) -> dict[str, Any]:
    """Merge patch from the live status to ``new``: changed keys, None for keys to delete.

    ``status.graft`` (Kopf's bookkeeping) is never touched. ``new`` is compared in the
    shape it is written in (``Kube.patch_status`` drops empty strings inside list items, so
    the live copy of a condition whose message is "" has no message): comparing before that
    made every such condition look changed, and every pass wrote status again.
    """
    want = omit_empty_strings(new.wire())
    patch: dict[str, Any] = {k: v for k, v in want.items() if old.get(k) != v}
    for k in old:
        if k not in want and k != "graft":
            patch[k] = None
    return patch


class Coalescer:
    """Runs passes one at a time per key; a call during a running pass makes that pass run
    once more instead, so a burst of events costs two passes, not one per event."""

    def __init__(self) -> None:
        self._running: set[tuple[str, str]] = set()
        self._dirty: set[tuple[str, str]] = set()

    async def run(self, key: tuple[str, str], once: Callable[[], Awaitable[None]]) -> None:
        if key in self._running:
            self._dirty.add(key)
            return
        self._running.add(key)
        try:
            while True:
                self._dirty.discard(key)
                await once()
                if key not in self._dirty:
                    break
        finally:
            self._running.discard(key)

    def forget(self, key: tuple[str, str]) -> None:
        self._dirty.discard(key)
