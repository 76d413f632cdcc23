"""``graft serve --once``: the ModelService on a real local Ray Serve answers one question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from clikit import free_port, run_graft

from graft.local import state as st

pytestmark = pytest.mark.slow


def test_serve_once_answers_with_adapter_from_local_job(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    from graft.testing.tiny_model import build_tiny_adapter

    adapter = build_tiny_adapter(tiny["base"], tmp_path / "pvc" / "out" / "tuned", seed=3)
    workdir = tmp_path / "w"
    # What `graft run` writes when a job succeeds (docs/local.md, state files).
    st.write_state(
        workdir,
        "tuned-job",
        {
            "name": "tuned-job",
            "phase": "Succeeded",
            "output": {"uri": "pvc://out/tuned", "kind": "adapter", "path": str(adapter)},
        },
    )
    svc = tmp_path / "svc.yaml"
    svc.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "graft.dev/v1alpha1",
                "kind": "ModelService",
                "metadata": {"name": "tiny"},
                "spec": {
                    "model": {
                        "baseModel": {"uri": f"file://{tiny['base']}"},
                        "adapters": [{"name": "tuned", "fromFineTuneJob": "tuned-job"}],
                    },
                    # As a cluster spec would say: on this GPU-less machine graft serve
                    # falls back to CPU and the transformers engine, and says so.
                    "resources": {"gpusPerReplica": 1, "cpu": "1"},
                },
            }
        )
    )
    port = free_port()
    res = run_graft(
        "serve",
        str(svc),
        "--port",
        str(port),
        "--workdir",
        str(workdir),
        "--pvc-root",
        str(tmp_path / "pvc"),
        "--once",
        "what is wrong with the gearbox",
        "--max-tokens",
        "8",
        cwd=tmp_path,
        timeout=400,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # Ray may print its own lines on stdout while shutting down.
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith('{"model"')]
    assert len(lines) == 1, res.stdout
    answer = json.loads(lines[0])
    assert answer["model"] == "tuned"
    assert answer["question"] == "what is wrong with the gearbox"
    assert isinstance(answer["answer"], str) and answer["answer"]
    err = " ".join(res.stderr.split())
    assert f"http://127.0.0.1:{port}/v1" in err
    assert "serving on CPU with the transformers engine" in err
