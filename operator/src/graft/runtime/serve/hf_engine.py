"""The transformers engine: CPU serving and tests, with peft multi-adapter and batching.

One worker thread owns the model. Requests queue up; the worker takes the oldest request
and every other waiting request for the same adapter (up to ``max_batch_size``) and decodes
them together, token by token, with a shared KV cache. Rows that finish or whose client
went away are dropped from the batch (and from the cache) at the next step. Requests that
arrive while a batch runs wait for the next batch: static batching per adapter, not vLLM's
continuous batching, which is what the vllm engine is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graft.runtime.serve.engine import (
    EngineError,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    chars_per_token_bound,
    prompt_too_long,
)

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"
_GREEDY_BELOW = 1e-5


@dataclass(eq=False)
class _Pending:
    request: GenerationRequest
    prompt_ids: list[int]
    max_new: int
    generator: Any
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[GenerationDelta | BaseException]
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    emitted: int = 0

    def send(self, item: GenerationDelta | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:
            # The caller's event loop is gone: nobody is listening any more.
            self.cancelled = True


class TransformersEngine:
    """A Hugging Face causal LM plus peft LoRA adapters, batched on one worker thread."""

    def __init__(
        self,
        model_dir: Path,
        *,
        max_model_len: int | None = None,
        max_batch_size: int = 8,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self._device == "cuda" else torch.float32
        self._tok: Any = AutoTokenizer.from_pretrained(model_dir)
        auto: Any = AutoModelForCausalLM
        self._base: Any = auto.from_pretrained(model_dir, dtype=dtype).to(self._device).eval()
        self._peft: Any = None
        cfg = self._base.config
        limit = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self._max_model_len = min(max_model_len, limit) if max_model_len else limit
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self._tok.eos_token_id
        self._eos: set[int] = set(
            eos if isinstance(eos, list) else [eos] if eos is not None else []
        )
        pad = self._tok.pad_token_id
        self._pad = pad if pad is not None else (min(self._eos) if self._eos else 0)
        self._max_batch_size = max_batch_size
        # transformers 5 renamed past_key_values to cache; 4.x only knows the old name.
        params = inspect.signature(type(self._base).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

        # Held by the worker for a whole batch and by adapter changes, so that set_adapter
        # and peft's module surgery never happen under a running forward pass.
        self._model_lock = threading.Lock()
        self._cv = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._stopping = False
        self._dead: BaseException | None = None
        self._max_prompt_chars = self._max_model_len * chars_per_token_bound(self._tok)
        # One thread: a fast tokenizer's Rust object is not meant for concurrent calls, and
        # the length check above bounds how long one call can take.
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="graft-tokenize")
        self._thread = threading.Thread(target=self._run, name="graft-engine", daemon=True)
        self._thread.start()

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def tokenizer(self) -> Any:
        return self._tok

    def adapters(self) -> list[str]:
        peft = self._peft
        return sorted(peft.peft_config) if peft is not None else []

    async def add_adapter(self, name: str, path: Path) -> None:
        await asyncio.to_thread(self._add_adapter, name, path)

    async def remove_adapter(self, name: str) -> None:
        await asyncio.to_thread(self._remove_adapter, name)

    def _add_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        with self._model_lock:
            self._remove_locked(name)
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._base, str(path), adapter_name=name)
                self._peft.eval()
            else:
                self._peft.load_adapter(str(path), adapter_name=name)
        log.info("adapter %s loaded from %s", name, path)

    def _remove_adapter(self, name: str) -> None:
        with self._model_lock:
            self._remove_locked(name)

    def _remove_locked(self, name: str) -> None:
        if self._peft is None or name not in self._peft.peft_config:
            return
        if len(self._peft.peft_config) == 1:
            # peft cannot delete its last adapter; unload() strips the LoRA layers and
            # hands back the plain base model.
            self._base = self._peft.unload()
            self._peft = None
        else:
            self._peft.delete_adapter(name)
        log.info("adapter %s removed", name)

    def check_health(self) -> None:
        if self._dead is not None:
            raise RuntimeError(f"engine worker died: {self._dead!r}")
        if not self._thread.is_alive():
            raise RuntimeError("engine worker thread is not running")

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=10)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        self.check_health()
        if request.adapter is not None and request.adapter not in self.adapters():
            raise EngineError(f"adapter {request.adapter!r} is not loaded")
        if len(request.prompt) > self._max_prompt_chars:
            # No tokenizer run needed: even at the longest token in the vocabulary the
            # prompt cannot fit, and tokenizing megabytes would hold a thread for seconds.
            raise prompt_too_long(self._max_model_len, len(request.prompt))
        gen = self._generator(request.seed)
        loop = asyncio.get_running_loop()
        ids: list[int] = await loop.run_in_executor(
            self._tokenize_pool, self._tokenize, request.prompt, request.add_special_tokens
        )
        if not ids:
            if self._tok.bos_token_id is None:
                raise EngineError("the prompt is empty")
            ids = [self._tok.bos_token_id]
        room = self._max_model_len - len(ids)
        max_new = request.max_tokens if request.max_tokens is not None else room
        if room <= 0 or max_new > room:
            raise EngineError(
                f"This model's maximum context length is {self._max_model_len} tokens. "
                f"However, you requested {len(ids) + max(max_new, 0)} tokens ({len(ids)} in "
                f"the prompt, {max(max_new, 0)} for the completion)."
            )
        pending = _Pending(request, ids, max_new, gen, loop, asyncio.Queue())
        with self._cv:
            self._queue.append(pending)
            self._cv.notify()
        try:
            while True:
                item = await pending.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            pending.cancelled = True

    def _tokenize(self, prompt: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = self._tok(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        return ids

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    for p in self._queue:
                        p.send(RuntimeError("engine shut down"))
                    return
                batch = self._take_batch()
            if not batch:
                continue
            try:
                with self._model_lock:
                    self._decode(batch)
            except EngineError as e:
                for p in batch:
                    p.send(e)
            except Exception as e:
                log.exception("batch failed")
                for p in batch:
                    p.send(e)
            except BaseException as e:
                self._dead = e
                for p in batch:
                    p.send(RuntimeError("engine worker died"))
                raise

    def _take_batch(self) -> list[_Pending]:
        while self._queue and self._queue[0].cancelled:
            self._queue.popleft()
        if not self._queue:
            return []
        adapter = self._queue[0].request.adapter
        batch: list[_Pending] = []
        rest: deque[_Pending] = deque()
        for p in self._queue:
            if p.cancelled:
                continue
            if p.request.adapter == adapter and len(batch) < self._max_batch_size:
                batch.append(p)
            else:
                rest.append(p)
        self._queue = rest
        return batch

    @contextlib.contextmanager
    def _model_for(self, adapter: str | None) -> Iterator[Any]:
        if adapter is None:
            if self._peft is None:
                yield self._base
            else:
                with self._peft.disable_adapter():
                    yield self._peft
            return
        if self._peft is None or adapter not in self._peft.peft_config:
            raise EngineError(f"adapter {adapter!r} was removed")
        self._peft.set_adapter(adapter)
        yield self._peft

    def _decode(self, batch: list[_Pending]) -> None:
        torch = self._torch
        with torch.inference_mode(), self._model_for(batch[0].request.adapter) as model:
            width = max(len(p.prompt_ids) for p in batch)
            input_ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for i, p in enumerate(batch):
                # Left padding keeps every row's next token in the last column.
                input_ids[i, width - len(p.prompt_ids) :] = torch.tensor(p.prompt_ids)
                attn[i, width - len(p.prompt_ids) :] = 1
            input_ids, attn = input_ids.to(self._device), attn.to(self._device)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            gens = [p.generator for p in batch]
            from transformers import DynamicCache

            # The cache is updated in place by every forward, so one object serves the batch.
            cache = DynamicCache()
            kw = {self._cache_kw: cache, "use_cache": True}
            out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, **kw)
            logits = out.logits[:, -1, :]
            rows = list(batch)
            last_pos = pos[:, -1]
            while True:
                tokens = self._sample(logits, rows, gens)
                keep = [i for i, p in enumerate(rows) if not self._advance(p, int(tokens[i]))]
                if not keep:
                    return
                if len(keep) < len(rows):
                    idx = torch.tensor(keep, device=self._device)
                    cache.batch_select_indices(idx)
                    attn, tokens, last_pos = attn[idx], tokens[idx], last_pos[idx]
                    rows = [rows[i] for i in keep]
                    gens = [gens[i] for i in keep]
                attn = torch.cat([attn, attn.new_ones((len(rows), 1))], dim=-1)
                last_pos = last_pos + 1
                out = model(
                    input_ids=tokens[:, None],
                    attention_mask=attn,
                    position_ids=last_pos[:, None],
                    **kw,
                )
                logits = out.logits[:, -1, :]

    def _generator(self, seed: int | None) -> Any:
        """The request's own random generator, made before it joins a batch: a seed that
        torch refuses fails only the request that sent it."""
        g = self._torch.Generator(device=self._device)
        if seed is None:
            g.seed()
            return g
        try:
            g.manual_seed(seed)
        except (RuntimeError, OverflowError, TypeError, ValueError) as e:
            raise EngineError(f"seed {seed} is not usable: give an integer in 0..2^63-1") from e
        return g

    def _sample(self, logits: Any, rows: list[_Pending], gens: list[Any]) -> Any:
        tokens = logits.argmax(dim=-1)
        for i, p in enumerate(rows):
            t, top_p = p.request.temperature, p.request.top_p
            # vLLM's rule: a temperature this close to zero is greedy decoding (dividing by
            # it would overflow the logits to inf).
            if t <= _GREEDY_BELOW:
                continue
            try:
                tokens[i] = self._sample_row(logits[i], t, top_p, gens[i])
            except Exception as e:
                # One row's sampling failing (NaN parameters, for example) ends that row
                # only; the others in the batch carry on.
                log.warning("request %s: sampling failed: %r", p.request.request_id, e)
                p.send(EngineError(f"sampling failed for this request's parameters: {e}"))
                p.cancelled = True
        return tokens

    def _sample_row(self, logits: Any, t: float, top_p: float, gen: Any) -> Any:
        torch = self._torch
        probs = torch.softmax(logits.float() / t, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one).
            drop = sorted_p.cumsum(-1) - sorted_p >= top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return torch.multinomial(probs, 1, generator=gen)[0]

    def _advance(self, p: _Pending, token: int) -> bool:
        """Add one token to a row, send what can be sent; True when the row is finished."""
        if p.cancelled:
            return True
        finish: FinishReason | None = None
        if token in self._eos:
            finish = "stop"
        else:
            p.generated.append(token)
        text = str(self._tok.decode(p.generated, skip_special_tokens=True))
        stops = p.request.stop + p.request.implicit_stop
        cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        elif finish is None and len(p.generated) >= p.max_new:
            finish = "length"
        if finish is None:
            # Hold back what could still become a stop string or is half a UTF-8 character.
            end = len(text) - max((len(s) - 1 for s in stops), default=0)
            while end > p.emitted and text[end - 1] == _REPLACEMENT:
                end -= 1
            if end <= p.emitted:
                return False
        else:
            end = len(text)
        delta = GenerationDelta(
            text=text[p.emitted : end],
            prompt_tokens=len(p.prompt_ids),
            completion_tokens=len(p.generated),
            finish_reason=finish,
        )
        p.emitted = max(p.emitted, end)
        p.send(delta)
        return finish is not None
