"""Progress reporting: JSON lines, and the progress Lease (annotation + heartbeat) written
on a real apiserver, rate-limited and never failing training."""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from typing import Any

from kubernetes import client

from graft.runtime.train.progress import (
    ANNOTATION,
    Heartbeat,
    LeaseReporter,
    Reporter,
    format_eta,
    micro_time,
)
from graft.testing.cluster import wait_for


def test_json_lines_rate_limited() -> None:
    buf = io.StringIO()
    seen: list[dict[str, Any]] = []
    r = Reporter(enabled=True, interval=3600, stream=buf, on_progress=seen.append)
    r.emit(force=True, state="training", step=1)
    r.emit(step=2)  # within the interval: not printed
    r.emit(force=True, step=3)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["step"] for x in lines] == [1, 3] and seen[-1]["step"] == 3
    assert lines[0]["state"] == "training" and lines[0]["time"].endswith("Z")


def test_disabled_on_other_ranks() -> None:
    buf = io.StringIO()
    r = Reporter(enabled=False, interval=0, stream=buf)
    r.emit(force=True, step=1)
    assert buf.getvalue() == ""


def lease_api(k8s: client.ApiClient, namespace: str, name: str = "job-progress") -> Any:
    api = client.CoordinationV1Api(k8s)
    api.create_namespaced_lease(namespace, {"metadata": {"name": name}, "spec": {}})
    return api


def renew_time(api: Any, namespace: str, name: str = "job-progress") -> dt.datetime | None:
    lease = api.read_namespaced_lease(name, namespace)
    return lease.spec.renew_time  # type: ignore[no-any-return]


def test_heartbeat_needs_beats_only_inside_the_loop() -> None:
    hb = Heartbeat()
    alive, seen = hb.check(-1)
    assert alive
    assert hb.check(seen)[0]  # outside the loop: alive without beats
    with hb.loop():
        alive, seen = hb.check(seen)  # entering counts as progress
        assert alive
        alive, seen = hb.check(seen)
        assert not alive  # stuck: no step finished since the last check
        hb.beat()
        alive, seen = hb.check(seen)
        assert alive
        with hb.working():  # writing checkpoint files: local work, alive
            assert hb.check(seen)[0]
            assert hb.check(seen)[0]
        alive, seen = hb.check(seen)
        assert not hb.check(seen)[0]


def test_lease_carries_progress_and_heartbeat(k8s: client.ApiClient, namespace: str) -> None:
    """Against the real apiserver: renewTime advances while steps finish, stops while the
    loop is stuck, and the annotation holds the latest report."""
    api = lease_api(k8s, namespace)
    hb = Heartbeat()
    lease = LeaseReporter(
        "job-progress",
        namespace,
        "job-r0",
        heartbeat=hb,
        heartbeat_interval=0.2,
        progress_interval=0.3,
        api=api,
    )
    r = Reporter(enabled=True, interval=0, lease=lease, stdout=False)
    r.emit(force=True, state="training", step=1)
    wait_for("first renewal", lambda: renew_time(api, namespace) is not None, timeout=10)
    first = renew_time(api, namespace)
    wait_for("renewal", lambda: renew_time(api, namespace) != first, timeout=10)
    obj = api.read_namespaced_lease("job-progress", namespace)
    assert obj.spec.holder_identity == "job-r0"
    assert json.loads(obj.metadata.annotations[ANNOTATION])["step"] == 1
    with hb.loop():
        for _ in range(4):  # steps finish: the Lease keeps being renewed
            hb.beat()
            time.sleep(0.25)
        before = renew_time(api, namespace)
        assert before is not None and before > first
        time.sleep(1.0)  # a check or two may still see the last beat
        stuck = renew_time(api, namespace)
        time.sleep(1.2)  # stuck in a collective: no beat, no renewal
        assert renew_time(api, namespace) == stuck
        r.emit(force=True, step=7)  # a report is progress too
        wait_for(
            "renewal after a step",
            lambda: (renew_time(api, namespace) or stuck) > stuck,  # type: ignore[operator]
            timeout=10,
        )
    for i in range(40):
        r.emit(force=True, step=100 + i)
    r.emit(force=True, state="succeeded", step=200)
    r.close()
    obj = api.read_namespaced_lease("job-progress", namespace)
    last = json.loads(obj.metadata.annotations[ANNOTATION])
    assert last["state"] == "succeeded" and last["step"] == 200
    assert lease.writes < 30, lease.writes  # reports coalesced, not one write each


def test_api_failures_never_slow_training(k8s: client.ApiClient, namespace: str) -> None:
    """The Lease does not exist (404 on every write): reports return at once, close is
    bounded, nothing raises."""
    lease = LeaseReporter(
        "missing",
        namespace,
        "job-r0",
        heartbeat=Heartbeat(),
        heartbeat_interval=0.05,
        progress_interval=0.0,
        api=client.CoordinationV1Api(k8s),
    )
    r = Reporter(enabled=True, interval=0, lease=lease, stdout=False)
    t0 = time.monotonic()
    for i in range(200):
        r.emit(force=True, step=i)
    assert time.monotonic() - t0 < 1.0
    time.sleep(0.5)
    t1 = time.monotonic()
    r.close()
    assert time.monotonic() - t1 < 6
    assert lease.writes == 0 and lease._failures > 0


def test_eta_format() -> None:
    assert format_eta(750) == "12m30s"
    assert format_eta(4000) == "1h06m"
    assert format_eta(None) is None


def test_micro_time_is_what_the_apiserver_wants() -> None:
    t = dt.datetime(2026, 12, 1, 3, 4, 5, 67, tzinfo=dt.UTC)
    assert micro_time(t) == "2026-12-01T03:04:05.000067Z"


def test_two_process_training_reports_to_the_lease(
    k8s: client.ApiClient, namespace: str, control_plane: Any, tmp_path: Any, quiet_env: None
) -> None:
    """A real 2-rank gloo run with checkpoints writes its reports and heartbeat to the
    Lease (credentials from KUBECONFIG, as under the process kubelet) and finishes."""
    import os
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from trainkit import make_job

    from graft.runtime.train import launch_local
    from graft.testing.corpus import instruction_records, write_jsonl
    from graft.testing.tiny_model import build_tiny_model

    api = lease_api(k8s, namespace, "t-progress")
    assets = {
        "base": build_tiny_model(tmp_path / "base", seed=0),
        "alpaca": write_jsonl(tmp_path / "a.jsonl", instruction_records(160, seed=12)),
    }
    job = make_job(assets, tmp_path, max_steps=12, every=5, gbs=16, mbs=8)
    env = dict(os.environ)
    env.update(
        GRAFT_PROGRESS_LEASE="t-progress",
        POD_NAMESPACE=namespace,
        POD_NAME="t-a1-r0",
        KUBECONFIG=str(control_plane.kubeconfig),
        GRAFT_PROGRESS_INTERVAL="0.5",
        GRAFT_ANNOTATION_INTERVAL="0.5",
        GRAFT_HEARTBEAT_INTERVAL_SECONDS="0.5",
    )
    res = launch_local(job, nproc=2, workdir=tmp_path / "run", env=env)
    assert res.exit_code == 0, res.termination
    obj = api.read_namespaced_lease("t-progress", namespace)
    last = json.loads(obj.metadata.annotations[ANNOTATION])
    assert last["state"] == "succeeded" and last["attempt"] == 1
    assert last["lastCheckpoint"]["step"] == 12
    assert obj.spec.holder_identity == "t-a1-r0" and obj.spec.renew_time is not None
