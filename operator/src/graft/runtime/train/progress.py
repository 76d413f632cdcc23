"""Progress reports and the heartbeat: JSON lines on stdout and the job's progress Lease.

Only global rank 0 reports. In a cluster it writes to the ``coordination.k8s.io/v1`` Lease
the operator made for the job (``GRAFT_PROGRESS_LEASE``): the progress JSON in the
annotation ``graft.dev/progress``, and ``spec.renewTime`` + ``spec.holderIdentity`` as the
heartbeat. The trainer's Role may update only that Lease; it has no rights on Pods.

The heartbeat is the training loop's liveness, not the process's: inside the loop the Lease
is renewed only when a step (or a checkpoint, or a report) has finished since the last
renewal, so a rank stuck in a collective stops it. Outside the loop (loading the model,
preparing data, writing files) nothing else can block on another rank for long, and the
Lease is renewed on time. All API calls run on a background thread; a failing API server
is logged and never slows or stops training.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

log = logging.getLogger(__name__)

ANNOTATION = "graft.dev/progress"
TERMINAL = ("succeeded", "failed")


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(t: dt.datetime | None = None) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds), as Lease.spec.renewTime wants."""
    return (t or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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


class Heartbeat:
    """Whether the main thread is still getting somewhere, as seen from another thread.

    ``loop()`` marks code that can block on other ranks (the training loop: every step
    runs collectives); inside it only ``beat()`` proves liveness. ``working()`` marks
    local work inside the loop that may legitimately take long (writing checkpoint files).
    Everywhere else the process counts as alive.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._beats = 0
        self._loops = 0
        self._work = 0

    def beat(self) -> None:
        with self._lock:
            self._beats += 1

    @contextmanager
    def loop(self) -> Iterator[None]:
        with self._lock:
            self._loops += 1
            self._beats += 1
        try:
            yield
        finally:
            with self._lock:
                self._loops -= 1
                self._beats += 1

    @contextmanager
    def working(self) -> Iterator[None]:
        with self._lock:
            self._work += 1
        try:
            yield
        finally:
            with self._lock:
                self._work -= 1
                self._beats += 1

    def check(self, seen: int) -> tuple[bool, int]:
        """(alive since the check that returned ``seen``, the value to pass next time)."""
        with self._lock:
            alive = self._loops == 0 or self._work > 0 or self._beats != seen
            return alive, self._beats


class LeaseReporter:
    """Writes progress and the heartbeat to the job's Lease from a background thread.

    A renewal is due every ``heartbeat_interval`` seconds (skipped while the heartbeat
    says the loop is stuck); a new progress report goes out at most every
    ``progress_interval`` seconds, always the latest one. Each write is one merge patch
    carrying whatever is due. Credentials: the pod's service account, or outside a pod
    (a test kubelet runs trainers as local processes) the cluster of ``KUBECONFIG``.
    """

    def __init__(
        self,
        lease: str,
        namespace: str,
        holder: str,
        *,
        heartbeat: Heartbeat,
        heartbeat_interval: float,
        progress_interval: float,
        api: Any = None,
    ) -> None:
        self.lease = lease
        self.namespace = namespace
        self.holder = holder
        self.heartbeat = heartbeat
        self.heartbeat_interval = max(0.05, heartbeat_interval)
        self.progress_interval = max(0.0, progress_interval)
        self._api = api
        self._latest: str | None = None
        self._cv = threading.Condition()
        self._stopped = False
        self._failures = 0
        self.writes = 0
        self._thread = threading.Thread(target=self._run, name="graft-lease", daemon=True)
        self._thread.start()

    def _client(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            self._api = client.CoordinationV1Api()
        return self._api

    def _patch(self, payload: str | None, renew: bool) -> None:
        body: dict[str, Any] = {}
        if payload is not None:
            body["metadata"] = {"annotations": {ANNOTATION: payload}}
        if renew:
            body["spec"] = {"holderIdentity": self.holder, "renewTime": micro_time()}
        if not body:
            return
        try:
            self._client().patch_namespaced_lease(
                self.lease, self.namespace, body, _request_timeout=5
            )
            self.writes += 1
            self._failures = 0
        except Exception as e:  # reporting must never stop training
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:
                log.warning(
                    "could not update the progress Lease",
                    extra={"lease": self.lease, "error": str(e), "failures": self._failures},
                )

    def _run(self) -> None:
        seen = -1
        next_renew = 0.0
        next_report = 0.0
        while True:
            with self._cv:
                t = time.monotonic()
                report_due = self._latest is not None and t >= next_report
                if not (self._stopped or report_due or t >= next_renew):
                    wake = next_renew
                    if self._latest is not None:
                        wake = min(wake, next_report)
                    self._cv.wait(wake - t)
                    continue
                stopping = self._stopped
                payload = self._latest if (report_due or stopping) else None
                if payload is not None:
                    self._latest = None
            alive, seen = self.heartbeat.check(seen)
            self._patch(payload, renew=alive)
            t = time.monotonic()
            next_renew = t + self.heartbeat_interval
            if payload is not None:
                next_report = t + self.progress_interval
            if stopping:
                return

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
        lease: LeaseReporter | None = None,
        heartbeat: Heartbeat | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        stream: TextIO | None = None,
        stdout: bool = True,
    ) -> None:
        self.enabled = enabled
        self.interval = interval
        self.lease = lease
        self.heartbeat = heartbeat or (lease.heartbeat if lease else Heartbeat())
        self.on_progress = on_progress
        self.stream = stream
        self.stdout = stdout
        self.state: dict[str, Any] = {"state": "preparing"}
        self._last_emit = float("-inf")

    def beat(self) -> None:
        self.heartbeat.beat()

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
        self.heartbeat.beat()
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
        if self.lease is not None:
            self.lease.submit(line)
        if self.on_progress is not None:
            try:
                self.on_progress(report)
            except Exception as e:
                log.warning("on_progress callback failed", extra={"error": str(e)})

    def close(self) -> None:
        if self.lease is not None:
            self.lease.close()
