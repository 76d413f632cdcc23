"""The vLLM engine for GPU replicas: a thin adapter from vLLM's async engine to :class:`Engine`.

vLLM does the batching (continuous, paged KV cache) and multi-LoRA itself; this class
only maps adapter names to ``LoRARequest`` ids and vLLM's delta outputs to
:class:`GenerationDelta`. vLLM is imported lazily: it is installed in the GPU server
image only, and nothing here runs in CI (no GPU); see docs/serving.md.

Why not ``ray.serve.llm``: its OpenAI app names adapters ``<base>:<adapter>`` and loads
them from one shared path prefix on first use, while graft's contract is a plain adapter
name in ``model`` and one URI per adapter hot-added through ``user_config``. Keeping one
OpenAI layer for both engines keeps that contract, the error shapes and the metrics the
same on CPU and GPU.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from graft.runtime.serve.engine import (
    EngineError,
    GenerationDelta,
    GenerationRequest,
    chars_per_token_bound,
    prompt_too_long,
)

_MAX_LORAS = 8


def _vllm(module: str) -> Any:
    # Imported on use: vLLM exists only in the GPU image and has no type stubs.
    return importlib.import_module(module)


class VllmEngine:
    def __init__(
        self,
        model_dir: Path,
        *,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
    ) -> None:
        from transformers import AutoTokenizer

        vllm = _vllm("vllm")

        self._tok: Any = AutoTokenizer.from_pretrained(model_dir)
        engine_args = vllm.AsyncEngineArgs(
            model=str(model_dir),
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            enable_lora=True,
            max_loras=_MAX_LORAS,
            max_lora_rank=64,
            # Inside a Ray Serve replica the GPUs are already this actor's; worker
            # processes on them are simpler than a nested Ray placement group.
            distributed_executor_backend="mp",
        )
        self._engine: Any = vllm.AsyncLLMEngine.from_engine_args(engine_args)
        self._max_model_len = int(max_model_len or self._engine_max_len(model_dir))
        self._max_prompt_chars = self._max_model_len * chars_per_token_bound(self._tok)
        self._loras: dict[str, Any] = {}
        self._ids = itertools.count(1)

    @staticmethod
    def _engine_max_len(model_dir: Path) -> int:
        cfg = json.loads((model_dir / "config.json").read_text())
        return int(cfg.get("max_position_embeddings", 2048))

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def tokenizer(self) -> Any:
        return self._tok

    def adapters(self) -> list[str]:
        return sorted(self._loras)

    async def add_adapter(self, name: str, path: Path) -> None:
        lora_request = _vllm("vllm.lora.request")
        # A fresh id makes vLLM load the new weights even when the name is reused.
        req = lora_request.LoRARequest(
            lora_name=name, lora_int_id=next(self._ids), lora_path=str(path)
        )
        await self._engine.add_lora(req)
        self._loras[name] = req

    async def remove_adapter(self, name: str) -> None:
        req = self._loras.pop(name, None)
        if req is not None:
            await self._engine.remove_lora(req.lora_int_id)

    def check_health(self) -> None:
        if getattr(self._engine, "errored", False):
            raise RuntimeError("vLLM engine errored")

    def shutdown(self) -> None:
        stop = getattr(self._engine, "shutdown", None)
        if stop is not None:
            stop()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        sp = _vllm("vllm.sampling_params")

        lora = None
        if request.adapter is not None:
            lora = self._loras.get(request.adapter)
            if lora is None:
                raise EngineError(f"adapter {request.adapter!r} is not loaded")
        params = sp.SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=list(request.stop + request.implicit_stop) or None,
            seed=request.seed,
            output_kind=sp.RequestOutputKind.DELTA,
        )
        if len(request.prompt) > self._max_prompt_chars:
            raise prompt_too_long(self._max_model_len, len(request.prompt))
        prompt: Any = {"prompt": request.prompt}
        if not request.add_special_tokens:
            # Off the event loop: every other request's stream runs on it.
            ids = await asyncio.to_thread(self._tok, request.prompt, add_special_tokens=False)
            prompt = {"prompt_token_ids": ids["input_ids"]}
        try:
            completion = 0
            async for out in self._engine.generate(
                prompt, params, request.request_id, lora_request=lora
            ):
                o = out.outputs[0]
                completion += len(o.token_ids)
                finish = o.finish_reason if o.finish_reason in ("stop", "length") else None
                if o.finish_reason is not None and finish is None:
                    finish = "stop"
                yield GenerationDelta(
                    text=o.text,
                    prompt_tokens=len(out.prompt_token_ids or []),
                    completion_tokens=completion,
                    finish_reason=finish,
                )
        except ValueError as e:
            # vLLM raises ValueError for prompts longer than max_model_len and the like.
            raise EngineError(str(e)) from e
