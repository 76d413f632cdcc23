"""API keys for the OpenAI endpoint: a file of keys, one per line, checked in constant time.

In a cluster the file is a ModelService's ``spec.auth.apiKeySecretRef`` mounted into the
worker pods; the kubelet refreshes a mounted Secret in place, so the file is read again
whenever it changes and a rotated key works without restarting replicas. Locally it is
``graft serve --api-key-file FILE``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def parse_keys(text: str) -> list[str]:
    """Keys from a file's text: one per line; blank lines and ``#`` comments are skipped."""
    keys = []
    for line in text.splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            keys.append(key)
    return keys


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of the
    # key's length as well as its content.
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The accepted keys, reloaded when the file changes. An unreadable or empty file
    accepts no key at all: a misconfigured Secret never opens the endpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._digests: list[bytes] = []

    def _refresh(self) -> list[bytes]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError as e:
            if self._stamp != (0, 0, 0):
                log.error("API key file %s unreadable (%s): refusing every request", self.path, e)
            self._stamp, self._digests = (0, 0, 0), []
            return self._digests
        if stamp == self._stamp:
            return self._digests
        try:
            keys = parse_keys(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            log.error("API key file %s unreadable (%s): refusing every request", self.path, e)
            keys = []
        if not keys:
            log.error("API key file %s holds no key: refusing every request", self.path)
        self._stamp, self._digests = stamp, [_digest(k) for k in keys]
        return self._digests

    def accepts(self, key: str) -> bool:
        with self._lock:
            digests = self._refresh()
        given = _digest(key)
        ok = False
        # No early exit: the time taken does not say which key (or whether any) matched.
        for d in digests:
            ok |= hmac.compare_digest(given, d)
        return ok


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
