"""Training for real on the tiny model: loss goes down in each stage type and method."""

from __future__ import annotations

from pathlib import Path
from statistics import mean

import pytest
import torch
from trainkit import make_job

from graft.runtime.train import run_training
from graft.runtime.train.files import process_umask


def dropped(losses: list[float], by: float) -> bool:
    return mean(losses[-3:]) < mean(losses[:3]) - by


@pytest.mark.slow
def test_full_finetune_cpt_then_sft(
    assets: dict[str, Path], tmp_path: Path, quiet_env: None
) -> None:
    job = make_job(
        assets,
        tmp_path,
        method="full",
        max_steps=14,
        lr=3e-3,
        every=100,
        stages=[("ContinuedPretraining", "cpt", "text"), ("SFT", "alpaca", "alpaca")],
    )
    seen: list[dict[str, object]] = []
    res = run_training(job, workdir=tmp_path / "w", stdout_progress=False, on_progress=seen.append)
    cpt, sft = res.stages
    assert cpt.steps == sft.steps == 14
    assert dropped(cpt.losses, 0.5), cpt.losses
    assert dropped(sft.losses, 0.5), sft.losses
    assert cpt.eval_loss is not None and cpt.eval_loss < cpt.losses[0] - 0.5
    # The SFT stage starts from the CPT weights: its first loss is below an untrained model's.
    assert sft.losses[0] < cpt.losses[0] - 0.5
    out = tmp_path / "output"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert res.output_kind == "model"
    states = [p["state"] for p in seen]
    assert states[0] == "preparing" and states[-1] == "succeeded" and "training" in states
    last = seen[-1]
    assert last["output"] == {"uri": f"file://{out}", "kind": "model"}
    assert {"step", "totalSteps", "loss", "lastCheckpoint", "data", "stage"} <= set(last)


@pytest.mark.slow
def test_lora_cpt_then_chat_sft_with_merge(
    assets: dict[str, Path], tmp_path: Path, quiet_env: None
) -> None:
    job = make_job(
        assets,
        tmp_path,
        method="lora",
        max_steps=16,
        lr=2e-2,
        every=100,
        stages=[("ContinuedPretraining", "cpt", "text"), ("SFT", "chat", "chat")],
        output={"uri": f"file://{tmp_path}/output", "merge": True},
    )
    res = run_training(job, workdir=tmp_path / "w", stdout_progress=False)
    cpt, sft = res.stages
    assert dropped(cpt.losses, 0.25), cpt.losses
    assert dropped(sft.losses, 0.5), sft.losses
    out = tmp_path / "output"
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "merged" / "model.safetensors").exists()
    assert res.output_kind == "adapter"
    # Published for servers that run as another user: the umask's modes, not 0600.
    readable = 0o666 & ~process_umask()
    for f in (out / "adapter_model.safetensors", out / "merged" / "model.safetensors"):
        assert f.stat().st_mode & 0o777 == readable, (f, oct(f.stat().st_mode))
    # The saved adapter reproduces the merged model's logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(assets["base"]), local_files_only=True)
    with_adapter = PeftModel.from_pretrained(base, str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), local_files_only=True)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        a = with_adapter(input_ids=ids).logits
        b = merged.eval()(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
