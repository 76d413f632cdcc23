"""A ModelService serves the gang test's adapter from Ray pods under real kubelets.

The operator (installed from the chart, in its pod) renders the RayService, its Ray token
Secret and NetworkPolicy. KubeRay's Go operator cannot run here, so the fake of it
(``FakeKubeRayOnKubelets``, named as such) makes the head and worker Pods KubeRay would
make; the real kubelets run them from the server image, restricted and read-only. The
worker reaches the head through the headless Service's name in the cluster DNS, the Serve
config goes to the head's dashboard with the Ray token (which it refuses callers without),
and the official ``openai`` client
asks the base model and the adapter through the Serve Service's cluster IP (kube-proxy),
with the API key from the Secret the ModelService names, and is refused without it. A
second adapter names no files: the operator, from its pod, reads the replicas' /readyz
through the Serve Service's DNS name and reports it in AdaptersReady.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from containers_support import GROUP, IMAGES, POOL, SCENARIO, VERSION
from e2e_support import SHARED
from kubernetes import client

from graft.testing.cluster import wait_for
from graft.testing.docker_nodes import DockerNode
from graft.testing.fake_kuberay import SERVE_PORT, FakeKubeRayOnKubelets
from graft.testing.tiny_model import build_tiny_adapter, build_tiny_model

pytestmark = pytest.mark.slow

SERVICE = "wind-llm"
API_KEY = "team-a-key-1"


def _ray_logs(nodes: dict[str, DockerNode], ns: str) -> str:
    """The last lines of every Ray container in ``ns``, from the nodes' Docker daemons."""
    out = []
    for node in nodes.values():
        if node.dockerd is None or node.dockerd.poll() is not None:
            continue
        ids = node.docker(
            "ps", "-aq", "--filter", f"label=io.kubernetes.pod.namespace={ns}", check=False
        ).split()
        for cid in ids:
            name = node.docker("inspect", "--format", "{{.Name}}", cid, check=False).strip()
            if "raycluster" not in name:
                continue
            logs = node.docker("logs", "--tail", "40", cid, check=False)
            out.append(f"--- {node.name} {name}\n{logs}")
    return "\n".join(out)


def test_modelservice_serves_the_adapter_from_ray_pods_under_real_kubelets(
    k8s: client.ApiClient,
    nodes: dict[str, DockerNode],
    operator_release: str,
    claims_namespace: tuple[str, Path],
) -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (KubeRay's CRDs for the control plane) is not on this machine")
    if "job" in SCENARIO:
        # the adapter the gang test trained, by the FineTuneJob's name
        ns, job, base = SCENARIO["namespace"], SCENARIO["job"], SCENARIO["base"]
        adapter: dict[str, str] = {"name": job, "fromFineTuneJob": job}
    else:
        # run alone (-k serving), or after the gang test failed: a tiny adapter of our own
        ns, claims = claims_namespace
        job, base = "standalone", "pvc://models/tiny-llama"
        model = build_tiny_model(claims / "models" / "tiny-llama", seed=0)
        build_tiny_adapter(model, claims / "out" / job, seed=1)
        for p in claims.rglob("*"):
            p.chmod(0o777 if p.is_dir() else 0o644)
        adapter = {"name": job, "uri": f"pvc://out/{job}"}
    core = client.CoreV1Api(k8s)
    custom = client.CustomObjectsApi(k8s)
    core.create_namespaced_secret(
        ns,
        {  # type: ignore[arg-type]
            "metadata": {"name": "wind-llm-keys"},
            "stringData": {"keys": f"# team A\n{API_KEY}\n"},
        },
    )
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        "modelservices",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelService",
            "metadata": {"name": SERVICE},
            "spec": {
                "model": {
                    "baseModel": {"uri": base},
                    # "broken" names no adapter files: its replicas report it, the
                    # operator reads their /readyz through the Serve Service
                    "adapters": [adapter, {"name": "broken", "uri": "pvc://out/no-such"}],
                },
                "engine": "transformers",
                # the nodes share this host's 2 cores and 24 GiB
                "resources": {
                    "nodePool": POOL["name"],
                    "gpusPerReplica": 1,
                    "cpu": "1",
                    "memory": "3Gi",
                },
                "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
                "auth": {"apiKeySecretRef": {"name": "wind-llm-keys", "key": "keys"}},
            },
        },
    )
    t0 = time.monotonic()

    def msvc() -> dict[str, Any]:
        obj: Any = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "modelservices", SERVICE)
        return dict(obj)

    def rendered() -> str | None:
        items = custom.list_namespaced_custom_object("ray.io", "v1", ns, "rayservices")["items"]
        for rs in items:
            config = yaml.safe_load(rs["spec"]["serveConfigV2"])
            adapters = [
                a["name"]
                for app in config["applications"]
                for d in app.get("deployments") or []
                for a in (d.get("user_config") or {}).get("adapters") or []
            ]
            if job in adapters:
                return str(rs["metadata"]["name"])
        return None

    try:
        rs_name = wait_for("a RayService serving the job's adapter", rendered, timeout=60)
    except AssertionError as e:
        raise AssertionError(f"{e}\nModelService: {json.dumps(msvc(), default=str)}") from None

    kuberay = FakeKubeRayOnKubelets(k8s, ns, describe=lambda: _ray_logs(nodes, ns))
    kuberay.reconcile(rs_name, timeout=600)
    t_serving = time.monotonic() - t0

    def ready() -> dict[str, Any] | None:
        obj = msvc()
        conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
        ok = conds.get("Ready", {}).get("status") == "True"
        return obj if ok and obj["status"].get("endpoint") else None

    try:
        served = wait_for("the ModelService Ready", ready, timeout=90)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{json.dumps(msvc().get('status'), default=str)}") from None

    def load_failure_reported() -> dict[str, Any] | None:
        conds = {c["type"]: c for c in (msvc().get("status") or {}).get("conditions") or []}
        c = conds.get("AdaptersReady", {})
        return c if c.get("reason") == "AdapterLoadFailed" else None

    try:
        reported = wait_for("AdaptersReady=False for 'broken'", load_failure_reported, timeout=60)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{json.dumps(msvc().get('status'), default=str)}") from None
    assert reported["status"] == "False" and "broken" in reported["message"], reported
    assert job not in reported["message"], reported
    endpoint = served["status"]["endpoint"]
    svc_name = endpoint.split("//", 1)[1].split(".", 1)[0]
    assert endpoint == f"http://{svc_name}.{ns}.svc:{SERVE_PORT}/v1", endpoint

    # Ray pods: on the real kubelets, from the server image, restricted, read-only root.
    pods = kuberay.pods()
    assert {p.metadata.labels["ray.io/node-type"] for p in pods} == {"head", "worker"}
    for p in pods:
        assert p.status.phase == "Running", (p.metadata.name, p.status.phase)
        node = nodes[p.spec.node_name]
        cid = node.docker(
            "ps", "-q", "--filter", f"label=io.kubernetes.pod.uid={p.metadata.uid}",
            "--filter", "label=io.kubernetes.container.name=" + p.spec.containers[0].name,
        ).split()[0]  # fmt: skip
        assert node.docker("exec", cid, "id", "-u").strip() == "1000"
        seen = node.docker(
            "inspect", cid, "--format", "{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}}"
        )
        assert seen.split() == ["true", "[ALL]"], seen
        assert p.spec.containers[0].image == IMAGES["server"]
        image_id = node.docker("image", "inspect", IMAGES["server"], "--format", "{{.Id}}")
        assert node.docker("inspect", cid, "--format", "{{.Image}}").strip() == image_id.strip()

    # Ray's token authentication is on: the token reached the Ray containers from the
    # operator's Secret (secretKeyRef), and the dashboard refuses a caller without it.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{kuberay.dashboard_url}/api/serve/applications/", timeout=10)
    assert refused.value.code == 401

    # The endpoint through the Serve Service's cluster IP (kube-proxy's rules on this host):
    # the host's resolver does not know the cluster domain; the pods' does (dnsmasq).
    ip = core.read_namespaced_service(svc_name, ns).spec.cluster_ip
    import openai

    url = f"http://{ip}:{SERVE_PORT}/v1"
    anonymous = openai.OpenAI(base_url=url, api_key="not-a-key", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    api = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)
    names = {m.id for m in api.models.list().data}
    assert {SERVICE, job} <= names and "broken" not in names, names
    answers = {}
    for model in (SERVICE, job):
        out = api.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "The gearbox shows vibration. What do I do?"}],
            max_tokens=8,
            temperature=0,
        )
        assert out.model == model
        assert out.usage is not None and out.usage.completion_tokens > 0
        answers[model] = out.choices[0].message.content
    t_done = time.monotonic() - t0
    print(
        "\n[e2e-containers] "
        + json.dumps(
            {
                "rayPods": {p.metadata.name: p.spec.node_name for p in pods},
                "servingSeconds": round(t_serving, 1),
                "answeredSeconds": round(t_done, 1),
                "answers": answers,
            }
        )
    )
