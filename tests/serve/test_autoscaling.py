"""Real Ray Serve autoscaling of the LLMServer deployment under concurrent clients."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from servekit import LocalServe, TinyModels, modelservice, serve_config

pytestmark = pytest.mark.slow


def _wait(cond: object, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"{what} not reached within {timeout}s")


def test_scales_up_under_load_and_back_down(local_serve: LocalServe, tiny: TinyModels) -> None:
    msvc = modelservice(
        tiny.base, min_replicas=1, max_replicas=2, target=1, upscale_s=1, downscale_s=3
    )
    cfg = serve_config(msvc, {})
    # Test-only: average load over 2 s instead of Serve's 30 s so the test is short.
    cfg["applications"][0]["deployments"][0]["autoscaling_config"]["look_back_period_s"] = 2
    local_serve.deploy(cfg)
    _wait(lambda: local_serve.running_replicas() == 1, 60, "one replica")

    stop = threading.Event()
    served_by: set[str] = set()
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=local_serve.url, timeout=120) as http:
            while not stop.is_set():
                r = http.post(
                    "/v1/completions",
                    json={"model": "tiny", "prompt": "ray serve", "max_tokens": 48},
                )
                if r.status_code != 200:
                    errors.append(r.text)
                served_by.add(r.headers.get("x-graft-replica", "?"))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: local_serve.running_replicas() >= 2, 90, ">= 2 replicas under load")
        # Both replicas take traffic, not just exist.
        _wait(lambda: len(served_by) >= 2, 60, "traffic on two replicas")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors[:3]
    _wait(lambda: local_serve.running_replicas() == 1, 90, "back to one replica when idle")
