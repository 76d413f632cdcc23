"""The server image serves a ModelService's rendered serve config to the openai client.

The RayService comes from the operator's builder (build_rayservice) for a CPU ModelService
with one adapter on a claim. Its head and worker pod templates run in Docker, on a bridge
network the test creates, with the `ray start` commands KubeRay derives from the groups'
rayStartParams (the fake KubeRay here: KubeRay's Go operator cannot run in these tests).
The serve config is applied the way KubeRay applies it, with a PUT to the head's
dashboard. Then the official `openai` client asks the base model and the adapter.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerpod import DockerPod, docker

from graft.api.modelservice import ModelService
from graft.builders.rayservice import build_rayservice
from graft.builders.serve_config import ResolvedAdapter
from graft.config import Settings
from graft.testing.cluster import wait_for
from graft.testing.controlplane import free_port
from graft.testing.fake_kuberay import kuberay_command, ray_start_args
from graft.testing.tiny_model import build_tiny_adapter, build_tiny_model

pytestmark = pytest.mark.slow


def ray_start(
    group: dict[str, Any], container: dict[str, Any], head_address: str | None
) -> list[str]:
    """The command KubeRay gives a Ray container (``graft.testing.fake_kuberay``)."""
    params = group.get("rayStartParams") or {}
    return kuberay_command(ray_start_args(params, container, head_address))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("server-claims") / "models"
    base = build_tiny_model(root / "tiny", seed=0)
    build_tiny_adapter(base, root / "support", seed=1)
    for p in (root, *root.rglob("*")):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def test_server_image_serves_base_and_adapter(
    server_image: str, models: Path, tmp_path: Path
) -> None:
    msvc = ModelService.model_validate(
        {
            "metadata": {"name": "tiny", "namespace": "team-a"},
            "spec": {
                "model": {"baseModel": {"uri": "pvc://models/tiny"}},
                "engine": "transformers",
                "resources": {"gpusPerReplica": 0, "cpu": "1"},
                "autoscaling": {"minReplicas": 1, "maxReplicas": 1},
            },
        }
    )
    rs = build_rayservice(
        msvc,
        [ResolvedAdapter(name="support", uri="pvc://models/support")],
        Settings(node_pools=[], server_image=server_image),
        pool=None,
    )
    cluster = rs["spec"]["rayClusterConfig"]
    head_group, worker_group = cluster["headGroupSpec"], cluster["workerGroupSpecs"][0]
    net = f"graft-img-{uuid.uuid4().hex[:6]}"
    docker("network", "create", net)
    serve_port, dashboard_port = free_port(), free_port()
    pods: list[DockerPod] = []
    try:
        head_tpl = head_group["template"]
        head = DockerPod(
            {"metadata": {"name": "tiny-head", "namespace": "team-a"}, "spec": head_tpl["spec"]},
            tmp_path / "head",
            claims={"models": models},
            network=net,
            name=f"{net}-head",
            publish={serve_port: 8000, dashboard_port: 8265},
            restricted=True,
        )
        head.c["command"] = ray_start(head_group, head.c, None)
        pods.append(head.start())
        worker_tpl = worker_group["template"]
        worker = DockerPod(
            {
                "metadata": {"name": "tiny-worker", "namespace": "team-a"},
                "spec": worker_tpl["spec"],
            },
            tmp_path / "worker",
            claims={"models": models},
            network=net,
            name=f"{net}-worker",
            restricted=True,
        )
        worker.c["command"] = ray_start(worker_group, worker.c, f"{head.name}:6379")
        pods.append(worker.start())

        def dashboard_up() -> bool | None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{dashboard_port}/api/serve/applications/", timeout=5
                ) as r:
                    return r.status == 200 or None
            except OSError:
                for p in pods:
                    assert p.running(), f"{p.name} exited:\n{p.logs()[-4000:]}"
                return None

        wait_for("Ray dashboard on the head", dashboard_up, timeout=300)
        config = yaml.safe_load(rs["spec"]["serveConfigV2"])
        req = urllib.request.Request(
            f"http://127.0.0.1:{dashboard_port}/api/serve/applications/",
            data=json.dumps(config).encode(),
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200

        def app_running() -> bool | None:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{dashboard_port}/api/serve/applications/", timeout=10
            ) as r:
                apps = json.loads(r.read()).get("applications") or {}
            status = (apps.get("llm") or {}).get("status")
            assert status not in ("DEPLOY_FAILED", "UNHEALTHY"), json.dumps(apps)[-3000:]
            return status == "RUNNING" or None

        wait_for("Serve application RUNNING", app_running, timeout=600)
        import openai

        api = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key="unused")
        names = {m.id for m in api.models.list().data}
        assert {"tiny", "support"} <= names, names
        for model in ("tiny", "support"):
            out = api.completions.create(model=model, prompt="The domain", max_tokens=8)
            assert out.choices[0].text is not None and out.usage.completion_tokens > 0
        for p in pods:
            assert p.exec("id", "-u").strip() == "1000"
    finally:
        for p in pods:
            print(p.name, p.logs()[-3000:])
            p.remove()
        docker("network", "rm", net, check=False)
