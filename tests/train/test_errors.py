"""Bad inputs fail fast (before training) with exit code 10 and a message saying what to fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from trainkit import make_job

from graft.runtime.train import EXIT_USER_ERROR, UserError, launch_local, run_training


def run(job: dict[str, Any], tmp_path: Path) -> None:
    run_training(job, workdir=tmp_path / "w", stdout_progress=False)


def expect(job: dict[str, Any], tmp_path: Path, reason: str, *fragments: str) -> UserError:
    with pytest.raises(UserError) as e:
        run(job, tmp_path)
    assert e.value.reason == reason, e.value.message
    for f in fragments:
        assert f in e.value.message, e.value.message
    assert e.value.exit_code == EXIT_USER_ERROR
    assert not list((tmp_path / "ckpt").glob("ckpt-*")), "failed before any checkpoint"
    return e.value


def test_missing_dataset(assets: dict[str, Path], tmp_path: Path, quiet_env: None) -> None:
    job = make_job(assets, tmp_path)
    job["spec"]["stages"][0]["dataset"]["uri"] = "file:///nonexistent/data.jsonl"
    expect(job, tmp_path, "DatasetNotFound", "/nonexistent/data.jsonl", "stages[].dataset.uri")


def test_empty_dataset(assets: dict[str, Path], tmp_path: Path, quiet_env: None) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    job = make_job(assets, tmp_path)
    job["spec"]["stages"][0]["dataset"]["uri"] = f"file://{empty}"
    expect(job, tmp_path, "DatasetEmpty", "is empty")


def test_malformed_line(assets: dict[str, Path], tmp_path: Path, quiet_env: None) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = assets["alpaca"].read_text().splitlines()
    lines[6] = lines[6][:-5]
    bad.write_text("\n".join(lines) + "\n")
    job = make_job(assets, tmp_path)
    job["spec"]["stages"][0]["dataset"]["uri"] = f"file://{bad}"
    expect(job, tmp_path, "MalformedDataset", "bad.jsonl line 7", "not valid JSON")


def test_sequence_longer_than_model(
    assets: dict[str, Path], tmp_path: Path, quiet_env: None
) -> None:
    job = make_job(assets, tmp_path, seq=1024)
    expect(
        job,
        tmp_path,
        "SequenceTooLong",
        "max_position_embeddings=256",
        "set maxSeqLength to 256 or less",
    )


def test_unknown_target_modules(assets: dict[str, Path], tmp_path: Path, quiet_env: None) -> None:
    job = make_job(assets, tmp_path, lora={"targetModules": ["q_proj", "qkv_proj"]})
    expect(job, tmp_path, "UnknownTargetModules", "['qkv_proj']", "gate_proj", "q_proj")


def test_qlora_refuses_on_cpu(assets: dict[str, Path], tmp_path: Path, quiet_env: None) -> None:
    job = make_job(assets, tmp_path, method="qlora")
    expect(job, tmp_path, "QLoRARequiresCUDA", "CUDA GPU", "method lora")


def test_hub_needs_opt_in(assets: dict[str, Path], tmp_path: Path, quiet_env: None) -> None:
    job = make_job(assets, tmp_path)
    job["spec"]["baseModel"]["uri"] = "hf://meta-llama/Llama-3.2-1B"
    expect(job, tmp_path, "HubAccessDisabled", "GRAFT_ALLOW_HUB=1")


def test_invalid_spec(assets: dict[str, Path], tmp_path: Path, quiet_env: None) -> None:
    job = make_job(assets, tmp_path, gbs=6, mbs=4)
    expect(job, tmp_path, "InvalidSpec", "globalBatchSize", "multiple of microBatchSize")


def test_batch_too_big_for_data(assets: dict[str, Path], tmp_path: Path, quiet_env: None) -> None:
    job = make_job(assets, tmp_path, gbs=4096, mbs=4)
    expect(job, tmp_path, "DatasetTooSmall", "lower globalBatchSize")


def test_process_exits_10_with_termination_message(
    assets: dict[str, Path], tmp_path: Path, quiet_env: None
) -> None:
    """The real entry point: exit code and the message the operator puts in the condition."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    job = make_job(assets, tmp_path)
    job["spec"]["stages"][0]["dataset"]["uri"] = f"file://{bad}"
    reports: list[dict[str, Any]] = []
    res = launch_local(job, workdir=tmp_path / "run", on_progress=reports.append)
    assert res.exit_code == EXIT_USER_ERROR
    assert res.termination is not None
    assert res.termination["reason"] == "MalformedDataset"
    assert res.termination["retryable"] is False
    assert "bad.jsonl line 2" in res.termination["message"]
    assert reports and reports[-1]["state"] == "failed"
    json.dumps(res.termination)
