"""A local Ray cluster running one Serve config: what KubeRay brings up for a RayService.

    python e2e/ray_serve_host.py CONFIG.yaml PORT STATUS.json

Starts Ray, starts Serve with its proxy on 127.0.0.1:PORT, applies CONFIG (a RayService's
``serveConfigV2``) the way KubeRay's call to the head's dashboard does, then writes what
Serve reports to STATUS.json every half second until SIGTERM. A process of its own so that
Ray's teardown (which may end the process) never takes the test runner with it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _name(status: Any) -> str:
    """Serve's status enums as the strings KubeRay reports (``RUNNING``, ``HEALTHY``)."""
    return str(getattr(status, "value", status))


def _status() -> dict[str, Any]:
    from ray import serve

    apps = serve.status().applications
    return {
        "time": time.time(),
        "applications": {
            name: {
                "status": _name(app.status),
                "message": app.message or "",
                "deployments": {
                    dname: {
                        "status": _name(dep.status),
                        "message": dep.message or "",
                        "replicaStates": {_name(k): int(v) for k, v in dep.replica_states.items()},
                    }
                    for dname, dep in app.deployments.items()
                },
            }
            for name, app in apps.items()
        },
    }


def main() -> int:
    config_path, port, status_path = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    import ray
    import yaml
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ray.init(
        # a cluster of its own, never one another process on this machine started
        address="local",
        num_cpus=int(os.environ.get("E2E_RAY_CPUS", "2")),
        include_dashboard=False,
        log_to_driver=False,
    )
    client = serve_start(http_options={"host": "127.0.0.1", "port": port})
    config = yaml.safe_load(config_path.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    while not stop.is_set():
        tmp = status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_status()))
        tmp.replace(status_path)
        stop.wait(0.5)
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
