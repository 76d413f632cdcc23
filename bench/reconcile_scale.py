"""Operator at scale: N FineTuneJobs on a real control plane, created 16 at a time.

Per repeat, starts a fresh etcd + kube-apiserver + controller-manager + scheduler on 127.0.0.1
(the CRDs from crds/, four fake A100 nodes and two CPU nodes), then:

1. **ceiling**: the same client creates N FineTuneJobs in a namespace no operator watches
   (what the client and the apiserver manage alone, as in ../shared/PERF-FACTS.md);
2. **operator**: the real ``graft-operator`` process, told to watch one fresh namespace,
   while the client creates N 1-node x 8-GPU jobs there. Done when every job has
   ``Accepted=True`` and its Pod exists. The Pods mostly stay Pending (4 A100 nodes, claims
   that do not exist): scheduling is not what is measured.

Measured on the client side from two watches (FineTuneJobs and the jobs' Pods) opened before
the first create: per-job latency from the create call's return to the first watch event
showing ``Accepted=True`` (and to the later of that and the first Pod); throughput N / (last
job done - first create sent). On the operator: CPU seconds (utime+stime from /proc/<pid>/stat)
per job, peak RSS (VmRSS sampled every 0.2 s, and VmHWM), reconcile passes per job (its own
metrics), the apiserver's request counters per job (all clients: the operator, the
scheduler, the controller-manager and this bench), the control plane's CPU per job and how busy
the whole machine was.

    .venv/bin/python bench/reconcile_scale.py [--n 1000] [--quick] [--repeat 2] [--profile]

``--quick`` is N=200. ``--profile`` attaches ``py-spy record`` to the operator (its timings are
then not comparable), keeps the collapsed stacks in $TMPDIR/reconcile_scale-profile.txt and adds
the heaviest functions to the JSON. Prints a table and writes
bench/results/reconcile_scale.json. The machine is shared: repeat, and read ratios rather
than absolute times.
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
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client, config
from kubernetes.watch.watch import iter_resp_lines

from graft.testing.cluster import FakeKubelet
from graft.testing.controlplane import ControlPlane, start_control_plane
from graft.testing.operator import OperatorProcess

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "reconcile_scale.json"
PROFILE = Path(tempfile.gettempdir()) / "reconcile_scale-profile.txt"
GROUP, VERSION, PLURAL = "graft.dev", "v1alpha1", "finetunejobs"
CONCURRENCY = 16
KOPF = {  # ../shared/PERF-FACTS.md, N=1000, same kind of machine
    "ceiling obj/s": 262,
    "Kopf default obj/s": 116,
    "Kopf status-storage obj/s": 160,
    "Kopf p99 ms": "2947-3830",
    "Kopf CPU ms/obj": "2.9-4.1",
    "Kopf peak RSS MB": "136-146",
}


def api_client(cp: ControlPlane) -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(cp.kubeconfig), client_configuration=cfg)  # type: ignore[no-untyped-call]
    cfg.connection_pool_maxsize = CONCURRENCY * 2
    return client.ApiClient(cfg)


def job(name: str) -> dict[str, Any]:
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
        },
    }


def create_all(api: client.ApiClient, ns: str, n: int) -> tuple[float, dict[str, float]]:
    """Create n jobs, CONCURRENCY in flight; (time the first was sent, name -> returned)."""
    custom = client.CustomObjectsApi(api)
    done: dict[str, float] = {}

    def one(i: int) -> None:
        name = f"j{i:05d}"
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job(name))
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
        self.admitted_false: dict[str, str] = {}
        self.pod: dict[str, float] = {}
        self.job_events = 0
        self.pod_events = 0
        self.all_done = threading.Event()
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

    def _job(self, t: float, type_: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        with self.lock:
            self.job_events += 1
            if name in self.accepted:
                return
            for c in (obj.get("status") or {}).get("conditions") or []:
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


def apiserver_requests(cp: ControlPlane) -> collections.Counter[str]:
    """apiserver_request_total summed by verb, resource and subresource.

    The 1.20 apiserver counts a GET of one custom resource as LIST: "LIST finetunejobs" here
    is the operator's per-pass GET (the bench only watches).
    """
    out: collections.Counter[str] = collections.Counter()
    text = cp.kubectl("get", "--raw", "/metrics").stdout
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        val = float(line.rsplit(" ", 1)[1])
        if labels.get("verb") in ("WATCH", "CONNECT"):
            continue
        res = labels.get("resource", "")
        if labels.get("subresource"):
            res += "/" + labels["subresource"]
        out[f"{labels.get('verb')} {res}"] += val
    return out


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


def namespace(api: client.ApiClient, prefix: str) -> str:
    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})  # type: ignore[arg-type]
    return ns


def drop_namespace(api: client.ApiClient, ns: str) -> None:
    """Jobs and pods at once (no kubelet confirms a graceful deletion), then the namespace."""
    custom = client.CustomObjectsApi(api)
    custom.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
    core = client.CoreV1Api(api)
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


def run_operator(
    cp: ControlPlane, api: client.ApiClient, n: int, log_dir: Path, profile: bool
) -> dict[str, Any]:
    ns = namespace(api, "scale")
    op = OperatorProcess(cp, log_dir, extra_env={"GRAFT_WATCH_NAMESPACES": ns})
    op.start()
    assert op.proc is not None
    pid = op.proc.pid
    obs = Observer(api, ns, n)
    obs.start()
    time.sleep(2.0)  # Kopf's watches and indexes settle; the operator idles from here
    profiler = Profiler(pid) if profile else None
    rss_peak = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            rss_peak[0] = max(rss_peak[0], proc_kb(pid, "VmRSS"))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rss_before = proc_kb(pid, "VmRSS")
    req0 = apiserver_requests(cp)
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
        req1 = apiserver_requests(cp)
        if profiler:
            profiler.stop()
        sampling.set()
        sampler.join()
        hwm = proc_kb(pid, "VmHWM")
        rss_end = proc_kb(pid, "VmRSS")
        obs.stop()
        m = op.metrics()
        passes = sum(
            float(x)
            for x in re.findall(
                r'^graft_reconciles_total\{kind="FineTuneJob",result="ok"\} (\S+)', m, re.M
            )
        )
        errors = sum(
            float(x)
            for x in re.findall(
                r'^graft_reconciles_total\{kind="FineTuneJob",result="error"\} (\S+)', m, re.M
            )
        )
    finally:
        op.stop()
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
    reqs = {
        k: round((req1[k] - req0.get(k, 0)) / n, 2)
        for k in sorted(req1)
        if (req1[k] - req0.get(k, 0)) / n >= 0.05
    }
    res = {
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
            "max": round(1000 * max(acc_lat, default=float("nan"))),
        },
        "accepted_and_pod_ms": {
            "p50": round(1000 * pct(ready_lat, 50)),
            "p99": round(1000 * pct(ready_lat, 99)),
            "max": round(1000 * max(ready_lat, default=float("nan"))),
        },
        "operator_cpu_ms_per_obj": round(1000 * (cpu1 - cpu0) / n, 2),
        "operator_cpu_ms_per_obj_settled": round(1000 * (cpu_settled - cpu0) / n, 2),
        "operator_cpu_share_of_one_core": round((cpu1 - cpu0) / max(t_end - t0, 1e-9), 2),
        "control_plane_cpu_ms_per_obj": {
            k: round(1000 * (cp1.get(k, 0.0) - cp0.get(k, 0.0)) / n, 2) for k in sorted(cp1)
        },
        "machine_cpu_busy_pct": round(100 * (m1[0] - m0[0]) / max(m1[1] - m0[1], 1.0), 1),
        "operator_rss_mb": {
            "idle_before": round(rss_before / 1024, 1),
            "peak_sampled": round(rss_peak[0] / 1024, 1),
            "vmhwm": round(hwm / 1024, 1),
            "end": round(rss_end / 1024, 1),
        },
        "reconcile_passes_per_obj": round(passes / n, 2),
        "reconcile_errors": errors,
        "watch_events_per_obj": {
            "jobs": round(job_events / n, 2),
            "pods": round(pod_events / n, 2),
        },
        "apiserver_requests_per_obj": reqs,
        "profiled": profile,
    }
    if refused:
        res["admitted_false_examples"] = refused
    if not finished:
        res["operator_log_tail"] = op.log()[-3000:]
    return res


def median_of(runs: list[dict[str, Any]], *path: str) -> float:
    vals = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v[p]
        vals.append(float(v))
    return round(statistics.median(vals), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="FineTuneJobs per run (default 1000)")
    ap.add_argument("--quick", action="store_true", help="N=200")
    ap.add_argument("--repeat", type=int, default=1, help="ceiling + operator runs (default 1)")
    ap.add_argument("--profile", action="store_true", help="run the operator under py-spy")
    ap.add_argument("--output", type=Path, default=RESULTS)
    a = ap.parse_args()
    n = 200 if a.quick else a.n
    state = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    t_start = time.time()
    runs: list[dict[str, Any]] = []
    try:
        for i in range(a.repeat):
            # a fresh control plane per repeat: the previous run's garbage collection (3,000
            # children) would otherwise still be going on
            cp = start_control_plane(state / f"cp{i}")
            try:
                cp.kubectl("apply", "-f", str(ROOT / "crds"))
                cp.kubectl(
                    "wait",
                    "--for=condition=Established",
                    "--timeout=60s",
                    "crd/finetunejobs.graft.dev",
                )
                api = api_client(cp)
                kubelet = FakeKubelet(api)
                kubelet.add_a100_nodes(4)
                kubelet.add_cpu_nodes(2)
                ceiling = run_ceiling(api, n)
                print(f"[{i + 1}/{a.repeat}] ceiling: {ceiling}", flush=True)
                op = run_operator(cp, api, n, state / "operator", a.profile)
                print(f"[{i + 1}/{a.repeat}] operator: {json.dumps(op)}", flush=True)
                runs.append({"ceiling": ceiling, "operator": op})
            finally:
                cp.stop()
    finally:
        shutil.rmtree(state, ignore_errors=True)

    ops = [r["operator"] for r in runs]
    summary = {
        "ceiling_obj_per_s": median_of(runs, "ceiling", "obj_per_s"),
        "operator_obj_per_s": median_of(ops, "obj_per_s"),
        "ratio_to_ceiling": round(
            median_of(ops, "obj_per_s") / median_of(runs, "ceiling", "obj_per_s"), 2
        ),
        "accepted_p50_ms": median_of(ops, "accepted_ms", "p50"),
        "accepted_p99_ms": median_of(ops, "accepted_ms", "p99"),
        "accepted_and_pod_p99_ms": median_of(ops, "accepted_and_pod_ms", "p99"),
        "operator_cpu_ms_per_obj": median_of(ops, "operator_cpu_ms_per_obj"),
        "operator_peak_rss_mb": median_of(ops, "operator_rss_mb", "peak_sampled"),
        "reconcile_passes_per_obj": median_of(ops, "reconcile_passes_per_obj"),
        "operator_cpu_share_of_one_core": median_of(ops, "operator_cpu_share_of_one_core"),
        "machine_cpu_busy_pct": median_of(ops, "machine_cpu_busy_pct"),
    }
    out: dict[str, Any] = {
        "n": n,
        "concurrency": CONCURRENCY,
        "repeats": a.repeat,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "note": "shared 2-core machine; other workloads ran concurrently",
        },
        "summary": summary,
        "kopf_baselines_perf_facts": KOPF,
        "runs": runs,
        "wall_seconds": round(time.time() - t_start, 1),
    }
    if a.profile and PROFILE.exists():
        out["profile"] = summarize_profile()
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(out, indent=2) + "\n")

    rows = [
        ("client alone, no operator (ceiling)", f"{summary['ceiling_obj_per_s']}", "-", "-", "-"),
        (
            "graft-operator (Kopf 1.45.2, status storage)",
            f"{summary['operator_obj_per_s']}",
            f"{summary['accepted_p50_ms']:.0f} / {summary['accepted_p99_ms']:.0f}",
            f"{summary['operator_cpu_ms_per_obj']}",
            f"{summary['operator_peak_rss_mb']}",
        ),
    ]
    print(f"\nN={n}, {CONCURRENCY} creates in flight, medians of {a.repeat} run(s)")
    print("| setup | obj/s | Accepted p50 / p99 ms | operator CPU ms/obj | peak RSS MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(
        f"ratio to ceiling {summary['ratio_to_ceiling']}; "
        f"Accepted+Pod p99 {summary['accepted_and_pod_p99_ms']:.0f} ms; "
        f"{summary['reconcile_passes_per_obj']} reconcile passes per job; operator used "
        f"{summary['operator_cpu_share_of_one_core']} of a core, the machine was "
        f"{summary['machine_cpu_busy_pct']}% busy"
    )
    print("PERF-FACTS (Kopf, N=1000): ceiling 262, default 116 / status storage 160 obj/s,")
    print("p99 2947-3830 ms, CPU 2.9-4.1 ms/obj, peak RSS 136-146 MB")
    if "profile" in out:
        print("\nprofile, inclusive % of samples:")
        for f, p in out["profile"]["inclusive_pct"]:
            print(f"  {p:5.1f}  {f}")
    print(f"\nwrote {a.output}")


if __name__ == "__main__":
    main()
