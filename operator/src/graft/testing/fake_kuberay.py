"""Fake KubeRay: what KubeRay's Go operator does for a RayService, done by the test harness.

KubeRay's operator cannot run here (it is a Go binary from an image registry). Two fakes
stand in for it, each named for what it is:

- ``rayservice_status`` writes the RayService status KubeRay writes from what Serve
  reports; both fakes use it.
- ``FakeKubeRayOnKubelets`` (the real-kubelet tier, e2e/containers) makes the Ray cluster
  of a RayService as Kubernetes objects: the head and worker Pods KubeRay assembles
  (``kuberay_pods``), with KubeRay's ``ray start`` commands and token-authentication
  environment, the head Service and the Serve Service; real kubelets run those Pods from
  the server image. It then deploys ``serveConfigV2`` through the head's dashboard as
  KubeRay does, and writes the status.

What this fake leaves out, and why: the autoscaler sidecar (``ray kuberay-autoscaler``
scales a RayCluster object, which only KubeRay's operator creates and reconciles), the
RayCluster object itself, KubeRay's probes (the fake reads Serve's status directly), and
zero-downtime upgrades (it makes one cluster per call).
"""

from __future__ import annotations

import base64
import copy
import json
import math
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import yaml
from kubernetes import client

from graft.api.common import quantity
from graft.testing.kuberay_pods import kuberay_pods

GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, SERVE_PORT, METRICS_PORT = 6379, 8265, 10001, 8000, 8080
#: The label KubeRay puts on pods whose Serve proxy is healthy; the Serve Service selects it.
SERVE_LABEL = "ray.io/serve"


def rayservice_status(
    rs: dict[str, Any], apps: dict[str, Any], cluster_name: str
) -> dict[str, Any]:
    """The status KubeRay writes on a RayService whose Serve ``apps`` (by name, as the
    dashboard's ``/api/serve/applications/`` lists them, or as e2e's ray_serve_host.py
    reports them) run on the Ray cluster ``cluster_name``."""
    generation = rs["metadata"].get("generation", 1)
    workers = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    desired = sum(int(w.get("replicas") or 0) for w in workers)
    running = sum(_running(d) for a in apps.values() for d in a["deployments"].values())
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "serviceStatus": "Running",
        "numServeEndpoints": 1,
        "observedGeneration": generation,
        "lastUpdateTime": now,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "NonZeroServeEndpoints",
                "message": "Number of serve endpoints is greater than 0",
                "lastTransitionTime": now,
                "observedGeneration": generation,
            },
            {
                "type": "UpgradeInProgress",
                "status": "False",
                "reason": "NoPendingCluster",
                "message": "Active Ray cluster exists and no pending Ray cluster",
                "lastTransitionTime": now,
                "observedGeneration": generation,
            },
        ],
        "activeServiceStatus": {
            "rayClusterName": cluster_name,
            "applicationStatuses": {
                app_name: {
                    "status": a["status"],
                    **_message(a),
                    "serveDeploymentStatuses": {
                        dep_name: {"status": d["status"], **_message(d)}
                        for dep_name, d in a["deployments"].items()
                    },
                }
                for app_name, a in apps.items()
            },
            "rayClusterStatus": {
                "state": "ready",
                "desiredWorkerReplicas": desired,
                "readyWorkerReplicas": running,
                "availableWorkerReplicas": running,
                "minWorkerReplicas": sum(int(w.get("minReplicas") or 0) for w in workers),
                "maxWorkerReplicas": sum(int(w.get("maxReplicas") or 0) for w in workers),
                "head": {"serviceName": f"{cluster_name}-head-svc"},
                "lastUpdateTime": now,
            },
        },
    }


def _running(deployment: dict[str, Any]) -> int:
    # ray_serve_host.py reports Serve's counts by state; the dashboard lists the replicas
    if "replicaStates" in deployment:
        return int(deployment["replicaStates"].get("RUNNING", 0))
    return sum(1 for r in deployment.get("replicas") or [] if r.get("state") == "RUNNING")


def _message(status: dict[str, Any]) -> dict[str, str]:
    # KubeRay omits an empty message (omitempty); the 1.20 test apiserver would also turn an
    # empty string inside this map into null and refuse it.
    return {"message": status["message"]} if status.get("message") else {}


def ray_start_args(
    params: dict[str, str], container: dict[str, Any], head_address: str | None
) -> list[str]:
    """``ray start ... --block`` as KubeRay derives it from a group's rayStartParams.

    As KubeRay does, num-cpus, num-gpus and memory come from the container's limits (else
    requests) when rayStartParams do not set them; CPUs are rounded up.
    """
    params = dict(params)
    res = container.get("resources") or {}
    have = {**(res.get("requests") or {}), **(res.get("limits") or {})}
    if "num-cpus" not in params and have.get("cpu"):
        params["num-cpus"] = str(math.ceil(quantity(str(have["cpu"]))))
    if "num-gpus" not in params:
        gpus = sum(int(v) for k, v in have.items() if k.endswith("/gpu"))
        if gpus:
            params["num-gpus"] = str(gpus)
    if "memory" not in params and have.get("memory"):
        params["memory"] = str(int(quantity(str(have["memory"]))))
    args = ["ray", "start", "--block"]
    args += (
        ["--head", f"--port={GCS_PORT}"] if head_address is None else [f"--address={head_address}"]
    )
    return args + [f"--{k}={v}" for k, v in params.items()]


def kuberay_command(args: list[str]) -> list[str]:
    # KubeRay wraps the command in bash with a raised open-file limit.
    return ["/bin/bash", "-c", "ulimit -n 65536 || true; exec " + " ".join(args)]


class FakeKubeRayOnKubelets:
    """A fake of KubeRay's operator for a cluster with real kubelets (see the module doc).

    ``reconcile(name)`` makes the RayService's Ray cluster once, deploys its Serve config
    and writes its status; ``describe`` is a callback for failure messages (the Ray
    containers' logs, which the test reads from the nodes' Docker daemons).
    """

    def __init__(
        self,
        k8s: client.ApiClient,
        ns: str,
        describe: Callable[[], str] = lambda: "",
    ) -> None:
        self.core = client.CoreV1Api(k8s)
        self.custom = client.CustomObjectsApi(k8s)
        self.ns = ns
        self.describe = describe
        self.cluster_name = ""
        self._token = ""
        self._head_ip = ""

    def get(self, name: str) -> dict[str, Any]:
        obj: Any = self.custom.get_namespaced_custom_object(
            "ray.io", "v1", self.ns, "rayservices", name
        )
        return dict(obj)

    @property
    def dashboard_url(self) -> str:
        """The head pod's dashboard (after ``reconcile``), as KubeRay's operator calls it."""
        return f"http://{self._head_ip}:{DASHBOARD_PORT}"

    # -- the Ray cluster as Kubernetes objects -------------------------------------------

    def _auth_env(self, cluster: dict[str, Any]) -> list[dict[str, Any]]:
        auth = cluster.get("authOptions") or {}
        if auth.get("mode") != "token":
            return []
        secret: Any = self.core.read_namespaced_secret(auth["secretName"], self.ns)
        self._token = base64.b64decode(secret.data["auth_token"]).decode()
        return [
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {
                "name": "RAY_AUTH_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": auth["secretName"], "key": "auth_token"}},
            },
        ]

    def _pod(
        self,
        rs: dict[str, Any],
        name: str,
        spec: dict[str, Any],
        labels: dict[str, str],
    ) -> dict[str, Any]:
        owner = {
            "apiVersion": "ray.io/v1",
            "kind": "RayService",
            "name": rs["metadata"]["name"],
            "uid": rs["metadata"]["uid"],
            "controller": True,
        }
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels, "ownerReferences": [owner]},
            "spec": spec,
        }

    def _create_cluster(self, rs: dict[str, Any]) -> None:
        rs = copy.deepcopy(rs)
        name = rs["metadata"]["name"]
        cluster = rs["spec"]["rayClusterConfig"]
        self.cluster_name = f"{name}-raycluster-{uuid.uuid4().hex[:5]}"
        head_svc = f"{self.cluster_name}-head-svc"
        fq_head = f"{head_svc}.{self.ns}.svc.cluster.local"
        env = self._auth_env(cluster)
        head_group = cluster["headGroupSpec"]
        worker_groups = cluster["workerGroupSpecs"]
        for tpl in (head_group["template"], *(g["template"] for g in worker_groups)):
            c = tpl["spec"]["containers"][0]
            c["env"] = [*(c.get("env") or []), *env]
        pods = kuberay_pods(rs)
        base = {
            **(head_group["template"].get("metadata") or {}).get("labels", {}),
            "ray.io/cluster": self.cluster_name,
            SERVE_LABEL: "true",
        }
        # the autoscaler sidecar scales a RayCluster object, which only KubeRay creates
        head_spec = pods["head"]
        head_spec["containers"] = [c for c in head_spec["containers"] if c["name"] != "autoscaler"]
        head = head_spec["containers"][0]
        head["command"] = kuberay_command(
            ray_start_args(head_group.get("rayStartParams") or {}, head, None)
        )
        head["env"] = [
            *(head.get("env") or []),
            {"name": "RAY_CLUSTER_NAME", "value": self.cluster_name},
            {"name": "RAY_ADDRESS", "value": f"127.0.0.1:{GCS_PORT}"},
            {"name": "RAY_USAGE_STATS_KUBERAY_IN_USE", "value": "1"},
        ]
        head_labels = {**base, "ray.io/node-type": "head", "ray.io/group": "headgroup"}
        objects = [self._pod(rs, f"{self.cluster_name}-head", head_spec, head_labels)]
        for group in worker_groups:
            for i in range(int(group.get("replicas") or 0)):
                spec = copy.deepcopy(pods["worker"])
                ray = spec["containers"][0]
                ray["command"] = kuberay_command(
                    ray_start_args(group.get("rayStartParams") or {}, ray, f"{fq_head}:{GCS_PORT}")
                )
                ray["env"] = [
                    *(ray.get("env") or []),
                    {"name": "RAY_CLUSTER_NAME", "value": self.cluster_name},
                    {"name": "FQ_RAY_IP", "value": fq_head},
                    {"name": "RAY_USAGE_STATS_KUBERAY_IN_USE", "value": "1"},
                ]
                for init in spec.get("initContainers") or []:
                    if init["name"] == "wait-gcs-ready":
                        init["command"] = [
                            "/bin/bash",
                            "-c",
                            f"until ray health-check --address {fq_head}:{GCS_PORT}"
                            " >/dev/null 2>&1; do echo waiting for GCS; sleep 2; done",
                        ]
                labels = {**base, "ray.io/node-type": "worker", "ray.io/group": group["groupName"]}
                pod_name = f"{self.cluster_name}-{group['groupName']}-worker-{i}"
                objects.append(self._pod(rs, pod_name, spec, labels))
        owner = objects[0]["metadata"]["ownerReferences"]
        self.core.create_namespaced_service(
            self.ns,
            {  # type: ignore[arg-type]
                "metadata": {"name": head_svc, "ownerReferences": owner},
                "spec": {
                    # headless, as KubeRay's default: Ray nodes reach the head at its pod IP
                    "clusterIP": "None",
                    "selector": {"ray.io/cluster": self.cluster_name, "ray.io/node-type": "head"},
                    "publishNotReadyAddresses": True,
                    "ports": [
                        {"name": "gcs", "port": GCS_PORT},
                        {"name": "dashboard", "port": DASHBOARD_PORT},
                        {"name": "client", "port": CLIENT_PORT},
                        {"name": "serve", "port": SERVE_PORT},
                        {"name": "metrics", "port": METRICS_PORT},
                    ],
                },
            },
        )
        self.core.create_namespaced_service(
            self.ns,
            {  # type: ignore[arg-type]
                "metadata": {"name": f"{name}-serve-svc", "ownerReferences": owner},
                "spec": {
                    "selector": {"ray.io/cluster": self.cluster_name, SERVE_LABEL: "true"},
                    "ports": [{"name": "serve", "port": SERVE_PORT}],
                },
            },
        )
        for pod in objects:
            for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
                # Go's resource.Quantity takes 1 or "1"; this client takes only strings
                for kind in ("limits", "requests"):
                    q = (c.get("resources") or {}).get(kind) or {}
                    q.update({k: str(v) for k, v in q.items()})
            self.core.create_namespaced_pod(self.ns, pod)  # type: ignore[arg-type]

    # -- Serve through the head's dashboard ----------------------------------------------

    def pods(self) -> list[Any]:
        sel = f"ray.io/cluster={self.cluster_name}"
        return list(self.core.list_namespaced_pod(self.ns, label_selector=sel).items)

    def _dashboard(self, method: str = "GET", body: dict[str, Any] | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        req = urllib.request.Request(
            f"{self.dashboard_url}/api/serve/applications/",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers=headers,
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
        return json.loads(data) if data and method == "GET" else None

    def _fail(self, why: str) -> AssertionError:
        lines = [why]
        for p in self.pods():
            lines.append(f"pod {p.metadata.name} on {p.spec.node_name}: {p.status.phase}")
            for cs in (p.status.init_container_statuses or []) + (
                p.status.container_statuses or []
            ):
                lines.append(f"  {cs.name}: {cs.state}")
        return AssertionError("\n".join(lines) + "\n" + self.describe())

    def _check_pods(self) -> None:
        for p in self.pods():
            if p.status.phase in ("Failed", "Succeeded"):
                raise self._fail(f"Ray pod {p.metadata.name} ended: {p.status.phase}")
            for cs in p.status.container_statuses or []:
                if cs.restart_count:
                    raise self._fail(f"Ray container {cs.name} of {p.metadata.name} restarted")

    def reconcile(self, name: str, timeout: float = 600) -> dict[str, Any]:
        """Make the Ray cluster, deploy the Serve config, wait for it to run and write the
        RayService status; returns the status."""
        rs = self.get(name)
        self._create_cluster(rs)
        deadline = time.monotonic() + timeout
        head = f"{self.cluster_name}-head"
        while True:
            self._check_pods()
            pod: Any = self.core.read_namespaced_pod(head, self.ns)
            if pod.status.phase == "Running" and pod.status.pod_ip:
                self._head_ip = pod.status.pod_ip
                try:
                    self._dashboard()
                    break
                except (OSError, urllib.error.HTTPError):
                    pass
            if time.monotonic() > deadline:
                raise self._fail(f"the Ray dashboard of {head} did not answer in {timeout}s")
            time.sleep(1)
        config = yaml.safe_load(rs["spec"]["serveConfigV2"])
        self._dashboard("PUT", config)
        apps: dict[str, Any] = {}
        while True:
            self._check_pods()
            apps = (self._dashboard() or {}).get("applications") or {}
            bad = {n: a for n, a in apps.items() if a["status"] in ("DEPLOY_FAILED", "UNHEALTHY")}
            if bad:
                raise self._fail(f"Serve applications failed: {json.dumps(bad)[-3000:]}")
            if apps and all(a["status"] == "RUNNING" for a in apps.values()):
                break
            if time.monotonic() > deadline:
                raise self._fail(f"Serve applications not RUNNING in {timeout}s: {apps}")
            time.sleep(1)
        status = rayservice_status(rs, apps, self.cluster_name)
        self.custom.patch_namespaced_custom_object_status(
            "ray.io", "v1", self.ns, "rayservices", name, {"status": status}
        )
        return status
