"""The training loop: a bare PyTorch loop with exactly the work a step needs.

Per optimizer step: gather this rank's share of the global batch, run the micro-batches
(gradient sync only on the last), clip, step optimizer and schedule, zero grads. No
per-step host syncs: losses stay on the device until a report needs them. The loss of a
step is the mean over every loss token of the global batch, whatever the padding and the
split across ranks and micro-batches (the denominator is computed from the data, no
communication needed).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from graft.api.finetunejob import Precision, Scheduler
from graft.runtime.train.tokens import IGNORE_INDEX, PreparedData


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    if precision == Precision.FP32:
        return contextlib.nullcontext()
    if device.type == "cpu" and precision == Precision.FP16:
        # CPU fp16 autocast is slow and has no loss scaler; the caller logs the fallback.
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == Precision.BF16 else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(
    params: list[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    # fused AdamW is the fastest CUDA path; on CPU the default (foreach) is.
    kwargs: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)


def make_scheduler(
    opt: torch.optim.Optimizer, kind: Scheduler, warmup: int, total: int
) -> torch.optim.lr_scheduler.LRScheduler:
    from transformers import get_scheduler

    name = {
        Scheduler.CONSTANT: "constant_with_warmup",
        Scheduler.LINEAR: "linear",
        Scheduler.COSINE: "cosine",
    }[kind]
    sched: torch.optim.lr_scheduler.LRScheduler = get_scheduler(
        name, opt, num_warmup_steps=min(warmup, total), num_training_steps=total
    )
    return sched


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM under the DDP/FSDP/peft wrappers takes ``logits_to_keep``."""
    m: Any = model
    for _ in range(8):
        if isinstance(getattr(m, "module", None), torch.nn.Module):
            m = m.module
        elif callable(getattr(m, "get_base_model", None)):
            m = m.get_base_model()
        else:
            break
    try:
        return "logits_to_keep" in inspect.signature(m.forward).parameters
    except (TypeError, ValueError):
        return False


def loss_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward arguments that compute logits only where some row has a loss token.

    SFT puts loss on the answers only, yet a causal LM projects every position onto the
    vocabulary; for a small model with a large vocabulary (SmolLM2: 49k) that projection and
    its cross-entropy cost about as much as a third of the model. ``logits_to_keep`` keeps
    the positions whose next token carries loss in any row of the batch, and ``shift_labels``
    are those next tokens, so the loss (a sum over the same tokens, divided by the same
    count) is unchanged. Left-padded rows (``micro_batches``) end their answers together,
    so that union is about as wide as the longest answer.
    """
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    keep = (shifted != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    return {"logits_to_keep": keep, "shift_labels": shifted[:, keep].contiguous()}


def micro_batches(
    data: PreparedData, indices: list[int], micro_batch: int, *, select: bool
) -> list[dict[str, torch.Tensor]]:
    """One rank's share of a step, as the micro-batches its forward passes take.

    ``select`` (SFT on a model that takes ``logits_to_keep``): sequences of like length go
    together, left-padded, with ``loss_positions``. The step's gradient is a sum over all its
    sequences whatever the split, so sorting changes no math; it wastes the least padding,
    and with every answer ending at the last column few columns carry loss.
    """
    if select:
        indices = sorted(indices, key=data.length)
    out = []
    for m in range(0, len(indices), micro_batch):
        batch = data.batch(indices[m : m + micro_batch], left_pad=select)
        if select:
            batch.update(loss_positions(batch["labels"]))
        out.append(batch)
    return out


@dataclass(frozen=True)
class Order:
    """Which sequences make up each optimizer step: a pure function of (seed, step)."""

    n_sequences: int
    global_batch: int
    seed: int
    stage: int

    @property
    def steps_per_epoch(self) -> int:
        return self.n_sequences // self.global_batch

    def _perm(self, epoch: int) -> np.ndarray[Any, Any]:
        rng = np.random.default_rng([self.seed, self.stage, epoch])
        return rng.permutation(self.n_sequences)

    def step_indices(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = self._perm_cached(epoch)
        return [int(x) for x in perm[i * self.global_batch : (i + 1) * self.global_batch]]

    def _perm_cached(self, epoch: int) -> np.ndarray[Any, Any]:
        cache: dict[int, np.ndarray[Any, Any]] = self.__dict__.setdefault("_cache", {})
        if epoch not in cache:
            cache.clear()
            cache[epoch] = self._perm(epoch)
        return cache[epoch]

    def epoch_of(self, step: int) -> float:
        return step / max(1, self.steps_per_epoch)


@dataclass
class LoopSpec:
    model: torch.nn.Module  # what forward/backward go through (DDP/FSDP wrapper or the model)
    params: list[torch.nn.Parameter]  # trainable parameters, for clipping
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: PreparedData
    order: Order
    micro_batch: int
    rank: int
    world: int
    device: torch.device
    precision: Precision
    max_grad_norm: float
    scaler: Any = None  # torch.amp.GradScaler for fp16 on CUDA
    clip: Callable[[float], Any] | None = None  # FSDP's own clip_grad_norm_


@dataclass
class StepReport:
    step: int
    tokens: int
    loss: torch.Tensor  # on the device; .item() only when reported


@dataclass
class LoopStats:
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    _pending: list[torch.Tensor] = field(default_factory=list)

    def flush(self) -> None:
        """Move pending device losses to the host (one sync for many steps)."""
        if self._pending:
            self.losses.extend(torch.stack(self._pending).float().tolist())
            self._pending.clear()


def _no_sync(model: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if callable(no_sync) else contextlib.nullcontext()


def train_steps(
    spec: LoopSpec,
    start: int,
    end: int,
    after_step: Callable[[StepReport, LoopStats], bool] | None = None,
    stats: LoopStats | None = None,
) -> tuple[int, LoopStats]:
    """Run optimizer steps ``start..end-1``; ``after_step`` returning True stops early.

    Returns the number of steps completed (the next step to run) and the statistics.
    """
    stats = stats or LoopStats()
    model, opt, sched = spec.model, spec.optimizer, spec.scheduler
    mb, world, rank = spec.micro_batch, spec.world, spec.rank
    per_rank = spec.order.global_batch // world
    accum = per_rank // mb
    device = spec.device
    non_blocking = device.type == "cuda"
    amp = autocast(device, spec.precision)
    select = spec.data.kind == "sft" and accepts_logits_to_keep(model)
    model.train()
    step = start
    t0 = time.perf_counter()
    for step in range(start, end):
        idx = spec.order.step_indices(step)
        denom = spec.data.loss_tokens(idx) / world
        total = torch.zeros((), device=device)
        for m, batch in enumerate(micro_batches(spec.data, idx[rank::world], mb, select=select)):
            b = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
            last = m == accum - 1
            with contextlib.nullcontext() if last else _no_sync(model), amp:
                loss = model(**b, num_items_in_batch=denom, use_cache=False).loss
            if spec.scaler is not None:
                spec.scaler.scale(loss).backward()
            else:
                loss.backward()
            total += loss.detach()
        if spec.scaler is not None:
            spec.scaler.unscale_(opt)
        if spec.max_grad_norm > 0:
            if spec.clip is not None:
                spec.clip(spec.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(spec.params, spec.max_grad_norm)
        if spec.scaler is not None:
            spec.scaler.step(opt)
            spec.scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens = spec.data.tokens_in(idx)
        stats.tokens += tokens
        # ``total`` is this rank's share scaled to the global mean; equal shares make it
        # the global mean on every rank, close enough for reporting.
        stats._pending.append(total)
        if after_step is not None and after_step(StepReport(step + 1, tokens, total), stats):
            stats.seconds += time.perf_counter() - t0
            return step + 1, stats
    stats.seconds += time.perf_counter() - t0
    stats.flush()
    return (step + 1 if end > start else start), stats


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: PreparedData,
    *,
    micro_batch: int,
    rank: int,
    world: int,
    device: torch.device,
    precision: Precision,
    max_sequences: int = 256,
) -> tuple[float, float]:
    """(sum of token losses, loss tokens) over this rank's share of the eval split."""
    n = min(len(data), max_sequences)
    mine = list(range(n))[rank::world]
    loss_sum = 0.0
    count = 0.0
    was_training = model.training
    model.eval()
    for chunk in _chunks(mine, micro_batch):
        b = {k: v.to(device) for k, v in data.batch(chunk).items()}
        k = data.loss_tokens(chunk)
        if k == 0:
            continue
        with autocast(device, precision):
            out = model(**b, num_items_in_batch=k, use_cache=False)
        loss_sum += float(out.loss) * k
        count += k
    if was_training:
        model.train()
    return loss_sum, count


def _chunks(xs: list[int], n: int) -> Iterator[list[int]]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]
