"""``graft plan``: placement as the operator resolves it, and the stated throughput formula."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from graft.api.finetunejob import Method
from graft.cli import main
from graft.local.plan import (
    FULL_7B_TOKENS_PER_GPU_SECOND,
    params_from_config,
    tokens_per_gpu_second,
)

REPO = Path(__file__).resolve().parents[2]
POOLS = json.dumps(
    [
        {"name": "a100-80g", "gpusPerNode": 8, "gpuMemoryGiB": 80, "pricePerGpuHour": 2.5},
        {"name": "cpu", "gpusPerNode": 0},
    ]
)


def plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["plan", *args, "-o", "json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_alpaca_reference_point() -> None:
    # 52K examples x 3 epochs x 150 tokens in 3 h on 8 GPUs.
    assert pytest.approx(52_000 * 3 * 150 / (3 * 3600 * 8)) == FULL_7B_TOKENS_PER_GPU_SECOND
    assert round(FULL_7B_TOKENS_PER_GPU_SECOND) == 271
    assert tokens_per_gpu_second(7, Method.FULL) == pytest.approx(FULL_7B_TOKENS_PER_GPU_SECOND)


def test_plan_two_nodes_of_eight_a100(capsys: pytest.CaptureFixture[str]) -> None:
    plan = plan_json(
        capsys,
        str(REPO / "examples" / "finetunejob-domain-transfer.yaml"),
        "--node-pools",
        POOLS,
        "--tokens",
        "200M,20M",
    )
    assert (plan["nodePool"], plan["nodes"], plan["gpusPerNode"], plan["gpus"]) == (
        "a100-80g",
        2,
        8,
        16,
    )
    # llama-3-8b, full, bf16: 16 bytes/param x 1.2 = 143 GiB > 80 GiB -> FSDP over 16 GPUs.
    assert plan["paramsBillion"] == 8.0
    assert plan["parallelism"] == "fsdp"
    mem = plan["memory"]
    assert isinstance(mem, dict)
    assert mem["unshardedGiB"] == pytest.approx(8e9 * 16 * 1.2 / 2**30, abs=0.01)
    assert mem["perGpuGiB"] == pytest.approx(8e9 * 16 * 1.2 / 2**30 / 16, abs=0.01)
    assert mem["fits"] is True
    # CPT: 200M tokens / 4096 = 48828 sequences, / 256 per step = 190 steps (1 epoch);
    # SFT: 20M tokens, 1 epoch.
    stages = plan["stages"]
    assert isinstance(stages, list)
    assert stages[0]["steps"] == 190
    assert stages[0]["trainedTokens"] == 190 * 256 * 4096
    assert stages[1]["trainedTokens"] == 20_000_000
    total = 190 * 256 * 4096 + 20_000_000
    assert plan["tokens"] == total
    tps = 52_000 * 3 * 150 / (3 * 3600 * 8) * 7 / 8
    assert plan["throughput"]["tokensPerSecondPerGpu"] == pytest.approx(tps, abs=0.01)  # type: ignore[index]
    gpu_hours = total / tps / 3600
    assert plan["gpuHours"] == pytest.approx(gpu_hours, abs=0.001)
    assert plan["wallHours"] == pytest.approx(gpu_hours / 16, abs=0.001)
    assert plan["cost"] == pytest.approx(gpu_hours * 2.5, abs=0.01)
    assert math.isclose(float(plan["cost"]), 642.4, abs_tol=0.1)  # type: ignore[arg-type]


def test_plan_lora_counts_local_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clikit import job_yaml

    data = tmp_path / "alpaca.jsonl"
    rec = {"instruction": "a" * 40, "input": "", "output": "b" * 40}  # 80 chars = 20 tokens
    data.write_text((json.dumps(rec) + "\n") * 100)
    f = job_yaml(
        tmp_path / "job.yaml",
        {
            "baseModel": {"uri": "pvc://models/llama-2-7b"},
            "stages": [{"type": "SFT", "dataset": {"uri": f"file://{data}", "format": "alpaca"}}],
            "method": "lora",
            "hyperparameters": {"epochs": 2, "globalBatchSize": 10, "microBatchSize": 1},
            "resources": {"gpus": 8},
            "output": {"uri": "pvc://out/x"},
        },
    )
    plan = plan_json(capsys, str(f), "--node-pools", POOLS)
    st = plan["stages"][0]  # type: ignore[index]
    per = 20 + 8  # characters / 4, plus the template's role headers
    assert st["tokensFrom"] == "dataset"
    assert (st["examples"], st["datasetTokens"], st["steps"]) == (100, 100 * per, 2 * 10)
    assert st["trainedTokens"] == 20 * 10 * per
    assert plan["parallelism"] == "ddp"
    tps = FULL_7B_TOKENS_PER_GPU_SECOND * 1.5
    assert plan["gpuHours"] == pytest.approx(20 * 10 * per / tps / 3600, abs=0.001)


def test_plan_table_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ex = str(REPO / "examples" / "finetunejob-sft-lora.yaml")
    assert main(["plan", ex, "--node-pools", POOLS, "--tokens", "5M"]) == 0
    out = capsys.readouterr().out
    assert "a100-80g" in out and "GPU-hours" in out and "Stanford Alpaca" in out
    bad = json.dumps([{"name": "small", "gpusPerNode": 4}])
    assert main(["plan", ex, "--node-pools", bad]) == 2
    err = capsys.readouterr().err
    assert "spec.resources" in err and "unknown node pool 'a100-80g'" in err


def test_params_from_config(tiny: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny["base"]), local_files_only=True)
    n = sum(p.numel() for p in model.parameters())
    assert params_from_config(tiny["base"]) == pytest.approx(n / 1e9, rel=1e-6)
