"""Ctrl-C during ``graft run`` checkpoints and stops; ``graft run`` again resumes there.

``graft run`` runs as a real process in a process group of its own, and the test sends
SIGINT to the whole group, as a terminal does on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from clikit import graft_cmd, graft_env, job_yaml, run_graft


def newest_checkpoint(ckpt_dir: Path) -> int | None:
    steps = [int(p.name.rsplit("-", 1)[1]) for p in ckpt_dir.glob("ckpt-s00-*")]
    return max(steps) if steps else None


def test_ctrl_c_then_run_again_resumes(tiny: dict[str, Path], tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    out_dir = tmp_path / "adapter"
    job = job_yaml(
        tmp_path / "job.yaml",
        {
            "baseModel": {"uri": f"file://{tiny['base']}"},
            "stages": [
                {"type": "SFT", "dataset": {"uri": f"file://{tiny['alpaca']}", "format": "alpaca"}}
            ],
            "method": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "hyperparameters": {
                "maxSteps": 120,
                "globalBatchSize": 4,
                "microBatchSize": 4,
                "maxSeqLength": 48,
                "precision": "fp32",
                "learningRate": 0.003,
            },
            "checkpoint": {"uri": f"file://{ckpt_dir}", "every": 3, "keep": 2},
            "output": {"uri": f"file://{out_dir}"},
        },
    )
    workdir = tmp_path / "work"
    args = ["run", str(job), "--workdir", str(workdir)]
    proc = subprocess.Popen(
        graft_cmd(*args),
        cwd=tmp_path,
        env=graft_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, like a terminal's job
    )
    try:
        deadline = time.monotonic() + 180
        while newest_checkpoint(ckpt_dir) is None:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
        first_out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = " ".join(first_out.split())
    assert proc.returncode == 20, first_out
    stopped_at = newest_checkpoint(ckpt_dir)
    assert stopped_at is not None and 0 < stopped_at < 120
    assert (ckpt_dir / f"ckpt-s00-{stopped_at:08d}" / "manifest.json").exists()
    assert "Stopping" in text
    assert f"checkpoint at step {stopped_at}" in text
    assert "again to resume" in text
    assert not (out_dir / "adapter_model.safetensors").exists()
    state = json.loads((workdir / "jobs" / "tiny-job.json").read_text())
    assert state["phase"] == "Stopped" and state["exitCode"] == 20
    assert state["lastCheckpoint"]["step"] == stopped_at

    second = run_graft(*args, cwd=tmp_path, timeout=300)
    text2 = " ".join(second.stderr.split())
    assert second.returncode == 0, second.stderr
    m = re.search(r"Resumed from checkpoint (\S+) \(stage 1/1, step (\d+)\)", text2)
    assert m, text2
    assert int(m.group(2)) == stopped_at
    assert m.group(1).endswith(f"ckpt-s00-{stopped_at:08d}")
    assert "Succeeded" in text2
    assert (out_dir / "adapter_model.safetensors").exists()
    assert (out_dir / "adapter_config.json").exists()
    state = json.loads((workdir / "jobs" / "tiny-job.json").read_text())
    assert state["phase"] == "Succeeded" and state["attempt"] == 2
    assert state["output"] == {
        "uri": f"file://{out_dir}",
        "kind": "adapter",
        "path": str(out_dir),
        "promotable": True,  # no evaluation gate: nothing holds it back
    }
