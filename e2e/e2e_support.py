"""What the e2e conftest and tests share: the install's values, and the fakes of what
cannot run here (KubeRay's operator) beside a real local Ray Serve.

A module of its own, not conftest.py, so that tests import it by a unique name.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from graft.testing.cluster import A100_LABELS, wait_for
from graft.testing.controlplane import ControlPlane, free_port
from graft.testing.fake_kuberay import rayservice_status
from graft.testing.process_kubelet import kill_tree

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
RELEASE = "graft"
RELEASE_NAMESPACE = "graft-system"

#: One "GPU" per node: each rank is one local CPU process (GRAFT_NPROC_PER_NODE=1).
E2E_POOL: dict[str, Any] = {
    "name": "a100-e2e",
    "nodeSelector": {"nvidia.com/gpu.product": A100_LABELS["nvidia.com/gpu.product"]},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "gpuResource": "nvidia.com/gpu",
    "gpusPerNode": 1,
    "gpuMemoryGiB": 80,
    "pricePerGpuHour": 1.8,
    "maxNodes": 3,
}

#: Helm values of the e2e install; everything else is the chart's default.
CHART_VALUES: dict[str, Any] = {
    "config": {
        "nodePools": [E2E_POOL],
        # the minimum the chart allows: a SIGTERMed tiny trainer needs well under a second
        "terminationGraceSeconds": 10,
        "gangPendingTimeoutSeconds": 60,
        "logFormat": "json",
        "logLevel": "INFO",
    },
}

#: What every process the kubelet starts gets on top of its Pod's environment: one
#: intra-op thread per process on a shared 2-core machine, and progress every second
#: (the trainer's defaults, 5 s lines and 10 s Pod patches, suit real runs of hours).
POD_EXTRA_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GRAFT_PROGRESS_INTERVAL": "1",
    "GRAFT_ANNOTATION_INTERVAL": "1",
    "PYTHONUNBUFFERED": "1",
}


class FakeKubeRayOperator:
    """A fake of KubeRay's Go operator: for a RayService it brings up a local "Ray cluster"
    (``ray_serve_host.py``, one process) that applies the RayService's ``serveConfigV2`` as
    KubeRay's call to the head's dashboard would, and writes the RayService status KubeRay
    would write from what Serve reports.

    Paths: ``pvc://`` URIs in the config resolve under ``GRAFT_PVC_ROOT`` of the Ray
    processes (the claims' local directories, as the Ray pods mount them at /mnt/pvc); each
    "GPU" is a CPU here, so ``num_gpus`` becomes 0, as for training.
    """

    def __init__(self, k8s: client.ApiClient, ns: str, workdir: Path, pvc_root: Path) -> None:
        self.custom = client.CustomObjectsApi(k8s)
        self.ns = ns
        self.workdir = workdir
        self.pvc_root = pvc_root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.status_path = workdir / "serve-status.json"
        self.log_path = workdir / "ray-serve-host.log"

    def get(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            "ray.io", "v1", self.ns, "rayservices", name
        )
        return obj

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def serve_status(self) -> dict[str, Any]:
        try:
            out: dict[str, Any] = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}
        return out

    def _start(self, config: dict[str, Any]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "serveConfigV2.yaml"
        config_path.write_text(yaml.safe_dump(config))
        env = {
            **os.environ,
            "GRAFT_PVC_ROOT": str(self.pvc_root),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("ray_serve_host.py")),
                str(config_path),
                str(self.port),
                str(self.status_path),
            ],
            env=env,
            stdout=open(self.log_path, "wb"),  # noqa: SIM115 - lives as long as the process
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def reconcile(self, name: str, timeout: float = 240) -> dict[str, Any]:
        """Bring the RayService's Serve config up and write its status; returns the status."""
        rs = self.get(name)
        config = yaml.safe_load(rs["spec"]["serveConfigV2"])
        for app in config["applications"]:
            for dep in app.get("deployments") or []:
                opts = dep.get("ray_actor_options") or {}
                if opts.get("num_gpus"):
                    opts["num_gpus"] = 0
        self._start(config)
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        apps: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the Ray serve host exited {self.proc.returncode}:\n{self.log()}"
                )
            apps = self.serve_status().get("applications") or {}
            if any(a["status"] == "DEPLOY_FAILED" for a in apps.values()):
                raise AssertionError(f"serve deploy failed: {apps}")
            if apps and all(a["status"] == "RUNNING" for a in apps.values()):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"serve apps not RUNNING after {timeout}s: {apps}\n{self.log()}")
        return self.write_status(rs, apps)

    def write_status(self, rs: dict[str, Any], apps: dict[str, Any]) -> dict[str, Any]:
        name = rs["metadata"]["name"]
        status = rayservice_status(rs, apps, f"{name}-{uuid.uuid4().hex[:5]}")
        self.custom.patch_namespaced_custom_object_status(
            "ray.io", "v1", self.ns, "rayservices", name, {"status": status}
        )
        return status

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        # Ray's own processes (raylet, GCS, workers) go with the "cluster"
        kill_tree(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def install_kuberay_crds(cp: ControlPlane, out: Path) -> None:
    """KubeRay's CRDs, made installable on the 1.20 test apiserver by the shared script
    (test use only; never copied into the repository)."""
    src = SHARED / "thirdparty" / "kuberay"
    subprocess.run(
        [
            sys.executable,
            str(SHARED / "envtest" / "downlevel_crd.py"),
            str(out),
            *map(str, sorted(src.glob("ray.io_*.yaml"))),
        ],
        check=True,
    )
    for f in sorted(out.glob("*.yaml")):
        # too big for client-side apply's last-applied annotation
        r = cp.kubectl("create", "-f", str(f), check=False)
        assert r.returncode == 0 or "AlreadyExists" in r.stderr, r.stderr
    # kubectl wait fails outright when the CRD has no status yet: ask again
    wait_for(
        "the RayService CRD established",
        lambda: (
            cp.kubectl(
                "wait",
                "--for=condition=Established",
                "--timeout=10s",
                "crd/rayservices.ray.io",
                check=False,
            ).returncode
            == 0
        ),
        timeout=60,
    )
