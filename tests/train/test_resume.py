"""Surviving kills: kill -9 and restart gives the same weights; SIGTERM checkpoints and exits 20.

Equality is bitwise (torch.equal): on CPU with one intra-op thread every kernel is
deterministic, and a resumed run restores weights, AdamW moments, the schedule, every RNG
and the data position exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from trainkit import make_job

from graft.procs import descendants
from graft.runtime.train import EXIT_RETRYABLE, launch_local, run_training
from graft.runtime.train.checkpoint import sha256_file
from graft.runtime.train.config import RuntimeEnv
from graft.runtime.train.errors import UserError


def tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def weights(out: Path) -> dict[str, torch.Tensor]:
    f = out / "adapter_model.safetensors"
    return load_file(str(f if f.exists() else out / "model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max()}"


def env_for(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GRAFT_PROGRESS_INTERVAL="0", OMP_NUM_THREADS="1", POD_NAME="", POD_NAMESPACE="")
    return env


def run_killed(
    job: dict[str, Any], run_dir: Path, nproc: int, kill_at: int, steps_per_stage: int
) -> int:
    """Run until global step ``kill_at`` has been reported, then SIGKILL the whole tree."""
    holder: dict[str, Any] = {}
    done = {"killed": False}

    def on_progress(p: dict[str, Any]) -> None:
        g = p.get("stageIndex", 0) * steps_per_stage + p.get("step", 0)
        if p.get("state") == "training" and g >= kill_at and not done["killed"]:
            done["killed"] = True
            for pid in tree(holder["proc"].pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    res = launch_local(
        job,
        nproc=nproc,
        workdir=run_dir,
        on_progress=on_progress,
        env=env_for(run_dir),
        popen_hook=lambda p: holder.update(proc=p),
    )
    assert done["killed"], "run finished before the kill"
    return res.exit_code


def kill_and_compare(
    assets: dict[str, Path],
    tmp_path: Path,
    nproc: int,
    job_kw: dict[str, Any],
    steps_per_stage: int,
    n_stages: int,
    kill_at: int | None = None,
) -> None:
    ref_job = make_job(assets, tmp_path / "ref", **job_kw)
    ref = launch_local(ref_job, nproc=nproc, workdir=tmp_path / "ref-run", env=env_for(tmp_path))
    assert ref.exit_code == 0, ref.termination
    seed = int(os.environ.get("GRAFT_TEST_SEED", time.time_ns() % 10_000))
    if kill_at is None:
        kill_at = random.Random(seed).randint(2, steps_per_stage * n_stages - 1)
    job = make_job(assets, tmp_path / "victim", **job_kw)
    code = run_killed(job, tmp_path / "victim-run", nproc, kill_at, steps_per_stage)
    assert code != 0
    again = launch_local(job, nproc=nproc, workdir=tmp_path / "victim-run", env=env_for(tmp_path))
    assert again.exit_code == 0, (again.termination, f"GRAFT_TEST_SEED={seed}")
    assert_same(weights(tmp_path / "ref" / "output"), weights(tmp_path / "victim" / "output"))


TWO_STAGE_LORA: dict[str, Any] = {
    "method": "lora",
    "dropout": 0.1,
    "max_steps": 8,
    "every": 3,
    "lr": 1e-2,
    "stages": [("ContinuedPretraining", "cpt", "text"), ("SFT", "alpaca", "alpaca")],
}


@pytest.mark.slow
def test_kill9_single_process_resumes_bitwise(
    assets: dict[str, Path], tmp_path: Path, quiet_env: None
) -> None:
    kill_and_compare(assets, tmp_path, 1, TWO_STAGE_LORA, steps_per_stage=8, n_stages=2)


@pytest.mark.slow
def test_kill9_after_a_completed_stage_resumes_bitwise(
    assets: dict[str, Path], tmp_path: Path, quiet_env: None
) -> None:
    """Killed in stage 2 before its first checkpoint: the resume starts from stage 1's
    completed checkpoint, and stage 2's dropout must draw what the uninterrupted run drew."""
    kill_and_compare(assets, tmp_path, 1, TWO_STAGE_LORA, steps_per_stage=8, n_stages=2, kill_at=9)


@pytest.mark.slow
def test_kill9_ddp_two_processes_resumes_bitwise(
    assets: dict[str, Path], tmp_path: Path, quiet_env: None
) -> None:
    kill_and_compare(
        assets,
        tmp_path,
        2,
        {"method": "full", "max_steps": 10, "every": 3, "gbs": 8, "mbs": 2},
        steps_per_stage=10,
        n_stages=1,
    )


def sigterm_run(assets: dict[str, Path], tmp_path: Path, nproc: int) -> None:
    job = make_job(assets, tmp_path, max_steps=400, every="1h", dropout=0.1)
    holder: dict[str, Any] = {}
    sent = {"at": None}

    def on_progress(p: dict[str, Any]) -> None:
        if p.get("state") == "training" and p.get("step", 0) >= 3 and sent["at"] is None:
            sent["at"] = p["step"]
            holder["proc"].send_signal(signal.SIGTERM)

    res = launch_local(
        job,
        nproc=nproc,
        workdir=tmp_path / "run",
        on_progress=on_progress,
        env=env_for(tmp_path),
        popen_hook=lambda p: holder.update(proc=p),
    )
    assert res.exit_code == EXIT_RETRYABLE, res.termination
    assert res.termination is not None and res.termination["reason"] == "Terminated"
    assert res.termination["retryable"] is True
    ckpts = sorted((tmp_path / "ckpt").glob("ckpt-*"))
    assert len(ckpts) == 1, ckpts
    man = json.loads((ckpts[0] / "manifest.json").read_text())
    assert man["complete"] and sent["at"] <= man["step"] < 400
    assert {f"rng-rank{r:05d}.json" for r in range(nproc)} <= set(man["files"])
    assert res.last_progress is not None
    assert res.last_progress["lastCheckpoint"]["step"] == man["step"]


@pytest.mark.slow
def test_sigterm_writes_final_checkpoint_and_exits_20(
    assets: dict[str, Path], tmp_path: Path, quiet_env: None
) -> None:
    sigterm_run(assets, tmp_path, 1)


@pytest.mark.slow
def test_sigterm_under_torchrun_reaches_workers(
    assets: dict[str, Path], tmp_path: Path, quiet_env: None
) -> None:
    sigterm_run(assets, tmp_path, 2)


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_on_resume(
    assets: dict[str, Path], tmp_path: Path, quiet_env: None
) -> None:
    kw: dict[str, Any] = {"max_steps": 12, "every": 4, "keep": 5, "dropout": 0.1, "lr": 1e-2}
    job = make_job(assets, tmp_path, **kw)
    first = run_training(job, workdir=tmp_path / "w", stdout_progress=False)
    assert first.resumed_from is None
    reference = weights(tmp_path / "output")
    ck = tmp_path / "ckpt"
    assert [p.name for p in sorted(ck.glob("ckpt-*"))] == [
        "ckpt-s00-00000004",
        "ckpt-s00-00000008",
        "ckpt-s00-00000012",
    ]
    # Lose the final checkpoint and the output, and truncate the step-8 weights: the
    # restart must notice, fall back to step 4 and still end bit-identical.
    shutil.rmtree(ck / "ckpt-s00-00000012")
    shutil.rmtree(tmp_path / "output")
    model = ck / "ckpt-s00-00000008" / "model.pt"
    os.truncate(model, model.stat().st_size - 100)
    second = run_training(job, workdir=tmp_path / "w", stdout_progress=False)
    assert second.resumed_from == f"file://{ck}/ckpt-s00-00000004"
    assert second.stages[0].resumed_at == 4
    assert_same(reference, weights(tmp_path / "output"))


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.slow
def test_pickle_planted_in_a_checkpoint_never_runs(
    assets: dict[str, Path], tmp_path: Path, quiet_env: None
) -> None:
    """Someone with write access to the checkpoint claim swaps a rank's RNG state for a
    code-running pickle and fixes up the manifest: resume skips it (or, with the legacy
    opt-in, refuses it with UnsafeCheckpoint); the code never runs."""
    job = make_job(assets, tmp_path, max_steps=8, every=4, keep=5)
    run_training(job, workdir=tmp_path / "w", stdout_progress=False)
    ck = tmp_path / "ckpt"
    shutil.rmtree(ck / "ckpt-s00-00000008")
    shutil.rmtree(tmp_path / "output")
    victim = ck / "ckpt-s00-00000004"
    (victim / "rng-rank00000.json").unlink()
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), victim / "rng-rank00000.pt")
    man = json.loads((victim / "manifest.json").read_text())
    del man["files"]["rng-rank00000.json"]
    man["files"]["rng-rank00000.pt"] = sha256_file(str(victim / "rng-rank00000.pt")).to_json()
    (victim / "manifest.json").write_text(json.dumps(man))

    legacy = RuntimeEnv(termination_log=None, allow_legacy_pickle=True)
    with pytest.raises(UserError) as e:
        run_training(job, workdir=tmp_path / "w", stdout_progress=False, env=legacy)
    assert e.value.reason == "UnsafeCheckpoint"
    assert not marker.exists()

    res = run_training(job, workdir=tmp_path / "w", stdout_progress=False)
    assert res.stages[0].resumed_at == 4
    assert not marker.exists()
    assert (tmp_path / "output" / "adapter_model.safetensors").exists()
