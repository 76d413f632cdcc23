"""The process kubelet itself, with plain Pods (no operator involved): what a container sees,
how exits, deletions and a node's death are reported. Seconds, not minutes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from graft.testing.cluster import CPU_LABELS, FakeKubelet, wait_for
from graft.testing.process_kubelet import ProcessKubelet

SCRIPT = """
import json, os, pathlib, signal, sys, time
env = {k: os.environ.get(k) for k in sys.argv[1].split(",")}
print(json.dumps(env), flush=True)
pathlib.Path(os.environ["OUT"], os.environ["POD_NAME"]).write_text(
    pathlib.Path(os.environ["CONFIG"]).read_text())
mode = sys.argv[2]
if mode == "fail":
    pathlib.Path(os.environ["TERM_LOG"]).write_text('{"reason": "Broken"}')
    sys.exit(3)
if mode == "sleep":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(20))
    time.sleep(600)
"""


@pytest.fixture
def ns(k8s: client.ApiClient, fake_nodes: FakeKubelet) -> Iterator[str]:
    name = f"pk-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(k8s)
    core.create_namespace({"metadata": {"name": name}})  # type: ignore[arg-type]
    # A Pod created before the token controller gives the namespace's default
    # ServiceAccount its token is refused (500 "No API token found"): wait for the token.

    def default_token() -> bool:
        try:
            return bool(core.read_namespaced_service_account("default", name).secrets)
        except client.ApiException:
            return False

    wait_for(f"the default ServiceAccount's token in {name}", default_token, timeout=60)
    fake_nodes.add_bound_claim(name, "shared")
    core.create_namespaced_config_map(
        name,
        {"metadata": {"name": "cfg"}, "data": {"job.json": '{"hello": 1}'}},  # type: ignore[arg-type]
    )
    yield name
    fake_nodes.force_delete_pods(name)
    core.delete_namespace(name)


@pytest.fixture
def node(fake_nodes: FakeKubelet, process_kubelet: ProcessKubelet) -> Iterator[str]:
    name = f"cpu-pk-{uuid.uuid4().hex[:5]}"
    fake_nodes.add_node(name, labels=CPU_LABELS, cpu="16", memory="64Gi")
    process_kubelet.manage(name)
    yield name
    fake_nodes.delete_node(name)


def pod(name: str, node: str, mode: str, grace: int = 5) -> dict[str, Any]:
    keys = "POD_NAME,POD_NAMESPACE,NODE,CONFIG,OUT,MASTER_ADDR,MASTER_PORT,PLAIN,KUBECONFIG"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"graft.dev/attempt": "1"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": grace,
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11",
                    "command": ["python", "-c", SCRIPT, keys, mode],
                    "env": [
                        {"name": "PLAIN", "value": "x"},
                        {"name": "CONFIG", "value": "/etc/cfg/job.json"},
                        {"name": "OUT", "value": "/mnt/pvc/shared"},
                        {"name": "TERM_LOG", "value": "/dev/termination-log"},
                        {"name": "MASTER_ADDR", "value": "job-r0.job-gang.ns.svc"},
                        {"name": "MASTER_PORT", "value": "29500"},
                        {
                            "name": "POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        },
                        {
                            "name": "POD_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    ],
                    "volumeMounts": [
                        {"name": "cfg", "mountPath": "/etc/cfg"},
                        {"name": "shared", "mountPath": "/mnt/pvc/shared"},
                    ],
                    "terminationMessagePath": "/dev/termination-log",
                }
            ],
            "volumes": [
                {"name": "cfg", "configMap": {"name": "cfg"}},
                {"name": "shared", "persistentVolumeClaim": {"claimName": "shared"}},
            ],
        },
    }


def phase(core: client.CoreV1Api, ns: str, name: str) -> str | None:
    try:
        p = core.read_namespaced_pod(name, ns)
    except client.ApiException as e:
        if e.status == 404:
            return "Gone"
        raise
    return p.status.phase if p.status else None


def test_pod_runs_with_its_env_volumes_and_reports_exits(
    k8s: client.ApiClient, process_kubelet: ProcessKubelet, ns: str, node: str
) -> None:
    core = client.CoreV1Api(k8s)
    core.create_namespaced_pod(ns, pod("ok", node, "exit"))  # type: ignore[arg-type]
    core.create_namespaced_pod(ns, pod("bad", node, "fail"))  # type: ignore[arg-type]
    wait_for("ok Succeeded", lambda: phase(core, ns, "ok") == "Succeeded", timeout=60)
    wait_for("bad Failed", lambda: phase(core, ns, "bad") == "Failed", timeout=60)

    run = process_kubelet.run_of(ns, "ok")
    assert run is not None
    (seen,) = run.json_lines("stdout")
    claim = process_kubelet.claim_dir(ns, "shared")
    assert seen["POD_NAME"] == "ok" and seen["POD_NAMESPACE"] == ns and seen["NODE"] == node
    assert seen["PLAIN"] == "x"
    assert seen["OUT"] == str(claim)
    assert seen["MASTER_ADDR"] == "127.0.0.1" and seen["MASTER_PORT"] != "29500"
    assert seen["KUBECONFIG"]
    assert json.loads((claim / "ok").read_text()) == {"hello": 1}  # the ConfigMap, mounted
    other = process_kubelet.run_of(ns, "bad")
    assert other is not None
    assert other.env["MASTER_PORT"] == seen["MASTER_PORT"], "one port per gang"

    ok = core.read_namespaced_pod("ok", ns)
    assert ok.status.start_time is not None
    term = ok.status.container_statuses[0].state.terminated
    assert term.exit_code == 0 and term.reason == "Completed"
    bad = core.read_namespaced_pod("bad", ns).status.container_statuses[0].state.terminated
    assert bad.exit_code == 3 and json.loads(bad.message) == {"reason": "Broken"}


def test_deletion_is_sigterm_then_confirmed_and_node_death_kills(
    k8s: client.ApiClient, process_kubelet: ProcessKubelet, ns: str, node: str
) -> None:
    core = client.CoreV1Api(k8s)
    core.create_namespaced_pod(ns, pod("sleeper", node, "sleep"))  # type: ignore[arg-type]
    core.create_namespaced_pod(ns, pod("victim", node, "sleep"))  # type: ignore[arg-type]
    wait_for(
        "both running",
        lambda: all(phase(core, ns, n) == "Running" for n in ("sleeper", "victim")),
        timeout=60,
    )
    t0 = time.monotonic()
    core.delete_namespaced_pod("sleeper", ns)  # default grace: SIGTERM, exit 20, confirmed
    wait_for("sleeper gone", lambda: phase(core, ns, "sleeper") == "Gone", timeout=30)
    assert time.monotonic() - t0 < 5, "the process handled SIGTERM; no wait for the grace"
    run = process_kubelet.run_of(ns, "sleeper")
    assert run is not None and run.exit_code == 20

    victim = process_kubelet.run_of(ns, "victim")
    assert victim is not None and victim.proc is not None
    killed = process_kubelet.take_node_down(node)
    assert [r.name for r in killed] == ["victim"]
    assert victim.proc.poll() is not None and victim.exit_code == 137
    n = core.read_node(node)
    ready = next(c for c in n.status.conditions if c.type == "Ready")
    assert ready.status != "True"
    time.sleep(1)  # a dead node reports nothing: the Pod still looks Running
    assert phase(core, ns, "victim") == "Running"
