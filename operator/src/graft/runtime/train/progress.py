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

Renewal starts with the process (``start_heartbeat``, before torch and the model libraries
are imported), not once training is set up: those imports alone take tens of seconds on a
busy node, and a gang that is starting up is working, not hung. Under torchrun the pod's
launcher renews until global rank 0's worker has taken over (a file it creates), so there
is always exactly one reporter that the training loop can stop.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from graft.runtime.train.config import RuntimeEnv

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
        until: Callable[[], bool] | None = None,
    ) -> None:
        self.lease = lease
        self.namespace = namespace
        self.holder = holder
        self.heartbeat = heartbeat
        #: When it returns True the reporter stops for good (another process took over).
        self.until = until
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
            if self.until is not None and self.until():
                return
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


#: Set by a pod's torchrun launcher for its workers: the file global rank 0's worker creates
#: once it renews the Lease itself, which stops the launcher's renewals.
HANDOFF_ENV = "GRAFT_HEARTBEAT_HANDOFF"

_started: LeaseReporter | None = None


def _reports(env: RuntimeEnv) -> bool:
    """Whether this process is (or launches) global rank 0 of a job with a progress Lease."""
    if not (env.progress_lease and env.pod_namespace) or env.node_rank != 0:
        return False
    return os.environ.get("RANK", "0") == "0"


def _new_reporter(env: RuntimeEnv, until: Callable[[], bool] | None = None) -> LeaseReporter:
    assert env.progress_lease and env.pod_namespace
    return LeaseReporter(
        env.progress_lease,
        env.pod_namespace,
        env.pod_name or _hostname(),
        heartbeat=Heartbeat(),
        heartbeat_interval=env.heartbeat_interval,
        progress_interval=env.annotation_interval,
        until=until,
    )


def _hostname() -> str:
    import socket

    return socket.gethostname()


def start_heartbeat(env: RuntimeEnv, *, launcher: bool = False) -> LeaseReporter | None:
    """Start renewing the job's Lease now, first thing in the process, so that importing
    torch and the model libraries (slow on a busy node) never looks like a hung trainer.

    ``launcher``: this process only starts the workers (torchrun); it renews until global
    rank 0's worker calls this too, and the training loop's heartbeat takes over.
    """
    global _started
    if _started is not None or not _reports(env):
        return _started
    if launcher:
        handoff = Path(tempfile.mkdtemp(prefix="graft-heartbeat-")) / "taken"
        os.environ[HANDOFF_ENV] = str(handoff)
        _started = _new_reporter(env, until=handoff.exists)
        return _started
    _started = _new_reporter(env)
    taken = os.environ.pop(HANDOFF_ENV, None)
    if taken:
        Path(taken).touch()
    return _started


def lease_reporter(env: RuntimeEnv, is_main: bool) -> LeaseReporter | None:
    """The Lease reporter of a training run in this process: the one ``start_heartbeat``
    started, else a new one (a run started in-process); only global rank 0 has one."""
    global _started
    started, _started = _started, None
    if not is_main:
        if started is not None:
            started.close()
        return None
    if started is not None:
        return started
    if env.progress_lease and env.pod_namespace:
        return _new_reporter(env)
    return None


#: Test-only: "<job>:<attempt>:<rank>:<step>" makes that rank of that attempt of that job
#: block for ever in a communication op once it has finished that step, so the e2e tests
#: can show a hung gang being detected. Never set outside tests.
TEST_HANG_ENV = "GRAFT_TEST_ONLY_HANG_IN_COLLECTIVE"


def test_only_hang_in_collective(job: str, rank: int, world: int, attempt: int, step: int) -> None:
    """Block for ever, as a rank stuck in a collective does, when ``TEST_HANG_ENV`` says
    so: this rank waits in a receive no peer answers, and the others then wait for it in
    the next step's gradient all-reduce (the heartbeat stops with them)."""
    want = os.environ.get(TEST_HANG_ENV)
    if not want or world < 2:
        return
    name, a, r, s = want.rsplit(":", 3)
    if (name, attempt, rank, step) != (job, int(a), int(r), int(s)):
        return
    import torch
    import torch.distributed as dist

    log.warning("test-only hang: blocking in a receive no peer answers", extra={"step": step})
    while True:
        dist.recv(torch.zeros(1), src=(rank + 1) % world)


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
