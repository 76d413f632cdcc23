"""The transformers engine in-process (batching, stops, adapters) and URI resolution."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from servekit import TinyModels

from graft.runtime.serve.engine import EngineError, GenerationRequest
from graft.runtime.serve.storage import StorageError, download, resolve


async def _text(engine: object, req: GenerationRequest) -> str:
    return "".join([d.text async for d in engine.generate(req)])  # type: ignore[attr-defined]


def test_batched_greedy_equals_alone_and_adapters_switch(tiny: TinyModels) -> None:
    from graft.runtime.serve.hf_engine import TransformersEngine

    engine = TransformersEngine(tiny.base)
    prompts = ["the model", "gpu memory latency and throughput", "ray", "adapters change"]

    async def run() -> None:
        await engine.add_adapter("a1", tiny.a1)

        def req(p: str, n: int, adapter: str | None = "a1") -> GenerationRequest:
            return GenerationRequest("t", p, adapter=adapter, max_tokens=n, temperature=0)

        alone = [await _text(engine, req(p, 10)) for p in prompts]
        # Different lengths in one batch: rows finish and leave the KV cache at different steps.
        together = await asyncio.gather(
            *[_text(engine, req(p, 6 + 2 * i)) for i, p in enumerate(prompts)]
        )
        for a, b in zip(alone, together, strict=True):
            assert a[: min(len(a), len(b))] == b[: min(len(a), len(b))]
        base = await _text(engine, req(prompts[0], 10, None))
        assert base != alone[0]
        await engine.remove_adapter("a1")
        assert engine.adapters() == []
        assert await _text(engine, req(prompts[0], 10, None)) == base
        with pytest.raises(EngineError):
            await _text(engine, req(prompts[0], 10))
        with pytest.raises(EngineError, match="maximum context length"):
            await _text(engine, req(prompts[0], 10_000, None))

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


def test_resolve_file_and_pvc(tmp_path: Path) -> None:
    (tmp_path / "claim" / "m").mkdir(parents=True)
    assert resolve(f"file://{tmp_path}/claim/m") == tmp_path / "claim" / "m"
    env = {"GRAFT_PVC_ROOT": str(tmp_path)}
    assert resolve("pvc://claim/m", env) == tmp_path / "claim" / "m"
    with pytest.raises(StorageError, match="not a directory"):
        resolve("pvc://claim/missing", env)


def test_hub_is_off_unless_allowed() -> None:
    with pytest.raises(StorageError, match="GRAFT_ALLOW_HUB"):
        resolve("hf://org/model", {})


def test_download_is_complete_or_absent(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe({"/bucket/ad/adapter_config.json": b"{}", "/bucket/ad/sub/w.bin": b"123"})
    local = download(fs, "memory://bucket/ad", tmp_path / "cache" / "ad")
    assert (local / "adapter_config.json").read_bytes() == b"{}"
    assert (local / "sub" / "w.bin").read_bytes() == b"123"
    fs.rm("/bucket/ad", recursive=True)
    assert download(fs, "memory://bucket/ad", local) == local, "cached copy is reused"
    with pytest.raises(StorageError, match="not found"):
        download(fs, "memory://bucket/other", tmp_path / "cache" / "other")
