"""Progress reports: JSON lines on stdout and the ``graft.dev/progress`` Pod annotation.

Only global rank 0 reports. Pod patches run on a background thread that always sends the
latest report and at most one every ``annotation_interval`` seconds; a failing API server
is logged and never slows or stops training.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger(__name__)

ANNOTATION = "graft.dev/progress"
TERMINAL = ("succeeded", "failed")


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_eta(seconds: float | None) -> str | None:
    if seconds is None or seconds != seconds or seconds < 0:
        return None
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


class PodAnnotator:
    """Patches the progress annotation of this Pod with the in-cluster service account
    (or, outside a pod, the cluster of ``KUBECONFIG``)."""

    def __init__(self, pod: str, namespace: str, interval: float) -> None:
        self.pod = pod
        self.namespace = namespace
        self.interval = interval
        self._latest: str | None = None
        self._cv = threading.Condition()
        self._stopped = False
        self._api: Any = None
        self._failures = 0
        self._thread = threading.Thread(target=self._run, name="graft-progress", daemon=True)
        self._thread.start()

    def _client(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                # Not in a pod (a test kubelet runs trainers as local processes): KUBECONFIG.
                config.load_kube_config()  # type: ignore[no-untyped-call]
            self._api = client.CoreV1Api()
        return self._api

    def _patch(self, payload: str) -> None:
        body = {"metadata": {"annotations": {ANNOTATION: payload}}}
        try:
            self._client().patch_namespaced_pod(self.pod, self.namespace, body, _request_timeout=5)
            self._failures = 0
        except Exception as e:  # reporting must never stop training
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:
                log.warning(
                    "could not patch progress annotation",
                    extra={"pod": self.pod, "error": str(e), "failures": self._failures},
                )

    def _run(self) -> None:
        last = 0.0
        while True:
            with self._cv:
                while self._latest is None and not self._stopped:
                    self._cv.wait()
                if self._latest is None and self._stopped:
                    return
                wait = last + self.interval - time.monotonic()
                if wait > 0 and not self._stopped:
                    self._cv.wait(wait)
                    continue
                payload, self._latest = self._latest, None
            if payload is not None:
                self._patch(payload)
                last = time.monotonic()

    def submit(self, payload: str) -> None:
        with self._cv:
            self._latest = payload
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Flush the last report (the final state matters to the operator) and stop."""
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)


class Reporter:
    """Collects the fields of the progress object and emits it on a schedule."""

    def __init__(
        self,
        *,
        enabled: bool,
        interval: float,
        annotator: PodAnnotator | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        stream: TextIO | None = None,
        stdout: bool = True,
    ) -> None:
        self.enabled = enabled
        self.interval = interval
        self.annotator = annotator
        self.on_progress = on_progress
        self.stream = stream
        self.stdout = stdout
        self.state: dict[str, Any] = {"state": "preparing"}
        self._last_emit = float("-inf")

    def update(self, **fields: Any) -> None:
        for k, v in fields.items():
            if v is None:
                self.state.pop(k, None)
            else:
                self.state[k] = v

    def due(self) -> bool:
        return self.enabled and time.monotonic() - self._last_emit >= self.interval

    def emit(self, *, force: bool = False, **fields: Any) -> None:
        self.update(**fields)
        if not self.enabled or not (force or self.due()):
            return
        self._last_emit = time.monotonic()
        report = dict(self.state)
        report["time"] = now()
        line = json.dumps(report, separators=(",", ":"))
        if self.stdout:
            out = self.stream or sys.stdout
            try:
                out.write(line + "\n")
                out.flush()
            except (OSError, ValueError):
                pass
        if self.annotator is not None:
            self.annotator.submit(line)
        if self.on_progress is not None:
            try:
                self.on_progress(report)
            except Exception as e:
                log.warning("on_progress callback failed", extra={"error": str(e)})

    def close(self) -> None:
        if self.annotator is not None:
            self.annotator.close()
