"""Helpers for the serve tests: a real local Ray Serve and ModelService/serve-config makers.

A module of its own (not conftest.py) so that tests can import it by a unique name.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.api.modelservice import ModelService
from graft.builders.serve_config import (
    APP_NAME,
    DEPLOYMENT_NAME,
    ResolvedAdapter,
    build_serve_config,
)

# Serve's autoscaler and health checks run on 10 s cadences by default; the tests need
# them to react in about a second. Set before ray.init so every Ray process inherits them.
FAST_SERVE = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_MIN_HANDLE_METRICS_TIMEOUT_S": "1",
    "RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class TinyModels:
    base: Path
    a1: Path
    a2: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalServe:
    """A real Ray Serve instance; ``deploy`` applies a serve config as KubeRay would."""

    url: str
    port: int
    client: Any

    def deploy(self, config: dict[str, Any], *, timeout: float = 120) -> None:
        from ray.serve.schema import ServeDeploySchema

        cfg = dict(config)
        cfg["http_options"] = {"host": "127.0.0.1", "port": self.port}
        # The dashboard's REST endpoint, which KubeRay calls, hands the validated config
        # to the controller exactly like this.
        self.client.deploy_apps(ServeDeploySchema.model_validate(cfg))
        self.wait_running(timeout=timeout)

    def wait_running(self, *, timeout: float = 120) -> None:
        from graft.local.serve import wait_running

        wait_running(timeout)

    def running_replicas(self) -> int:
        from ray import serve

        app = serve.status().applications.get(APP_NAME)
        if app is None:
            return 0
        dep = app.deployments[DEPLOYMENT_NAME]
        return int(dep.replica_states.get("RUNNING", 0))


def modelservice(
    base: Path,
    *,
    name: str = "tiny",
    min_replicas: int = 1,
    max_replicas: int = 1,
    target: float = 4.0,
    upscale_s: float = 30.0,
    downscale_s: float = 600.0,
) -> ModelService:
    return ModelService.model_validate(
        {
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "model": {"baseModel": {"uri": f"file://{base}"}},
                "engine": "transformers",
                "resources": {"gpusPerReplica": 0, "cpu": "500m"},
                "autoscaling": {
                    "minReplicas": min_replicas,
                    "maxReplicas": max_replicas,
                    "targetOngoingRequests": target,
                    "upscaleDelaySeconds": upscale_s,
                    "downscaleDelaySeconds": downscale_s,
                },
            },
        }
    )


def serve_config(msvc: ModelService, adapters: dict[str, Path]) -> dict[str, Any]:
    return build_serve_config(
        msvc, [ResolvedAdapter(name=n, uri=f"file://{p}") for n, p in adapters.items()]
    )
