"""Adapter canaries on the real Serve app: the split, and automatic rollback of a bad version.

The operator's side is exercised too: the replicas' ``/readyz`` reports, read with the
operator's own :class:`HttpServeClient`, go through ``decide``, which must then render the
Serve config without the rolled-back version.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from servekit import LocalServe, TinyModels, modelservice

from graft.builders.serve_config import ResolvedAdapter, ResolvedCanary, build_serve_config
from graft.config import load_settings
from graft.reconcile import modelservice as ms
from graft.runtime.serve.canary import LOAD_FAILED
from graft.serve_client import HttpServeClient
from graft.testing.cluster import TEST_NODE_POOLS

pytestmark = pytest.mark.slow

PROMPT = "the model serves tokens"


def deploy_canary(
    app: LocalServe, tiny: TinyModels, canary: Path, weight: int, *, min_requests: int = 5
) -> None:
    adapters = [
        ResolvedAdapter(
            "support",
            f"file://{tiny.a1}",
            ResolvedCanary(f"file://{canary}", weight, min_requests=min_requests),
        ),
        # the two versions under names of their own, to tell the answers apart
        ResolvedAdapter("v1", f"file://{tiny.a1}"),
        ResolvedAdapter("v2", f"file://{canary}"),
    ]
    app.deploy(build_serve_config(modelservice(tiny.base), adapters))


def complete(app: LocalServe, model: str, **kw: Any) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0} | kw
    return httpx.post(f"{app.url}/v1/completions", json=body, timeout=60)


def text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def readyz(app: LocalServe) -> dict[str, Any]:
    out: dict[str, Any] = httpx.get(f"{app.url}/readyz", timeout=10).json()
    return out


@pytest.fixture
def nan_adapter(tiny: TinyModels, tmp_path: Path) -> Path:
    """A deliberately broken version: loads fine, but its LoRA weights are NaN, so sampling
    from it fails on every request."""
    import torch
    from safetensors.torch import load_file, save_file

    dest = tmp_path / "nan-adapter"
    shutil.copytree(tiny.a2, dest)
    weights = dest / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, str(weights))
    return dest


def test_canary_splits_traffic_at_about_its_weight(
    local_serve: LocalServe, tiny: TinyModels
) -> None:
    deploy_canary(local_serve, tiny, tiny.a2, 30)
    v1, v2 = text(complete(local_serve, "v1")), text(complete(local_serve, "v2"))
    assert v1 != v2
    answers = [text(complete(local_serve, "support")) for _ in range(100)]
    assert set(answers) <= {v1, v2}
    share = answers.count(v2) / len(answers)
    assert 0.2 <= share <= 0.4, share
    # the internal name of the new version is not a model clients can pick
    models = httpx.get(f"{local_serve.url}/v1/models", timeout=10).json()
    assert sorted(m["id"] for m in models["data"]) == ["support", "tiny", "v1", "v2"]
    assert complete(local_serve, "support@canary").status_code == 404
    report = readyz(local_serve)["canaries"]["support"]
    assert report["state"] == "Progressing" and report["weight"] == 30
    assert report["canary"]["requests"] + report["stable"]["requests"] == 100


def decide_with_reports(tiny: TinyModels, canary: Path, reports: list[dict[str, Any]]) -> ms.Plan:
    """What the operator does with the replicas' reports for the same adapter spec."""
    body = {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {"name": "tiny", "namespace": "default", "generation": 1, "uid": "u"},
        "spec": {
            "model": {
                "baseModel": {"uri": f"file://{tiny.base}"},
                "adapters": [
                    {
                        "name": "support",
                        "uri": f"file://{tiny.a1}",
                        "canary": {"uri": f"file://{canary}", "weight": 50},
                    }
                ],
            },
            "resources": {"gpusPerReplica": 0},
        },
        "status": {
            "canaries": [
                {
                    "name": "support",
                    "version": ResolvedCanary(f"file://{canary}", 50).version,
                    "weight": 50,
                    "state": "Progressing",
                }
            ]
        },
    }
    settings = load_settings({"GRAFT_NODE_POOLS": json.dumps(TEST_NODE_POOLS)})
    return ms.decide(body, {}, None, settings, dt.datetime.now(dt.UTC), reports)


def test_a_canary_that_errors_is_rolled_back(
    local_serve: LocalServe, tiny: TinyModels, nan_adapter: Path
) -> None:
    deploy_canary(local_serve, tiny, nan_adapter, 50)
    # sampling (temperature > 0) from NaN logits fails: the new version errors
    assert complete(local_serve, "v2", temperature=1.0).status_code >= 400
    codes = [complete(local_serve, "support", temperature=1.0).status_code for _ in range(40)]
    # five canary failures (minRequests) trip the rollback; every later request succeeds
    failed = [c for c in codes if c != 200]
    assert len(failed) == 5 and set(codes[12:]) == {200}, codes
    report = readyz(local_serve)["canaries"]["support"]
    assert report["state"] == "RolledBack" and report["weight"] == 0
    assert "error rate 100.0%" in report["reason"]

    # the operator reads the same report and takes the version out of the Serve config
    reports = asyncio.run(HttpServeClient().reports(local_serve.url, samples=2))
    plan = decide_with_reports(tiny, nan_adapter, reports)
    [status] = plan.status.canaries
    assert status.state == "RolledBack" and "error rate 100.0%" in str(status.reason)
    assert plan.rayservice is not None
    cfg = yaml.safe_load(plan.rayservice["spec"]["serveConfigV2"])
    [adapter] = cfg["applications"][0]["deployments"][0]["user_config"]["adapters"]
    assert adapter == {"name": "support", "uri": f"file://{tiny.a1}"}


def test_a_canary_that_does_not_load_is_rolled_back_at_once(
    local_serve: LocalServe, tiny: TinyModels, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    adapters = [
        ResolvedAdapter("support", f"file://{tiny.a1}", ResolvedCanary(f"file://{broken}", 100)),
        ResolvedAdapter("v1", f"file://{tiny.a1}"),
    ]
    local_serve.deploy(build_serve_config(modelservice(tiny.base), adapters))
    report = readyz(local_serve)["canaries"]["support"]
    assert report["state"] == "RolledBack" and report["reason"] == LOAD_FAILED
    v1 = text(complete(local_serve, "v1"))
    assert all(text(complete(local_serve, "support")) == v1 for _ in range(10))
