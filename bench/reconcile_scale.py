"""Operator at scale: graft-operator vs a hand-written controller, on one real control plane.

One fresh etcd + kube-apiserver (with an audit log) + controller-manager + scheduler on
127.0.0.1 (the CRDs from crds/, four fake A100 nodes and two CPU nodes) serves every run:

1. **ceiling**: the bench's client creates N FineTuneJobs in a namespace nothing watches;
2. **burst**, alternately for each setup, ``--repeat`` times (the order flips every repeat):
   the setup watches one fresh namespace while the client creates N 1-node x 8-GPU jobs
   there, 16 at a time. Done when every job has ``Accepted=True`` and its Pod exists (the
   Pods mostly stay Pending: 4 A100 nodes; scheduling is not what is measured). The setups:
   * ``graft``: the real ``graft-operator`` process;
   * ``handwritten``: ``bench/handwritten_controller.py``, a minimal asyncio controller that
     makes the same writes from the same ``decide`` and builders (raw aiohttp, one watch,
     16 workers). After the runs the bench reads back the children and status of the first
     jobs of both and checks they are identical (namespaces, uids and times aside);
   The controller-manager runs with ``--kube-api-qps=500``: at its default of 20/s, the
   v1.20 token controller (3 requests per new ServiceAccount) caps every controller at
   ~6.7 jobs/s, and the bench would measure that limit, not the controllers;
3. **held** (``--held N``, e.g. 10000), for each setup: N suspended jobs (each gets a status
   write and no children), then the controller's RSS per held job; then a restart over them:
   the time until every job had its pass again and the writes it made (none are needed).

Measured: throughput N / (last job done - first create sent); per-job latency from the
create's return to ``Accepted=True`` and to the later of that and its first Pod (client-side
watches opened before the first create); the controller's CPU (utime+stime) per job, peak
RSS, passes per job; requests and writes per job *per client* from the apiserver's audit log
(graft's own client, Kopf's, the hand-written controller's, the scheduler's...); the control
plane's CPU per job and how busy the machine was.

    .venv/bin/python bench/reconcile_scale.py [--n 500] [--quick] [--repeat 2] [--held 10000]
        [--setups graft,handwritten] [--profile]

``--quick`` is N=200, one repeat. ``--profile`` attaches ``py-spy record`` to graft-operator
(its timings are then not comparable), keeps the collapsed stacks in
$TMPDIR/reconcile_scale-profile.txt and adds the heaviest functions to the JSON. Prints a
table with ratios to the hand-written controller and writes bench/results/reconcile_scale.json.
The machine is shared: read ratios rather than absolute times, and the load printed with them.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client, config
from kubernetes.watch.watch import iter_resp_lines

from graft.testing.cluster import TEST_NODE_POOLS, FakeKubelet
from graft.testing.controlplane import ControlPlane, find_assets
from graft.testing.operator import OperatorProcess

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "reconcile_scale.json"
PROFILE = Path(tempfile.gettempdir()) / "reconcile_scale-profile.txt"
GROUP, VERSION, PLURAL = "graft.dev", "v1alpha1", "finetunejobs"
CONCURRENCY = 16
HANDWRITTEN = Path(__file__).parent / "handwritten_controller.py"
BENCH_AGENT = "graft-bench"
WRITES = ("create", "patch", "update", "delete", "deletecollection")
KOPF = {  # ../shared/PERF-FACTS.md, N=1000, same kind of machine
    "ceiling obj/s": 262,
    "Kopf default obj/s": 116,
    "Kopf status-storage obj/s": 160,
    "Kopf p99 ms": "2947-3830",
    "Kopf CPU ms/obj": "2.9-4.1",
    "Kopf peak RSS MB": "136-146",
}


#: the controller-manager's client rate limit in the bench (default 20/s; see below)
KCM_QPS = 500


class AuditedControlPlane(ControlPlane):
    """The test control plane with the apiserver's audit log on (metadata only, one JSON
    line per request), from which the bench counts requests per client."""

    @property
    def audit_log_path(self) -> Path:
        return self.state_dir / "audit.log"

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        if name == "apiserver":
            policy = self.state_dir / "audit-policy.yaml"
            policy.write_text(
                "apiVersion: audit.k8s.io/v1\nkind: Policy\n"
                "omitStages: [RequestReceived, ResponseStarted]\n"
                "rules: [{level: Metadata}]\n"
            )
            argv = [
                *argv,
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log_path}",
                "--audit-log-format=json",
                "--audit-log-maxsize=0",
            ]
        if name == "controller-manager":
            # On v1.20 the token controller must give each new ServiceAccount a token Secret
            # before a Pod may use it (3 requests per job). At the controller-manager's
            # default 20 requests/s that caps any controller at ~6.7 jobs/s and turns the
            # bench into a measure of that limit (both controllers waited on it, measured
            # 2026-12-02). Production control planes raise it; so does the bench.
            argv = [*argv, f"--kube-api-qps={KCM_QPS}", f"--kube-api-burst={2 * KCM_QPS}"]
        super()._spawn(name, argv)


def api_client(cp: ControlPlane) -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(cp.kubeconfig), client_configuration=cfg)  # type: ignore[no-untyped-call]
    cfg.connection_pool_maxsize = CONCURRENCY * 2
    api = client.ApiClient(cfg)
    api.user_agent = BENCH_AGENT
    return api


def job(name: str, suspend: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "pvc://models/llama-8b"},
            "stages": [
                {"type": "SFT", "dataset": {"uri": "pvc://data/sft.jsonl", "format": "alpaca"}}
            ],
            "output": {"uri": "pvc://models/out"},
            "resources": {"nodePool": "a100-80g", "nodes": 1, "gpusPerNode": 8},
            "suspend": suspend,
        },
    }


def create_all(
    api: client.ApiClient, ns: str, n: int, suspend: bool = False
) -> tuple[float, dict[str, float]]:
    """Create n jobs, CONCURRENCY in flight; (time the first was sent, name -> returned)."""
    custom = client.CustomObjectsApi(api)
    done: dict[str, float] = {}

    def one(i: int) -> None:
        name = f"j{i:05d}"
        custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, job(name, suspend), _preload_content=False
        )
        done[name] = time.time()

    t0 = time.time()
    with cf.ThreadPoolExecutor(CONCURRENCY) as pool:
        for f in [pool.submit(one, i) for i in range(n)]:
            f.result()
    return t0, done


class RawWatch(threading.Thread):
    """One watch stream, parsed as plain JSON (no models), each event stamped on arrival."""

    def __init__(self, list_fn: Any, on_event: Any) -> None:
        super().__init__(daemon=True)
        self.list_fn, self.on_event = list_fn, on_event
        self.stopped = threading.Event()
        self.resp: Any = None
        first = self.list_fn(limit=1, _preload_content=False)
        self.rv = str(json.loads(first.data)["metadata"]["resourceVersion"])

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.resp = self.list_fn(
                    watch=True,
                    resource_version=self.rv,
                    allow_watch_bookmarks=True,
                    timeout_seconds=900,
                    _preload_content=False,
                )
                for line in iter_resp_lines(self.resp):
                    if not line:
                        continue
                    t = time.time()
                    ev = json.loads(line)
                    if ev["type"] == "ERROR":
                        raise RuntimeError(f"watch: {ev['object']}")
                    self.rv = ev["object"]["metadata"]["resourceVersion"]
                    if ev["type"] != "BOOKMARK":
                        self.on_event(t, ev["type"], ev["object"])
            except Exception:
                if self.stopped.is_set():
                    return
                raise

    def stop(self) -> None:
        self.stopped.set()
        if self.resp is not None:
            with contextlib.suppress(Exception):  # torn down either way
                self.resp.shutdown()


class Observer:
    """First-seen times of Accepted=True and of each job's first Pod."""

    def __init__(self, api: client.ApiClient, ns: str, n: int) -> None:
        self.n = n
        self.lock = threading.Lock()
        self.accepted: dict[str, float] = {}
        self.suspended: dict[str, float] = {}
        self.admitted_false: dict[str, str] = {}
        self.pod: dict[str, float] = {}
        self.job_events = 0
        self.pod_events = 0
        self.all_done = threading.Event()
        self.all_suspended = threading.Event()
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        self.watches = [
            RawWatch(
                lambda **kw: custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, **kw),
                self._job,
            ),
            RawWatch(
                lambda **kw: core.list_namespaced_pod(ns, label_selector="graft.dev/job", **kw),
                self._pod,
            ),
        ]

    def start(self) -> None:
        for w in self.watches:
            w.start()

    def stop(self) -> None:
        for w in self.watches:
            w.stop()

    def _check(self) -> None:
        if len(self.accepted) >= self.n and len(self.pod) >= self.n:
            self.all_done.set()
        if len(self.suspended) >= self.n:
            self.all_suspended.set()

    def _job(self, t: float, type_: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        with self.lock:
            self.job_events += 1
            for c in (obj.get("status") or {}).get("conditions") or []:
                if c.get("type") == "Suspended" and c.get("status") == "True":
                    self.suspended.setdefault(name, t)
                if name in self.accepted:
                    continue
                if c.get("type") == "Accepted" and c.get("status") == "True":
                    self.accepted[name] = t
                if c.get("type") == "Admitted" and c.get("status") == "False":
                    self.admitted_false[name] = str(c.get("message"))
            self._check()

    def _pod(self, t: float, type_: str, obj: dict[str, Any]) -> None:
        name = (obj["metadata"].get("labels") or {}).get("graft.dev/job")
        with self.lock:
            self.pod_events += 1
            if name and name not in self.pod and type_ != "DELETED":
                self.pod[name] = t
                self._check()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))
    return xs[k]


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def control_plane_cpu_s() -> dict[str, float]:
    """CPU seconds so far of this process's control-plane children (etcd, apiserver, ...)."""
    out: dict[str, float] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            name = child.name()
            if name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
                out[name] = out.get(name, 0.0) + proc_cpu_s(child.pid)
        except (psutil.Error, OSError):
            continue
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all cores from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = float(sum(v[:8]))
    return total - v[3] - v[4], total  # minus idle and iowait


def proc_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def namespace(api: client.ApiClient, prefix: str, exact: bool = False) -> str:
    ns = prefix if exact else f"{prefix}-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})  # type: ignore[arg-type]
    return ns


def drop_namespace(api: client.ApiClient, ns: str) -> None:
    """Jobs and pods at once (no kubelet confirms a graceful deletion), then the namespace."""
    custom = client.CustomObjectsApi(api)
    with contextlib.suppress(client.ApiException):  # 504 on thousands: the namespace goes
        custom.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
    core = client.CoreV1Api(api)
    with contextlib.suppress(client.ApiException):
        core.delete_collection_namespaced_pod(ns, grace_period_seconds=0)
    core.delete_namespace(ns)
    # the next run must not share the machine with this garbage collection
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            core.read_namespace(ns)
        except client.ApiException as e:
            if e.status == 404:
                return
            raise
        time.sleep(1.0)
    print(f"namespace {ns} still terminating after 600 s", file=sys.stderr)


def run_ceiling(api: client.ApiClient, n: int) -> dict[str, Any]:
    ns = namespace(api, "ceil")
    try:
        t0, done = create_all(api, ns, n)
        wall = max(done.values()) - t0
        return {"n": n, "seconds": round(wall, 2), "obj_per_s": round(n / wall, 1)}
    finally:
        drop_namespace(api, ns)


class Profiler:
    """``py-spy record`` attached to the operator; collapsed stacks into PROFILE."""

    def __init__(self, pid: int) -> None:
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
        self.proc = subprocess.Popen(
            [
                *(spy, "record", "--pid", str(pid), "--rate", "100", "--format", "raw"),
                *("--output", str(PROFILE), "--nonblocking"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> None:
        self.proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if self.proc.returncode not in (0, -2, None) and not PROFILE.exists():
            print(f"py-spy failed: {err.decode(errors='replace')[-2000:]}", file=sys.stderr)


def summarize_profile(top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_s: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in PROFILE.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        self_s[frames[-1]] += c
        for f in set(frames):
            incl[f] += c

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100 * c / max(total, 1), 1)) for f, c in counter.most_common(top)]

    return {"samples": total, "self_pct": share(self_s), "inclusive_pct": share(incl)}


class Setup:
    """A controller under test: started on one namespace, stopped, asked for its passes."""

    name = ""

    def __init__(self, cp: AuditedControlPlane, ns: str, log_dir: Path) -> None:
        self.cp, self.ns, self.log_dir = cp, ns, log_dir

    def start(self) -> int:
        raise NotImplementedError

    def passes(self) -> tuple[float, float]:
        """(passes, failed passes) since the process started."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def log(self) -> str:
        raise NotImplementedError


class Graft(Setup):
    name = "graft"
    #: another checkout's operator/src to run instead of this one (``--before``)
    src: str | None = None

    def start(self) -> int:
        env = {"GRAFT_WATCH_NAMESPACES": self.ns}
        if self.src:
            env["PYTHONPATH"] = self.src
        self.op = OperatorProcess(self.cp, self.log_dir, extra_env=env)
        self.op.start()
        assert self.op.proc is not None
        return self.op.proc.pid

    def passes(self) -> tuple[float, float]:
        m = self.op.metrics()

        def total(result: str) -> float:
            pattern = rf'^graft_reconciles_total\{{kind="FineTuneJob",result="{result}"\}} (\S+)'
            return sum(float(x) for x in re.findall(pattern, m, re.M))

        return total("ok"), total("error")

    def stop(self) -> None:
        self.op.stop()

    def log(self) -> str:
        return self.op.log()


class Handwritten(Setup):
    name = "handwritten"

    def start(self) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stats = self.log_dir / f"handwritten-{self.ns}-{time.time_ns()}.json"
        self.log_path = self.stats.with_suffix(".log")
        env = {
            **self.cp.env(),
            "GRAFT_NODE_POOLS": json.dumps(TEST_NODE_POOLS),
            "GRAFT_TERMINATION_GRACE_SECONDS": "30",
            "HANDWRITTEN_NAMESPACE": self.ns,
            "HANDWRITTEN_STATS": str(self.stats),
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HANDWRITTEN)], env=env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 60
        while not self.stats.exists():  # written once it runs
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"handwritten controller did not start:\n{self.log()}")
            time.sleep(0.2)
        return self.proc.pid

    def passes(self) -> tuple[float, float]:
        st = json.loads(self.stats.read_text())
        return float(st["passes"]), float(st["errors"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


class GraftBefore(Graft):
    name = "graft-before"


SETUPS: dict[str, type[Setup]] = {
    "graft": Graft,
    "handwritten": Handwritten,
    "graft-before": GraftBefore,
}


def client_of(agent: str) -> str:
    """The client a request came from, by its User-Agent."""
    for prefix, label in (
        ("graft-operator", "graft"),
        ("kopf/", "kopf"),
        ("handwritten", "handwritten"),
        (BENCH_AGENT, "bench"),
    ):
        if agent.startswith(prefix):
            return label
    first = agent.split("/")[0]
    tail = agent.rsplit("/", 1)[-1] if "system:serviceaccount" in agent else ""
    return f"{first}{':' + tail if tail else ''}"


class Audit:
    """Requests per client from the apiserver's audit log, from a byte offset on."""

    def __init__(self, cp: AuditedControlPlane) -> None:
        self.path = cp.audit_log_path
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def count(self, ns: str) -> dict[str, dict[str, int]]:
        """client -> {"requests", "writes", "<verb> <resource>"...} in namespace ns (watches
        aside: one per controller, not per job)."""
        out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for raw in f:
                if ns.encode() not in raw:
                    continue
                ev = json.loads(raw)
                ref = ev.get("objectRef") or {}
                verb = ev.get("verb", "")
                if ref.get("namespace") != ns or verb == "watch":
                    continue
                who = client_of(ev.get("userAgent", ""))
                res = ref.get("resource", "") + (
                    "/" + ref["subresource"] if ref.get("subresource") else ""
                )
                c = out[who]
                c["requests"] += 1
                c["writes"] += verb in WRITES
                c[f"{verb} {res}"] += 1
        return {k: dict(v) for k, v in out.items()}


def per_job(counts: dict[str, dict[str, int]], n: int) -> dict[str, dict[str, float]]:
    return {
        who: {k: round(v / n, 2) for k, v in sorted(c.items()) if v / n >= 0.01}
        for who, c in sorted(counts.items())
    }


def controller_requests(setup: str, counts: dict[str, dict[str, int]]) -> tuple[int, int]:
    """(requests, writes) the controller under test made: graft's are its client's and Kopf's."""
    who = ("handwritten",) if setup == "handwritten" else ("graft", "kopf", "OpenAPI-Generator")
    return (
        sum(counts.get(w, {}).get("requests", 0) for w in who),
        sum(counts.get(w, {}).get("writes", 0) for w in who),
    )


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, proc_kb(self.pid, "VmRSS"))
            time.sleep(0.2)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


def run_burst(
    cp: AuditedControlPlane,
    api: client.ApiClient,
    kind: type[Setup],
    n: int,
    log_dir: Path,
    profile: bool,
    ns: str,
) -> dict[str, Any]:
    """One setup reconciling a burst of N new jobs in namespace ``ns`` (the same name for
    every setup: names feed the children's spec hashes); "objects" holds the first jobs'
    status and children, normalized."""
    namespace(api, ns, exact=True)
    setup = kind(cp, ns, log_dir)
    pid = setup.start()
    obs = Observer(api, ns, n)
    obs.start()
    time.sleep(2.0)  # watches and indexes settle; the controller idles from here
    profiler = Profiler(pid) if profile and kind.name == "graft" else None
    sampler = RssSampler(pid)
    sampler.start()
    rss_before = proc_kb(pid, "VmRSS")
    audit = Audit(cp)
    cpu0, cp0, m0 = proc_cpu_s(pid), control_plane_cpu_s(), machine_cpu()
    try:
        t0, created = create_all(api, ns, n)
        t_created = max(created.values())
        finished = obs.all_done.wait(timeout=max(120.0, n * 0.6))
        t_end = time.time()
        # the last job is done; what work is still queued (pod events, status echoes) counts too
        cpu1, cp1, m1 = proc_cpu_s(pid), control_plane_cpu_s(), machine_cpu()
        time.sleep(3.0)
        cpu_settled = proc_cpu_s(pid)
        if profiler:
            profiler.stop()
        rss_peak = sampler.stop()
        hwm, rss_end = proc_kb(pid, "VmHWM"), proc_kb(pid, "VmRSS")
        obs.stop()
        passes, errors = setup.passes()
    finally:
        setup.stop()
    counts = audit.count(ns)
    with obs.lock:
        acc_lat = [obs.accepted[k] - created[k] for k in obs.accepted if k in created]
        ready_lat = [
            max(obs.accepted[k], obs.pod[k]) - created[k]
            for k in created
            if k in obs.accepted and k in obs.pod
        ]
        done_times = [
            max(obs.accepted[k], obs.pod[k]) for k in created if k in obs.accepted and k in obs.pod
        ]
        n_acc, n_pod = len(obs.accepted), len(obs.pod)
        job_events, pod_events = obs.job_events, obs.pod_events
        refused = dict(list(obs.admitted_false.items())[:3])
    t_last = max(done_times) if finished and done_times else t_end
    wall = t_last - t0
    reqs, writes = controller_requests(kind.name, counts)
    res: dict[str, Any] = {
        "setup": kind.name,
        "namespace": ns,
        "n": n,
        "finished": finished,
        "accepted": n_acc,
        "with_pods": n_pod,
        "seconds": round(wall, 2),
        "create_seconds": round(t_created - t0, 2),
        "obj_per_s": round(n / wall, 1),
        "accepted_ms": {
            "p50": round(1000 * pct(acc_lat, 50)),
            "p99": round(1000 * pct(acc_lat, 99)),
        },
        "accepted_and_pod_ms": {
            "p50": round(1000 * pct(ready_lat, 50)),
            "p99": round(1000 * pct(ready_lat, 99)),
            "max": round(1000 * max(ready_lat, default=float("nan"))),
        },
        "cpu_ms_per_obj": round(1000 * (cpu1 - cpu0) / n, 2),
        "cpu_ms_per_obj_settled": round(1000 * (cpu_settled - cpu0) / n, 2),
        "cpu_share_of_one_core": round((cpu1 - cpu0) / max(t_end - t0, 1e-9), 2),
        "control_plane_cpu_ms_per_obj": {
            k: round(1000 * (cp1.get(k, 0.0) - cp0.get(k, 0.0)) / n, 2) for k in sorted(cp1)
        },
        "machine_cpu_busy_pct": round(100 * (m1[0] - m0[0]) / max(m1[1] - m0[1], 1.0), 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "rss_mb": {
            "idle_before": round(rss_before / 1024, 1),
            "peak_sampled": round(rss_peak / 1024, 1),
            "vmhwm": round(hwm / 1024, 1),
            "end": round(rss_end / 1024, 1),
        },
        "passes_per_obj": round(passes / n, 2),
        "pass_errors": errors,
        "requests_per_obj": round(reqs / n, 2),
        "writes_per_obj": round(writes / n, 2),
        "audit_per_obj_by_client": per_job(counts, n),
        "watch_events_per_obj": {
            "jobs": round(job_events / n, 2),
            "pods": round(pod_events / n, 2),
        },
        "profiled": profiler is not None,
    }
    res["objects"] = [normalized(cp, ns, f"j{i:05d}") for i in range(min(n, 3))]
    if refused:
        res["admitted_false_examples"] = refused
    if not finished:
        res["log_tail"] = setup.log()[-3000:]
    return res


_VOLATILE_META = (
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "namespace",
    "generation",
)


def normalized(cp: AuditedControlPlane, ns: str, name: str) -> dict[str, Any]:
    """The job's status and children as stored, minus what differs between any two
    namespaces (uids, versions, times, the namespace itself, generated token names)."""
    kinds = "serviceaccounts,roles,rolebindings,leases,networkpolicies,configmaps,services,pods"
    raw = cp.kubectl("get", kinds, "-n", ns, "-l", f"graft.dev/job={name}", "-o", "json").stdout
    out: dict[str, Any] = {}
    for obj in json.loads(raw)["items"]:
        meta = obj["metadata"]
        for k in _VOLATILE_META:
            meta.pop(k, None)
        for ref in meta.get("ownerReferences") or []:
            ref.pop("uid", None)
        for k in ("status", "secrets"):
            obj.pop(k, None)
        if obj["kind"] == "Pod":
            obj["spec"].pop("nodeName", None)
        out[f"{obj['kind']}/{meta['name']}"] = obj
    body = json.loads(cp.kubectl("get", "finetunejob", name, "-n", ns, "-o", "json").stdout)
    status = {k: v for k, v in (body.get("status") or {}).items() if k != "graft"}
    for c in status.get("conditions") or []:
        c.pop("lastTransitionTime", None)
    for k in ("startTime", "gpuHours", "cost"):
        status.pop(k, None)
    out["status"] = status
    text = json.dumps(out, sort_keys=True).replace(ns, "<ns>")
    out = json.loads(re.sub(r"-token-[a-z0-9]{5}", "-token-<x>", text))
    return out


def compare_objects(objects: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The first jobs' children and status under graft and under the hand-written controller."""
    if not {"graft", "handwritten"} <= set(objects):
        return {"checked": False}
    diffs: list[str] = []
    kinds: set[str] = set()
    for i, (a, b) in enumerate(zip(objects["graft"], objects["handwritten"], strict=True)):
        kinds |= {k.split("/")[0] for k in a}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"j{i:05d} {key}: graft {a.get(key)} vs handwritten {b.get(key)}")
    return {
        "checked": True,
        "jobs": len(objects["graft"]),
        "kinds": sorted(kinds),
        "identical": not diffs,
        "differences": [d[:1500] for d in diffs[:5]],
    }


def run_held(
    cp: AuditedControlPlane, api: client.ApiClient, kind: type[Setup], n: int, log_dir: Path
) -> dict[str, Any]:
    """N suspended jobs held; RSS per job; then a restart over them."""
    ns = namespace(api, f"held-{kind.name[:5]}")
    setup = kind(cp, ns, log_dir)
    try:
        pid = setup.start()
        obs = Observer(api, ns, n)
        obs.start()
        time.sleep(3.0)
        rss0 = proc_kb(pid, "VmRSS")
        t0 = time.time()
        create_all(api, ns, n, suspend=True)
        settled = obs.all_suspended.wait(timeout=max(300.0, n * 0.2))
        t_held = time.time() - t0
        time.sleep(5.0)
        rss1 = proc_kb(pid, "VmRSS")
        hwm1 = proc_kb(pid, "VmHWM")
        passes_first, _ = setup.passes()
        setup.stop()
        audit = Audit(cp)
        # the restart: a new process over N existing, settled jobs
        setup = kind(cp, ns, log_dir)
        t_start = time.time()
        pid = setup.start()
        t_up = time.time() - t_start
        deadline = time.time() + max(300.0, n * 0.1)
        passes = 0.0
        while time.time() < deadline:
            passes, _ = setup.passes()
            if passes >= n:
                break
            time.sleep(0.5)
        t_settle = time.time() - t_start
        cpu_settle = proc_cpu_s(pid)  # start-up included
        time.sleep(3.0)
        rss2 = proc_kb(pid, "VmRSS")
        obs.stop()
        counts = audit.count(ns)
        reqs, writes = controller_requests(kind.name, counts)
        return {
            "setup": kind.name,
            "n": n,
            "all_suspended": settled,
            "seconds_to_hold_all": round(t_held, 1),
            "rss_mb_idle": round(rss0 / 1024, 1),
            "rss_mb_held": round(rss1 / 1024, 1),
            "vmhwm_mb": round(hwm1 / 1024, 1),
            "kb_per_held_job": round((rss1 - rss0) / n, 2),
            "passes_per_job_first": round(passes_first / n, 2),
            "restart": {
                "seconds_to_healthy": round(t_up, 1),
                "seconds_to_settle": round(t_settle, 1),
                "cpu_seconds_to_settle": round(cpu_settle, 1),
                "passes": passes,
                "settled": passes >= n,
                "rss_mb": round(rss2 / 1024, 1),
                "requests": reqs,
                "writes": writes,
                "audit_by_client": counts,
            },
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        setup.stop()
        drop_namespace(api, ns)


def median_of(runs: list[dict[str, Any]], *path: str) -> float:
    vals = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v[p]
        vals.append(float(v))
    return round(statistics.median(vals), 2) if vals else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in SETUPS:
        rs = [r for r in runs if r["setup"] == name]
        if not rs:
            continue
        out[name] = {
            "obj_per_s": median_of(rs, "obj_per_s"),
            "p50_ms": median_of(rs, "accepted_and_pod_ms", "p50"),
            "p99_ms": median_of(rs, "accepted_and_pod_ms", "p99"),
            "cpu_ms_per_obj": median_of(rs, "cpu_ms_per_obj"),
            "peak_rss_mb": median_of(rs, "rss_mb", "peak_sampled"),
            "requests_per_obj": median_of(rs, "requests_per_obj"),
            "writes_per_obj": median_of(rs, "writes_per_obj"),
            "passes_per_obj": median_of(rs, "passes_per_obj"),
            "machine_cpu_busy_pct": median_of(rs, "machine_cpu_busy_pct"),
        }
    return out


def ratios(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each setup over the hand-written controller; the issue's goals for graft: throughput
    >= 1.2, CPU per job <= 1.0, p99 <= 1.0."""
    h = summary.get("handwritten")
    if not h:
        return {}
    keys = ("obj_per_s", "p99_ms", "cpu_ms_per_obj", "peak_rss_mb", "requests_per_obj")
    return {
        name: {k: round(g[k] / h[k], 2) for k in keys if h[k]}
        for name, g in summary.items()
        if name != "handwritten"
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="FineTuneJobs per burst (default 500)")
    ap.add_argument("--quick", action="store_true", help="N=200, one repeat")
    ap.add_argument("--repeat", type=int, default=2, help="bursts per setup (default 2)")
    ap.add_argument("--held", type=int, default=0, help="suspended jobs held (0: skip)")
    ap.add_argument("--setups", default="graft,handwritten", help="comma-separated")
    ap.add_argument("--no-burst", action="store_true", help="only the held mode")
    ap.add_argument(
        "--before",
        metavar="SRC",
        help="also run graft-operator from another checkout's operator/src (setup graft-before)",
    )
    ap.add_argument("--profile", action="store_true", help="run graft-operator under py-spy")
    ap.add_argument("--output", type=Path, default=RESULTS)
    a = ap.parse_args()
    n = 200 if a.quick else a.n
    repeat = 1 if a.quick else a.repeat
    kinds = [SETUPS[s] for s in a.setups.split(",")]
    if a.before:
        GraftBefore.src = str(Path(a.before).resolve())
        kinds.append(GraftBefore)
    state = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    t_start = time.time()
    runs: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    ceiling: dict[str, Any] = {}
    same: dict[str, Any] = {"checked": False}
    objects: dict[str, list[dict[str, Any]]] = {}
    load_before = [round(x, 2) for x in os.getloadavg()]
    cp = AuditedControlPlane(assets=find_assets(), state_dir=state / "cp")
    cp.start()
    try:
        cp.kubectl("apply", "-f", str(ROOT / "crds"))
        cp.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.graft.dev"
        )
        api = api_client(cp)
        kubelet = FakeKubelet(api)
        kubelet.add_a100_nodes(4)
        kubelet.add_cpu_nodes(2)
        if not a.no_burst:
            ceiling = run_ceiling(api, n)
            print(f"ceiling: {ceiling}", flush=True)
            for i in range(repeat):
                order = kinds if i % 2 == 0 else kinds[::-1]
                for kind in order:
                    burst_ns = f"burst-{i}"
                    r = run_burst(cp, api, kind, n, state / "logs", a.profile, burst_ns)
                    objects[kind.name] = objects.get(kind.name) or r.pop("objects")
                    r.pop("objects", None)
                    print(f"[{i + 1}/{repeat}] {kind.name}: {json.dumps(r)}", flush=True)
                    runs.append(r)
                    drop_namespace(api, r["namespace"])
            same = compare_objects(objects)
            print(f"objects: {json.dumps(same)}", flush=True)
        for kind in kinds if a.held else []:
            h = run_held(cp, api, kind, a.held, state / "logs")
            print(f"held {kind.name}: {json.dumps(h)}", flush=True)
            held.append(h)
    finally:
        cp.stop()
        shutil.rmtree(state, ignore_errors=True)

    summary = summarize(runs)
    out: dict[str, Any] = {
        "n": n,
        "concurrency": CONCURRENCY,
        "repeats": repeat,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "note": "shared 2-core machine; other workloads ran concurrently",
        },
        "ceiling": ceiling,
        "summary": summary,
        "ratios_to_handwritten": ratios(summary),
        "objects_identical": same,
        "held": held,
        "kopf_baselines_perf_facts": KOPF,
        "runs": runs,
        "wall_seconds": round(time.time() - t_start, 1),
    }
    if a.profile and PROFILE.exists():
        out["profile"] = summarize_profile()
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(out, indent=2) + "\n")

    if summary:
        print(f"\nN={n}, {CONCURRENCY} creates in flight, medians of {repeat} run(s) per setup")
        print(f"ceiling (client alone): {ceiling.get('obj_per_s')} obj/s")
        print(
            "| setup | jobs/s | Accepted+Pod p50 / p99 ms | CPU ms/job | peak RSS MB "
            "| requests (writes) per job | passes per job |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, s in summary.items():
            print(
                f"| {name} | {s['obj_per_s']} | {s['p50_ms']:.0f} / {s['p99_ms']:.0f} "
                f"| {s['cpu_ms_per_obj']} | {s['peak_rss_mb']} "
                f"| {s['requests_per_obj']} ({s['writes_per_obj']}) | {s['passes_per_obj']} |"
            )
        for name, r in out["ratios_to_handwritten"].items():
            print(f"ratios {name} / handwritten: {r}")
        print(f"objects identical: {same.get('identical')} ({same.get('kinds')})")
        busy = [r["machine_cpu_busy_pct"] for r in runs]
        print(f"machine busy {busy} %, load average before {load_before}")
    for h in held:
        r = h["restart"]
        print(
            f"held {h['setup']}: {h['n']} suspended jobs, RSS {h['rss_mb_idle']} -> "
            f"{h['rss_mb_held']} MB ({h['kb_per_held_job']} KB/job); restart settled in "
            f"{r['seconds_to_settle']} s ({r['cpu_seconds_to_settle']} CPU-s, {r['passes']} "
            f"passes), {r['writes']} writes, "
            f"RSS {r['rss_mb']} MB"
        )
    if "profile" in out:
        print("\nprofile, inclusive % of samples:")
        for f, p in out["profile"]["inclusive_pct"]:
            print(f"  {p:5.1f}  {f}")
    print(f"\nwrote {a.output}")


if __name__ == "__main__":
    main()
