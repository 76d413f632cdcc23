"""Loading the base model and tokenizer, attaching LoRA, and writing the final output.

Weights come from local paths only (``file://``, ``pvc://``, or ``s3://`` copied to the work
directory first); ``hf://`` needs ``GRAFT_ALLOW_HUB=1``. Hub lookups are always off
(``local_files_only=True``): an air-gapped cluster must not hang on a DNS timeout.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graft.api.finetunejob import FineTuneJobSpec, Method, Precision
from graft.runtime.train.config import Location, resolve
from graft.runtime.train.errors import UserError
from graft.runtime.train.files import share_with_readers

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    config: Any
    source: Path
    is_peft: bool


def model_dir(uri: str, pvc_root: Path, workdir: Path, *, allow_hub: bool) -> Path:
    """A local directory holding the base model, copying it from S3 or the hub if needed."""
    if uri.startswith("hf://"):
        if not allow_hub:
            raise UserError(
                f"baseModel.uri {uri} needs internet access to the Hugging Face hub, which is "
                "off by default: copy the model to a PVC or bucket and use pvc:// or s3://, or "
                "set GRAFT_ALLOW_HUB=1 where egress is allowed",
                reason="HubAccessDisabled",
            )
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(uri[len("hf://") :], cache_dir=str(workdir / "hub")))
    loc = resolve(uri, pvc_root, what="baseModel.uri")
    if not loc.local:
        return _download(loc, workdir)
    path = Path(loc.path)
    if not (path / "config.json").is_file():
        raise UserError(
            f"baseModel.uri {uri}: no config.json in {path}; point it at a directory written "
            "by save_pretrained (config.json, *.safetensors, tokenizer files)",
            reason="ModelNotFound",
        )
    return path


def _download(loc: Location, workdir: Path) -> Path:
    import hashlib

    dest = workdir / "models" / hashlib.sha256(loc.uri.encode()).hexdigest()[:16]
    if (dest / ".complete").exists():
        return dest
    fs = loc.filesystem()
    if not fs.exists(loc.path + "/config.json"):
        raise UserError(f"baseModel.uri {loc.uri}: no config.json there", reason="ModelNotFound")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fs.get(loc.path.rstrip("/") + "/", str(tmp), recursive=True)
    (tmp / ".complete").touch()
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def load_config(path: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def max_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    return None


def check_seq_len(config: Any, seq_len: int, where: str) -> None:
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise UserError(
            f"{where} maxSeqLength {seq_len} is larger than the model's context "
            f"(max_position_embeddings={limit}): set maxSeqLength to {limit} or less",
            reason="SequenceTooLong",
        )


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _module_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}


def load_model(
    spec: FineTuneJobSpec,
    path: Path,
    *,
    device: torch.device,
    precision: Precision,
) -> LoadedModel:
    """The base model on ``device``, with LoRA attached for lora/qlora."""
    from transformers import AutoModelForCausalLM

    method = spec.method
    kwargs: dict[str, Any] = {"local_files_only": True}
    if method == Method.QLORA:
        if device.type != "cuda":
            raise UserError(
                "method qlora quantizes the base model to 4 bits with bitsandbytes, which needs "
                "a CUDA GPU: request GPUs (resources.gpus) or use method lora on CPU",
                reason="QLoRARequiresCUDA",
            )
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as e:  # pragma: no cover - depends on the image
            raise UserError(f"method qlora needs bitsandbytes: {e}") from None
        compute = torch.bfloat16 if precision == Precision.BF16 else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": device.index or 0}
    # Full fine-tuning keeps fp32 master weights (autocast does the low-precision math);
    # a frozen LoRA base on a GPU can live in the compute dtype and halve its memory.
    if method == Method.LORA and device.type == "cuda" and precision != Precision.FP32:
        kwargs["dtype"] = torch.bfloat16 if precision == Precision.BF16 else torch.float16
    elif method == Method.FULL or device.type != "cuda":
        kwargs["dtype"] = torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if method != Method.QLORA:
        model.to(device)
    tokenizer = load_tokenizer(path)
    config = model.config
    is_peft = method in (Method.LORA, Method.QLORA)
    if is_peft:
        from peft import LoraConfig, get_peft_model

        missing = [t for t in spec.lora.target_modules if t not in _module_names(model)]
        if missing:
            linear = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear)
                }
                - {"lm_head"}
            )
            raise UserError(
                f"lora.targetModules {missing} do not exist in this model; pick from {linear}",
                reason="UnknownTargetModules",
            )
        if method == Method.QLORA:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
                model, use_gradient_checkpointing=spec.hyperparameters.gradient_checkpointing
            )
        lcfg = LoraConfig(
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=list(spec.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    if spec.hyperparameters.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return LoadedModel(model, tokenizer, config, path, is_peft)


def save_output(loaded: LoadedModel, spec: FineTuneJobSpec, out: Location, workdir: Path) -> str:
    """Write the adapter or the model (and ``merged/``) to ``output.uri``; returns the kind."""
    model: Any = loaded.model
    kind = "adapter" if loaded.is_peft else "model"
    # Checkpoints may live under output.uri (the default), so the output directory is never
    # replaced wholesale: each result file is moved in with an atomic rename.
    tmp = (Path(out.path) if out.local else workdir) / ".tmp-output"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    loaded.tokenizer.save_pretrained(str(tmp))
    if loaded.is_peft and spec.output.merge:
        if spec.method == Method.QLORA:
            log.warning("output.merge is not supported for qlora (4-bit base); skipped")
        else:
            merged = model.merge_and_unload()
            merged.save_pretrained(str(tmp / "merged"))
            loaded.tokenizer.save_pretrained(str(tmp / "merged"))
    share_with_readers(tmp)
    _fsync_tree(tmp)
    if out.local:
        dest = Path(out.path)
        for entry in sorted(tmp.iterdir()):
            target = dest / entry.name
            if entry.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(entry, target)
        tmp.rmdir()
        _fsync_tree_dir(dest)
    else:
        fs = out.filesystem()
        fs.put(str(tmp) + "/", out.path.rstrip("/") + "/", recursive=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return kind


def _fsync_tree_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
