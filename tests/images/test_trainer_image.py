"""The trainer image trains through the runtime contract, as the operator's pod runs it.

The pod and its ConfigMap come from the operator's own builders (build_pod,
build_config_map) for a one-rank LoRA SFT job on the CPU pool; its claims are host
directories. The container runs restricted: non-root, read-only root filesystem, all
capabilities dropped, with only the writable mounts the pod has. A SIGTERM mid-run (the
kubelet deleting the pod) makes PID 1 write a final checkpoint and a termination message
inside the grace period; the next attempt's pod resumes from that checkpoint and finishes.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from dockerpod import DockerPod

from graft.api.finetunejob import FineTuneJob, Placement
from graft.builders.finetunejob import build_config_map, build_pod
from graft.config import NodePool, Settings
from graft.testing.corpus import instruction_records, write_jsonl
from graft.testing.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

CKPT = re.compile(r"^ckpt-s(\d{2})-(\d{8})$")
#: Long enough that the SIGTERM lands mid-run on an idle machine too: with 40 steps the run
#: once ended between its first checkpoint and the signal there.
STEPS = 400


def _job(steps: int) -> FineTuneJob:
    return FineTuneJob.model_validate(
        {
            "apiVersion": "graft.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "tiny", "namespace": "team-a", "uid": "u-1"},
            "spec": {
                "baseModel": {"uri": "pvc://models/tiny"},
                "stages": [
                    {"type": "SFT", "dataset": {"uri": "pvc://data/sft.jsonl", "format": "alpaca"}}
                ],
                "method": "lora",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "hyperparameters": {
                    "maxSteps": steps,
                    "learningRate": 3e-3,
                    "globalBatchSize": 4,
                    "microBatchSize": 4,
                    "maxSeqLength": 64,
                    "precision": "fp32",
                    "warmupSteps": 1,
                    "seed": 7,
                },
                "checkpoint": {"uri": "pvc://out/ckpt", "every": 2, "keep": 3},
                "output": {"uri": "pvc://out/adapter"},
                "resources": {"nodePool": "cpu", "nodes": 1, "cpu": "1", "memory": "2Gi"},
            },
        }
    )


def _pod(
    job: FineTuneJob, image: str, attempt: int, resume_from: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    pool = NodePool.model_validate({"name": "cpu", "nodeSelector": {"graft.dev/pool": "cpu"}})
    settings = Settings(node_pools=[pool], trainer_image=image, termination_grace_seconds=60)
    placement = Placement(node_pool="cpu", nodes=1, gpus_per_node=0)
    cm = build_config_map(job, placement, attempt, resume_from, settings)
    pod = build_pod(job, placement, pool, attempt, 0, resume_from, settings, avoid_nodes=[])
    return pod, cm


def _checkpoints(root: Path) -> list[tuple[int, str]]:
    out = []
    for d in root.glob("ckpt-*"):
        m = CKPT.match(d.name)
        if m and (d / "manifest.json").exists():
            out.append((int(m.group(2)), d.name))
    return sorted(out)


def _progress(logs: str) -> list[dict[str, Any]]:
    out = []
    for line in logs.splitlines():
        line = line.strip()
        if line.startswith("{") and '"step"' in line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


@pytest.fixture(scope="module")
def claims(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("claims")
    models, data, out = root / "models", root / "data", root / "out"
    build_tiny_model(models / "tiny", seed=0)
    write_jsonl(data / "sft.jsonl", instruction_records(120, seed=12))
    out.mkdir()
    # The written claim is writable by the pod's user, as an fsGroup-owned volume is.
    out.chmod(0o777)
    for p in (root, models, data, *models.rglob("*"), *data.rglob("*")):
        p.chmod(p.stat().st_mode | 0o755 if p.is_dir() else p.stat().st_mode | 0o644)
    return {"models": models, "data": data, "out": out}


def _run(
    trainer_image: str, claims: dict[str, Path], workdir: Path, attempt: int, resume: str | None
) -> DockerPod:
    job = _job(steps=STEPS)
    pod, cm = _pod(job, trainer_image, attempt, resume)
    run = DockerPod(
        pod,
        workdir,
        claims=claims,
        config_maps={cm["metadata"]["name"]: cm["data"]},
        network="none",
        extra_env={"OMP_NUM_THREADS": "1"},
        restricted=True,
    )
    return run.start()


def test_trainer_image_sigterm_checkpoints_and_next_attempt_resumes(
    trainer_image: str, claims: dict[str, Path], tmp_path: Path
) -> None:
    ckpt = claims["out"] / "ckpt"
    first = _run(trainer_image, claims, tmp_path / "a1", 1, None)
    try:
        assert first.exec("id", "-u").strip() == "65532"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not _checkpoints(ckpt):
            assert first.running(), f"trainer exited early:\n{first.logs()[-4000:]}"
            time.sleep(0.2)
        assert _checkpoints(ckpt), f"no checkpoint within 600 s:\n{first.logs()[-4000:]}"
        before = _checkpoints(ckpt)[-1][0]
        t0 = time.monotonic()
        first.stop(timeout=60)
        took = time.monotonic() - t0
        state = first.state()
        logs = first.logs()
        assert not state["OOMKilled"]
        assert state["ExitCode"] not in (0, 137), (
            f"SIGTERM must end the trainer with a retryable code, not kill it:\n{logs[-4000:]}"
        )
        assert took < 55, f"the trainer needed {took:.0f}s after SIGTERM:\n{logs[-4000:]}"
        message = first.termination_message()
        assert message, (
            f"no termination message at the pod's terminationMessagePath:\n{logs[-3000:]}"
        )
        after = _checkpoints(ckpt)[-1]
        assert after[0] >= before, "SIGTERM must not lose checkpoints"
        assert after[0] < STEPS, "the first attempt must not have finished before SIGTERM"
    finally:
        first.remove()

    resume_from = f"pvc://out/ckpt/{after[1]}"
    second = _run(trainer_image, claims, tmp_path / "a2", 2, resume_from)
    try:
        code = second.wait(timeout=900)
        logs = second.logs()
        assert code == 0, f"the resumed attempt failed ({code}):\n{logs[-4000:]}"
        steps = [p["step"] for p in _progress(logs) if isinstance(p.get("step"), int)]
        trained = [s for s in steps if s > 0]
        # the resumed attempt starts at the SIGTERM checkpoint's step, not at 0
        assert trained and trained[0] == after[0], f"did not resume from step {after[0]}: {steps}"
        assert max(steps) == STEPS
    finally:
        second.remove()
    adapter = claims["out"] / "adapter"
    assert (adapter / "adapter_config.json").exists(), sorted(p.name for p in adapter.glob("*"))
