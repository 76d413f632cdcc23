"""A test kubelet that runs each scheduled Pod's command as a local process.

The test control plane has no kubelet and no container runtime. ``ProcessKubelet`` plays
both for a set of fake nodes: when the real scheduler binds a Pod to one of its nodes, it
starts the Pod's first container's command (with the test's Python for ``python``) as a
child process and writes the Pod's status back the way a kubelet does (Running with
``startTime`` and container states; Succeeded or Failed with the exit code and the
termination message). What a container would see is mapped onto this machine:

- environment: literal values, downward-API ``fieldRef``s (``metadata.name``,
  ``metadata.namespace``, ``metadata.uid``, ``spec.nodeName``, ``status.podIP``,
  ``status.hostIP``) and ``configMapKeyRef``/``secretKeyRef``;
- volumes: a ConfigMap is written to a per-Pod directory, an ``emptyDir`` is a per-Pod
  directory, a PersistentVolumeClaim is one local directory per namespace and claim
  (``<root>/pvc/<namespace>/<claim>``, shared by every Pod that mounts it, like an RWX
  volume). Environment values that name a mount path, a path below one, or the directory
  that holds the claims' mount paths (``GRAFT_PVC_ROOT=/mnt/pvc``) are rewritten to the
  local paths; so is the container's ``terminationMessagePath``;
- network: every Pod shares 127.0.0.1, so cluster DNS names (``*.svc``) in the environment
  become ``127.0.0.1``, and ``MASTER_PORT`` becomes a free port that every Pod of the same
  gang (namespace, rendezvous address, port, ``graft.dev/attempt``) agrees on;
- ``KUBECONFIG`` points at the test cluster (a Pod would use its service account) and
  ``TMPDIR``/``HOME`` at the Pod's own scratch directory (a container has its own
  filesystem).

Deletion works as on a kubelet: SIGTERM to the container's main process, SIGKILL to the
whole process tree after the grace period, the final status written, then the Pod deleted
with grace 0 to confirm. ``take_node_down`` is a node dying: every process on it gets
SIGKILL, the node turns NotReady and its Pods are no longer looked after (a dead kubelet
confirms nothing).

Linux only (the process tree is read from /proc).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kubernetes import client

from graft.procs import descendants
from graft.testing.cluster import FakeKubelet
from graft.testing.controlplane import free_port

log = logging.getLogger(__name__)

POD_IP = "127.0.0.1"
#: Cluster DNS names (``<svc>.<ns>.svc[.cluster.local]``, pod hostnames below a Service).
_CLUSTER_DNS = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.svc(\.cluster\.local)?\.?$")
#: Variables of the test process that must not leak into a "container".
_HOST_ONLY = re.compile(
    r"^(GRAFT_.*|POD_NAME|POD_NAMESPACE|MASTER_ADDR|MASTER_PORT|RANK|LOCAL_RANK|WORLD_SIZE|"
    r"TORCHELASTIC_.*|PYTEST_.*|KUBECONFIG)$"
)
MAX_MESSAGE = 4096


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process and everything below it (the tree is read before any signal)."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


@dataclass
class PodRun:
    """One Pod's container run on this kubelet, with wall-clock times for the test."""

    namespace: str
    name: str
    uid: str
    node: str
    labels: dict[str, str]
    env: dict[str, str]
    argv: list[str]
    directory: Path
    stdout_path: Path
    stderr_path: Path
    termination_path: Path
    policy: str
    container: str
    image: str
    proc: subprocess.Popen[bytes] | None = None
    started: float | None = None
    finished: float | None = None
    exit_code: int | None = None
    term_deadline: float | None = None
    killed_with_node: bool = False
    status_written: bool = False
    _files: list[IO[bytes]] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def running(self) -> bool:
        return self.proc is not None and self.exit_code is None

    @property
    def seconds(self) -> float | None:
        """How long the container ran (so far, while it runs)."""
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def json_lines(self, stream: str = "stdout") -> list[dict[str, Any]]:
        """The JSON objects among the lines of stdout (progress) or stderr (logs)."""
        text = self.stdout() if stream == "stdout" else self.stderr()
        out: list[dict[str, Any]] = []
        for line in text.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    obj = json.loads(line)
                    if isinstance(obj, dict):
                        out.append(obj)
        return out

    def close_files(self) -> None:
        for f in self._files:
            with contextlib.suppress(OSError):
                f.close()
        self._files.clear()


class ProcessKubelet:
    """Runs the Pods bound to ``nodes`` as local processes and reports them like a kubelet.

    Call :meth:`start` to run its loop on a background thread (polls the API every
    ``interval`` seconds) and :meth:`stop` to end it and kill whatever still runs.
    """

    def __init__(
        self,
        api: client.ApiClient,
        kubeconfig: str | Path,
        root: str | Path,
        *,
        nodes: Iterable[str] = (),
        python: str = sys.executable,
        extra_env: Mapping[str, str] | None = None,
        interval: float = 0.2,
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.nodes_api = FakeKubelet(api)
        self.kubeconfig = str(kubeconfig)
        self.root = Path(root)
        self.python = python
        self.extra_env = dict(extra_env or {})
        self.interval = interval
        self._nodes: set[str] = set(nodes)
        self._down: set[str] = set()
        self._runs: dict[tuple[str, str], PodRun] = {}
        self._history: list[PodRun] = []
        self._ports: dict[tuple[str, ...], int] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    # -- nodes -----------------------------------------------------------------------
    def manage(self, *nodes: str) -> None:
        """Run the Pods bound to these nodes from now on."""
        with self._lock:
            self._nodes.update(nodes)
            self._down.difference_update(nodes)

    def take_node_down(self, node: str) -> list[PodRun]:
        """The node dies: kill -9 every process on it, mark it NotReady, stop reporting.

        Returns the runs that were killed.
        """
        with self._lock:
            self._down.add(node)
            killed = [r for r in self._runs.values() if r.node == node and r.running]
            for r in killed:
                assert r.proc is not None
                kill_tree(r.proc.pid)
                r.killed_with_node = True
            for r in killed:
                assert r.proc is not None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    r.proc.wait(timeout=10)
                r.finished = time.time()
                r.exit_code = _exit_code(r.proc.returncode)
                r.close_files()
        self.nodes_api.set_node_ready(node, False)
        return killed

    # -- what ran --------------------------------------------------------------------
    def runs(
        self, namespace: str | None = None, predicate: Callable[[PodRun], bool] | None = None
    ) -> list[PodRun]:
        """Every container run so far (also of Pods gone since), oldest first."""
        with self._lock:
            runs = list(self._history)
        return [
            r
            for r in runs
            if (namespace is None or r.namespace == namespace)
            and (predicate is None or predicate(r))
        ]

    def run_of(self, namespace: str, name: str) -> PodRun | None:
        found = self.runs(namespace, lambda r: r.name == name)
        return found[-1] if found else None

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The local directory behind a PersistentVolumeClaim (made on first use)."""
        path = self.root / "pvc" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def pvc_root(self, namespace: str) -> Path:
        """The local equivalent of ``/mnt/pvc`` for Pods of this namespace."""
        path = self.root / "pvc" / namespace
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- loop ------------------------------------------------------------------------
    def start(self) -> ProcessKubelet:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="process-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            for r in self._runs.values():
                if r.running:
                    assert r.proc is not None
                    kill_tree(r.proc.pid)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        r.proc.wait(timeout=10)
                r.close_files()

    def __enter__(self) -> ProcessKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as e:  # a hiccup of the API must not end the kubelet
                msg = f"{type(e).__name__}: {e}"
                if not self.errors or self.errors[-1] != msg:
                    self.errors.append(msg)
                log.warning("process kubelet sync failed: %s", msg)
            self._stop.wait(self.interval)

    def sync(self) -> None:
        """One pass: start new Pods, report exits, carry out deletions."""
        pods: list[Any] = list(self.core.list_pod_for_all_namespaces().items)
        with self._lock:
            live = {n for n in self._nodes if n not in self._down}
            seen: set[tuple[str, str]] = set()
            for pod in pods:
                node = pod.spec.node_name if pod.spec else None
                if node not in live:
                    continue
                key = (pod.metadata.namespace, pod.metadata.name)
                seen.add(key)
                run = self._runs.get(key)
                if run is not None and run.uid != pod.metadata.uid:
                    # same name, new Pod: the old one is gone
                    self._forget(run)
                    run = None
                if pod.metadata.deletion_timestamp is not None:
                    self._delete(pod, run)
                    continue
                if run is None and (pod.status is None or pod.status.phase in (None, "Pending")):
                    self._start(pod)
                elif run is not None:
                    self._report_exit(run)
            # Pods removed from the API (grace 0) whose containers still run: kill them.
            for key, run in list(self._runs.items()):
                if key not in seen and run.node in live:
                    self._forget(run)

    # -- pod lifecycle ---------------------------------------------------------------
    def _start(self, pod: Any) -> None:
        ns, name = pod.metadata.namespace, pod.metadata.name
        directory = self.root / "pods" / ns / f"{name}-{pod.metadata.uid[:8]}"
        directory.mkdir(parents=True, exist_ok=True)
        container = pod.spec.containers[0]
        try:
            env, argv, term_path = self._container(pod, container, directory)
        except Exception as e:  # what a kubelet reports as CreateContainerConfigError
            self._write_waiting(pod, container.name, "CreateContainerConfigError", str(e))
            return
        run = PodRun(
            namespace=ns,
            name=name,
            uid=pod.metadata.uid,
            node=pod.spec.node_name,
            labels=dict(pod.metadata.labels or {}),
            env=env,
            argv=argv,
            directory=directory,
            stdout_path=directory / "stdout.log",
            stderr_path=directory / "stderr.log",
            termination_path=term_path,
            policy=container.termination_message_policy or "File",
            container=container.name,
            image=container.image or "",
        )
        out = open(run.stdout_path, "ab")  # noqa: SIM115 - closed when the process ends
        err = open(run.stderr_path, "ab")  # noqa: SIM115
        run._files = [out, err]
        (directory / "command").write_text(shlex.join(argv) + "\n")
        run.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=str(directory),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        run.started = time.time()
        self._runs[run.key] = run
        self._history.append(run)
        self._write_running(pod, container.name)

    def _report_exit(self, run: PodRun) -> None:
        if run.proc is None or run.status_written:
            return
        if run.exit_code is None:
            code = run.proc.poll()
            if code is None:
                return
            run.exit_code = _exit_code(code)
            run.finished = time.time()
            run.close_files()
        self._write_terminated(run)

    def _delete(self, pod: Any, run: PodRun | None) -> None:
        """Graceful deletion as a kubelet does it: SIGTERM, wait, SIGKILL, confirm."""
        if run is not None and run.running:
            assert run.proc is not None
            if run.term_deadline is None:
                grace = pod.metadata.deletion_grace_period_seconds
                run.term_deadline = time.time() + (30 if grace is None else grace)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(run.proc.pid, signal.SIGTERM)
            code = run.proc.poll()
            if code is None and time.time() < run.term_deadline:
                return
            if code is None:
                kill_tree(run.proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    run.proc.wait(timeout=10)
            assert run.proc.returncode is not None
            run.exit_code = _exit_code(run.proc.returncode)
            run.finished = time.time()
            run.close_files()
        if run is not None and not run.status_written and run.exit_code is not None:
            with contextlib.suppress(client.ApiException):
                self._write_terminated(run)
        if run is not None and run.proc is not None:
            # a Pod's other processes do not outlive it
            kill_tree(run.proc.pid)
        try:
            self.core.delete_namespaced_pod(
                pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0
            )
        except client.ApiException as e:
            if e.status != 404:
                raise
        if run is not None:
            self._runs.pop(run.key, None)

    def _forget(self, run: PodRun) -> None:
        if run.running:
            assert run.proc is not None
            kill_tree(run.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.proc.wait(timeout=10)
            assert run.proc.returncode is not None
            run.exit_code = _exit_code(run.proc.returncode)
            run.finished = time.time()
        run.close_files()
        self._runs.pop(run.key, None)

    # -- mapping a container onto this machine -------------------------------------
    def _container(
        self, pod: Any, container: Any, directory: Path
    ) -> tuple[dict[str, str], list[str], Path]:
        ns = pod.metadata.namespace
        mounts = self._volumes(pod, container, directory)
        term_path = directory / "termination-log"
        paths = dict(mounts)
        paths[container.termination_message_path or "/dev/termination-log"] = str(term_path)
        scratch = directory / "tmp"
        scratch.mkdir(exist_ok=True)

        env = {k: v for k, v in os.environ.items() if not _HOST_ONLY.match(k)}
        env.update(self.extra_env)
        declared: dict[str, str] = {}
        for e in container.env or []:
            declared[e.name] = self._env_value(pod, e)
        declared = {k: _rewrite_path(v, paths) for k, v in declared.items()}
        if "MASTER_ADDR" in declared or "MASTER_PORT" in declared:
            gang = (
                ns,
                declared.get("MASTER_ADDR", ""),
                declared.get("MASTER_PORT", ""),
                (pod.metadata.labels or {}).get("graft.dev/attempt", ""),
            )
            if gang not in self._ports:
                self._ports[gang] = free_port()
            declared["MASTER_PORT"] = str(self._ports[gang])
        declared = {k: POD_IP if _CLUSTER_DNS.match(v) else v for k, v in declared.items()}
        env.update(declared)
        env.update(
            KUBECONFIG=self.kubeconfig,
            TMPDIR=str(scratch),
            HOME=str(scratch),
            HOSTNAME=pod.spec.hostname or pod.metadata.name,
        )
        command = list(container.command or []) + list(container.args or [])
        if not command:
            raise ValueError("the container has no command; this kubelet runs no images")
        if Path(command[0]).name in ("python", "python3"):
            command[0] = self.python
        return env, command, term_path

    def _volumes(self, pod: Any, container: Any, directory: Path) -> dict[str, str]:
        """mountPath -> local directory, with every volume made ready."""
        ns = pod.metadata.namespace
        local: dict[str, Path] = {}
        claims: dict[str, str] = {}
        for v in pod.spec.volumes or []:
            if v.persistent_volume_claim is not None:
                claim = v.persistent_volume_claim.claim_name
                local[v.name] = self.claim_dir(ns, claim)
                claims[v.name] = claim
            elif v.config_map is not None:
                path = directory / "volumes" / v.name
                path.mkdir(parents=True, exist_ok=True)
                cm = self.core.read_namespaced_config_map(v.config_map.name, ns)
                items = {i.key: i.path for i in v.config_map.items or []}
                for key, value in (cm.data or {}).items():
                    if items and key not in items:
                        continue
                    target = path / items.get(key, key)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(value)
                local[v.name] = path
            else:  # emptyDir and anything else: a directory of the Pod's own
                path = directory / "volumes" / v.name
                path.mkdir(parents=True, exist_ok=True)
                local[v.name] = path
        mounts: dict[str, str] = {}
        for m in container.volume_mounts or []:
            if m.name not in local:
                raise ValueError(f"volume mount {m.name!r} names no volume of the pod")
            target = local[m.name] / m.sub_path if m.sub_path else local[m.name]
            mount_path = m.mount_path.rstrip("/")
            mounts[mount_path] = str(target)
            claim = claims.get(m.name)
            if claim and not m.sub_path and Path(mount_path).name == claim:
                # /mnt/pvc/<claim> -> <pvc root>/<claim>: /mnt/pvc itself maps too
                mounts.setdefault(str(Path(mount_path).parent), str(local[m.name].parent))
        return mounts

    def _env_value(self, pod: Any, e: Any) -> str:
        if e.value_from is None:
            return str(e.value or "")
        src = e.value_from
        if src.field_ref is not None:
            path = src.field_ref.field_path
            values = {
                "metadata.name": pod.metadata.name,
                "metadata.namespace": pod.metadata.namespace,
                "metadata.uid": pod.metadata.uid,
                "spec.nodeName": pod.spec.node_name,
                "spec.serviceAccountName": pod.spec.service_account_name or "default",
                "status.podIP": POD_IP,
                "status.hostIP": POD_IP,
            }
            m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if m:
                source = pod.metadata.labels if m[1] == "labels" else pod.metadata.annotations
                return str((source or {}).get(m[2], ""))
            if path not in values:
                raise ValueError(f"env {e.name}: fieldRef {path} is not supported here")
            return str(values[path])
        if src.config_map_key_ref is not None:
            ref = src.config_map_key_ref
            cm = self.core.read_namespaced_config_map(ref.name, pod.metadata.namespace)
            return str((cm.data or {})[ref.key])
        if src.secret_key_ref is not None:
            import base64

            ref = src.secret_key_ref
            secret = self.core.read_namespaced_secret(ref.name, pod.metadata.namespace)
            return base64.b64decode((secret.data or {})[ref.key]).decode()
        raise ValueError(f"env {e.name}: this kind of valueFrom is not supported here")

    # -- status ----------------------------------------------------------------------
    def _write_running(self, pod: Any, container: str) -> None:
        t = now()
        self.core.patch_namespaced_pod_status(
            pod.metadata.name,
            pod.metadata.namespace,
            {
                "status": {
                    "phase": "Running",
                    "startTime": t,
                    "hostIP": POD_IP,
                    "podIP": POD_IP,
                    "conditions": [
                        {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                        {"type": "ContainersReady", "status": "True", "lastTransitionTime": t},
                        {"type": "Ready", "status": "True", "lastTransitionTime": t},
                    ],
                    "containerStatuses": [
                        {
                            "name": container,
                            "ready": True,
                            "started": True,
                            "restartCount": 0,
                            "image": pod.spec.containers[0].image or "",
                            "imageID": "",
                            "state": {"running": {"startedAt": t}},
                        }
                    ],
                }
            },
        )

    def _write_waiting(self, pod: Any, container: str, reason: str, message: str) -> None:
        self.core.patch_namespaced_pod_status(
            pod.metadata.name,
            pod.metadata.namespace,
            {
                "status": {
                    "containerStatuses": [
                        {
                            "name": container,
                            "ready": False,
                            "restartCount": 0,
                            "image": pod.spec.containers[0].image or "",
                            "imageID": "",
                            "state": {"waiting": {"reason": reason, "message": message[:1000]}},
                        }
                    ],
                }
            },
        )

    def _termination_message(self, run: PodRun) -> str:
        text = ""
        if run.termination_path.exists():
            text = run.termination_path.read_text(errors="replace")
        if not text and run.exit_code and run.policy == "FallbackToLogsOnError":
            tail = (run.stdout() + run.stderr()).splitlines()[-80:]
            text = "\n".join(tail)
        return text[-MAX_MESSAGE:].strip()

    def _write_terminated(self, run: PodRun) -> None:
        assert run.exit_code is not None and run.started is not None
        code = run.exit_code
        reason = "Completed" if code == 0 else ("OOMKilled" if code == 137 else "Error")
        if code == 137 and not run.killed_with_node:
            reason = "Error"  # SIGKILL after the grace period, not the OOM killer
        term: dict[str, Any] = {
            "exitCode": code,
            "reason": reason,
            "startedAt": _iso(run.started),
            "finishedAt": _iso(run.finished or time.time()),
        }
        message = self._termination_message(run)
        if message:  # an empty string in a list item is refused by the 1.20 apiserver
            term["message"] = message
        self.core.patch_namespaced_pod_status(
            run.name,
            run.namespace,
            {
                "status": {
                    "phase": "Succeeded" if code == 0 else "Failed",
                    "conditions": [
                        {"type": "ContainersReady", "status": "False", "lastTransitionTime": now()},
                        {"type": "Ready", "status": "False", "lastTransitionTime": now()},
                    ],
                    "containerStatuses": [
                        {
                            "name": run.container,
                            "ready": False,
                            "started": False,
                            "restartCount": 0,
                            "image": run.image,
                            "imageID": "",
                            "state": {"terminated": term},
                        }
                    ],
                }
            },
        )
        run.status_written = True


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _exit_code(returncode: int) -> int:
    """A container runtime reports death by signal N as exit code 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _rewrite_path(value: str, paths: Mapping[str, str]) -> str:
    """Map a container path onto the local one of the longest mount path it lies under."""
    best = ""
    for mount in paths:
        if (value == mount or value.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best = mount
    if not best:
        return value
    return paths[best] + value[len(best) :]
