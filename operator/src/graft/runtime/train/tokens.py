"""Turning records into training sequences, and reading them back as batches.

Continued pre-training packs documents (each followed by EOS) into fixed-length sequences.
SFT renders a conversation with the tokenizer's chat template (or the built-in one below)
and keeps loss only on assistant tokens: every other label is -100.

Prepared data lives in flat memory-mapped files, so a step's batch is a pure function of
the sequence indices: that is what makes the data position exact on resume.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.prompts import TURN_END, role_header

IGNORE_INDEX = -100


def render_chat(
    tokenizer: Any, messages: Sequence[tuple[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans that carry loss (assistant turns)."""
    eos = tokenizer.eos_token or ""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], tokenize=False
        )
        spans: list[tuple[int, int]] = []
        cursor = 0
        for role, content in messages:
            at = text.find(content, cursor) if content else -1
            if at < 0:
                continue
            end = at + len(content)
            if role == "assistant":
                # The end-of-turn token right after the answer teaches the model to stop.
                tail = text[end:].lstrip(" ")
                if eos and tail.startswith(eos):
                    end = text.index(eos, end) + len(eos)
                spans.append((at, end))
            cursor = end
        return str(text), spans
    parts: list[str] = [tokenizer.bos_token or ""]
    spans = []
    pos = len(parts[0])
    for role, content in messages:
        header = role_header(role)
        parts.append(header)
        pos += len(header)
        body = content + (eos if role == "assistant" else "")
        if role == "assistant":
            spans.append((pos, pos + len(body)))
        parts.append(body)
        pos += len(body)
        parts.append(TURN_END)
        pos += len(TURN_END)
    return "".join(parts), spans


def encode_sft(
    tokenizer: Any, texts_spans: Sequence[tuple[str, list[tuple[int, int]]]], max_len: int
) -> list[tuple[list[int], list[int]] | None]:
    """Token ids and loss mask per conversation; None where truncation left no answer token."""
    enc = tokenizer(
        [t for t, _ in texts_spans],
        add_special_tokens=False,
        return_offsets_mapping=True,
        truncation=False,
    )
    out: list[tuple[list[int], list[int]] | None] = []
    for ids, offsets, (_, spans) in zip(
        enc["input_ids"], enc["offset_mapping"], texts_spans, strict=True
    ):
        mask = [
            1 if any(s <= start < e for s, e in spans) and end > start else 0
            for start, end in offsets
        ]
        ids, mask = list(ids[:max_len]), mask[:max_len]
        # Position 0 is never predicted (labels shift by one), so it does not count.
        out.append((ids, mask) if sum(mask[1:]) > 0 else None)
    return out


@dataclass
class PreparedData:
    """One split of a stage's tokenized data, memory-mapped from ``directory``."""

    directory: Path
    kind: str  # "packed" or "sft"
    seq_len: int
    tokens: np.ndarray[Any, Any]
    mask: np.ndarray[Any, Any] | None
    offsets: np.ndarray[Any, Any] | None
    pad_id: int

    @classmethod
    def open(cls, directory: Path) -> PreparedData:
        meta = json.loads((directory / "meta.json").read_text())
        n_tok = int(meta["tokens"])
        tokens = (
            np.memmap(directory / "tokens.bin", dtype=np.uint32, mode="r", shape=(n_tok,))
            if n_tok
            else np.zeros(0, dtype=np.uint32)
        )
        mask = offsets = None
        if meta["kind"] == "sft":
            mask = (
                np.memmap(directory / "mask.bin", dtype=np.uint8, mode="r", shape=(n_tok,))
                if n_tok
                else np.zeros(0, dtype=np.uint8)
            )
            offsets = np.load(directory / "offsets.npy")
        return cls(
            directory, meta["kind"], int(meta["seqLen"]), tokens, mask, offsets, int(meta["padId"])
        )

    def __len__(self) -> int:
        if self.kind == "packed":
            return len(self.tokens) // self.seq_len
        assert self.offsets is not None
        return len(self.offsets) - 1

    def loss_tokens(self, indices: Sequence[int]) -> int:
        """Tokens that contribute to the loss for these sequences (after the one-token shift)."""
        if self.kind == "packed":
            return len(indices) * (self.seq_len - 1)
        assert self.mask is not None and self.offsets is not None
        total = 0
        for i in indices:
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            total += int(self.mask[a + 1 : b].sum())
        return total

    def tokens_in(self, indices: Sequence[int]) -> int:
        """Non-padding tokens of these sequences (for throughput)."""
        if self.kind == "packed":
            return len(indices) * self.seq_len
        assert self.offsets is not None
        return sum(int(self.offsets[i + 1] - self.offsets[i]) for i in indices)

    def length(self, i: int) -> int:
        """Tokens of sequence ``i`` (the sequence length for packed data)."""
        if self.kind == "packed":
            return self.seq_len
        assert self.offsets is not None
        return int(self.offsets[i + 1] - self.offsets[i])

    def batch(self, indices: Sequence[int], *, left_pad: bool = False) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and labels (-100 where no loss) for these sequences.

        ``left_pad`` (SFT only) pads on the left and adds ``position_ids``, so that every
        row's answer ends at the last column: the columns that carry loss in some row are
        then few (see ``loop.loss_positions``), and the math is that of right padding.
        """
        if self.kind == "packed":
            L = self.seq_len
            rows = np.stack([np.asarray(self.tokens[i * L : (i + 1) * L]) for i in indices])
            t = torch.from_numpy(rows.astype(np.int64))
            return {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t.clone()}
        assert self.mask is not None and self.offsets is not None
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in indices]
        width = max(b - a for a, b in spans)
        ids = np.full((len(spans), width), self.pad_id, dtype=np.int64)
        att = np.zeros((len(spans), width), dtype=np.int64)
        lab = np.full((len(spans), width), IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros((len(spans), width), dtype=np.int64)
        for row, (a, b) in enumerate(spans):
            n = b - a
            cols = slice(width - n, width) if left_pad else slice(0, n)
            toks = np.asarray(self.tokens[a:b], dtype=np.int64)
            ids[row, cols] = toks
            att[row, cols] = 1
            lab[row, cols] = np.where(np.asarray(self.mask[a:b]) > 0, toks, IGNORE_INDEX)
            pos[row, cols] = np.arange(n)
        out = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(att),
            "labels": torch.from_numpy(lab),
        }
        if left_pad:
            out["position_ids"] = torch.from_numpy(pos)
        return out


class ShardWriter:
    """Appends sequences to the flat files of one split; ``close`` writes meta.json."""

    def __init__(self, directory: Path, kind: str, seq_len: int, pad_id: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.kind = kind
        self.seq_len = seq_len
        self.pad_id = pad_id
        self._tok = open(directory / "tokens.bin", "wb")  # noqa: SIM115
        self._mask = open(directory / "mask.bin", "wb") if kind == "sft" else None  # noqa: SIM115
        self._offsets: list[int] = [0]
        self._pending: list[int] = []
        self.n_tokens = 0
        self.n_sequences = 0

    def add_document(self, ids: list[int]) -> None:
        """Packed: append a document's tokens; full sequences are cut from the stream."""
        self._pending.extend(ids)
        L = self.seq_len
        full = len(self._pending) // L * L
        if full:
            np.asarray(self._pending[:full], dtype=np.uint32).tofile(self._tok)
            self.n_tokens += full
            self.n_sequences += full // L
            del self._pending[:full]

    def add_example(self, ids: list[int], mask: list[int]) -> None:
        assert self._mask is not None
        np.asarray(ids, dtype=np.uint32).tofile(self._tok)
        np.asarray(mask, dtype=np.uint8).tofile(self._mask)
        self.n_tokens += len(ids)
        self.n_sequences += 1
        self._offsets.append(self.n_tokens)

    def close(self) -> None:
        # The tail of a packed stream shorter than one sequence is dropped, as in every
        # packed-LM recipe; it is at most seq_len - 1 tokens.
        self._tok.close()
        if self._mask is not None:
            self._mask.close()
            np.save(self.directory / "offsets.npy", np.asarray(self._offsets, dtype=np.int64))
        meta = {
            "kind": self.kind,
            "seqLen": self.seq_len,
            "tokens": self.n_tokens,
            "sequences": self.n_sequences,
            "padId": self.pad_id,
        }
        (self.directory / "meta.json").write_text(json.dumps(meta))
