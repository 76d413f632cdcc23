"""The engine interface the OpenAI layer talks to, and the factory that picks one.

An engine owns the weights, the adapters and the batching; the OpenAI layer only turns
requests into :class:`GenerationRequest` and streams :class:`GenerationDelta` back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]


class EngineError(Exception):
    """A request the engine refuses; the message is shown to the client (HTTP 400)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to produce; ``adapter`` None means the base model."""

    request_id: str
    prompt: str
    adapter: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Chat templates already carry BOS; plain completions want the tokenizer's own.
    add_special_tokens: bool = True
    # Extra strings that end the output without being part of it (chat fallback turn end).
    implicit_stop: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class GenerationDelta:
    """New text since the previous delta; the last one has ``finish_reason`` set."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None


def chars_per_token_bound(tok: Any) -> int:
    """At least how many characters of text one token can stand for.

    Byte-level BPE spells a token's bytes one character per byte, SentencePiece one
    character per character, so a vocabulary entry is never shorter than the text it
    encodes; the factor 4 covers normalizers that fold several characters into one.
    """
    try:
        longest = max((len(t) for t in tok.get_vocab()), default=1)
    except Exception:
        # A slow tokenizer without a vocabulary listing: assume long tokens.
        longest = 64
    return 4 * max(longest, 1)


def prompt_too_long(max_model_len: int, chars: int) -> EngineError:
    return EngineError(
        f"This model's maximum context length is {max_model_len} tokens and the prompt "
        f"has {chars} characters, more than that many tokens can hold. Shorten the prompt."
    )


class Engine(Protocol):
    """What the OpenAI layer needs from an inference engine."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def tokenizer(self) -> Any:
        """A Hugging Face tokenizer (for chat templates)."""
        ...

    def adapters(self) -> list[str]:
        """Names of the adapters loaded now."""
        ...

    async def add_adapter(self, name: str, path: Path) -> None: ...

    async def remove_adapter(self, name: str) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]: ...

    def check_health(self) -> None:
        """Raise if the engine can no longer serve (Ray Serve then replaces the replica)."""
        ...

    def shutdown(self) -> None: ...


def resolve_engine_name(name: str, *, gpus: float) -> Literal["vllm", "transformers"]:
    """``auto`` means vLLM where there are GPUs and transformers on CPU."""
    if name == "auto":
        return "vllm" if gpus > 0 else "transformers"
    if name in ("vllm", "transformers"):
        return name  # type: ignore[return-value]
    raise ValueError(f"unknown engine {name!r}: use auto, vllm or transformers")


def make_engine(
    name: str,
    model_dir: Path,
    *,
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    gpus: float = 0,
    max_batch_size: int = 8,
) -> Engine:
    resolved = resolve_engine_name(name, gpus=gpus)
    if resolved == "vllm":
        from graft.runtime.serve.vllm_engine import VllmEngine

        return VllmEngine(
            model_dir, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size
        )
    from graft.runtime.serve.hf_engine import TransformersEngine

    return TransformersEngine(model_dir, max_model_len=max_model_len, max_batch_size=max_batch_size)
