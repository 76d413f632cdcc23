"""Fixtures for the serving runtime: a tiny model and adapters, and a real local Ray Serve."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from servekit import FAST_SERVE, LocalServe, TinyModels, free_port

from graft.testing.tiny_model import build_tiny_adapter, build_tiny_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_model(root / "base")
    return TinyModels(
        base=base,
        a1=build_tiny_adapter(base, root / "a1", seed=1),
        a2=build_tiny_adapter(base, root / "a2", seed=7),
    )


@pytest.fixture(scope="session")
def local_serve() -> Iterator[LocalServe]:
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start

    os.environ.update(FAST_SERVE)
    # Logical CPUs, not cores: replicas ask for half a CPU, and two of them plus Serve's
    # own actors must fit while the autoscaling test runs on a 2-core machine.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    client = serve_start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield LocalServe(url=f"http://127.0.0.1:{port}", port=port, client=client)
    finally:
        serve.shutdown()
        ray.shutdown()
