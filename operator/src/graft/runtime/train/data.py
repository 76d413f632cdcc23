"""Streaming readers for the four dataset formats (text, jsonl, alpaca, chat).

Readers yield one record at a time from fsspec file objects, so a corpus larger than memory
works; only alpaca files written as one JSON array are loaded whole (JSONL streams).
Every error names the file and line and says how to fix it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from graft.api.finetunejob import Dataset, DatasetFormat, StageType
from graft.runtime.train.config import Location
from graft.runtime.train.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    """One document (continued pre-training) or one conversation (SFT)."""

    text: str
    messages: tuple[tuple[str, str], ...] | None
    source: str

    def key_text(self) -> str:
        """The text that de-duplication and filters look at."""
        if self.messages is None:
            return self.text
        return "\n".join(content for _, content in self.messages)


def list_files(loc: Location) -> list[str]:
    fs = loc.filesystem()
    if not fs.exists(loc.path):
        raise UserError(
            f"dataset {loc.uri} does not exist: check stages[].dataset.uri and that the volume "
            "or bucket holding it is mounted/readable",
            reason="DatasetNotFound",
        )
    if fs.isdir(loc.path):
        files = sorted(
            str(p)
            for p in fs.find(loc.path)
            if not any(part.startswith(".") for part in str(p).split("/")[-1:])
        )
        if not files:
            raise UserError(
                f"dataset {loc.uri} is an empty directory: put the data files there",
                reason="DatasetEmpty",
            )
        return files
    return [loc.path]


def read_records(loc: Location, dataset: Dataset, stage_type: StageType) -> Iterator[Record]:
    """Yield the records of a stage's dataset in a fixed order (files sorted by path)."""
    fmt = dataset.format
    if stage_type == StageType.SFT and fmt in (DatasetFormat.TEXT, DatasetFormat.JSONL):
        raise UserError(
            f"stage type SFT needs instruction data: set dataset.format to alpaca "
            f"(instruction/input/output) or chat (messages), not {fmt.value}",
            reason="InvalidConfig",
        )
    fs = loc.filesystem()
    for path in list_files(loc):
        with fs.open(path, "rt", encoding="utf-8") as f:
            if fmt == DatasetFormat.TEXT:
                yield from _read_text(f, path)
            elif fmt == DatasetFormat.JSONL:
                for n, obj in _read_jsonl(f, path):
                    yield _jsonl_record(obj, path, n, dataset.text_field)
            elif fmt == DatasetFormat.ALPACA:
                yield from _read_alpaca(f, path)
            else:
                for n, obj in _read_jsonl(f, path):
                    yield _chat_record(obj, path, n)


def _read_text(f: Any, path: str) -> Iterator[Record]:
    block: list[str] = []
    start = 1
    for n, line in enumerate(f, start=1):
        if line.strip():
            if not block:
                start = n
            block.append(line.rstrip("\n"))
        elif block:
            yield Record("\n".join(block), None, f"{path}:{start}")
            block = []
    if block:
        yield Record("\n".join(block), None, f"{path}:{start}")


def _read_jsonl(f: Any, path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno}); each line "
                "must be one JSON object: fix or remove that line",
                reason="MalformedDataset",
            ) from None
        if not isinstance(obj, dict):
            raise UserError(
                f"{path} line {n}: expected a JSON object, got {type(obj).__name__}",
                reason="MalformedDataset",
            )
        yield n, obj


def _jsonl_record(obj: dict[str, Any], path: str, n: int, field: str) -> Record:
    text = obj.get(field)
    if not isinstance(text, str):
        raise UserError(
            f"{path} line {n}: no string field {field!r} (keys: {sorted(obj)[:8]}); set "
            "dataset.textField to the key that holds the text",
            reason="MalformedDataset",
        )
    return Record(text, None, f"{path}:{n}")


def _alpaca_record(obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        raise UserError(
            f"{where}: expected an object with instruction/input/output", reason="MalformedDataset"
        )
    instr, inp, out = obj.get("instruction"), obj.get("input", ""), obj.get("output")
    if not isinstance(instr, str) or not isinstance(out, str) or not isinstance(inp, str | None):
        raise UserError(
            f"{where}: alpaca records need string fields 'instruction' and 'output' "
            "('input' optional)",
            reason="MalformedDataset",
        )
    prompt = instr if not inp else f"{instr}\n\n{inp}"
    messages = (("user", prompt), ("assistant", out))
    return Record(prompt + "\n" + out, messages, where)


def _read_alpaca(f: Any, path: str) -> Iterator[Record]:
    head = f.read(1)
    while head and head.isspace():
        head = f.read(1)
    if head == "[":
        try:
            items = json.loads(head + f.read())
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path} line {e.lineno}: not valid JSON ({e.msg}); fix the file or write it "
                "as JSONL, one record per line",
                reason="MalformedDataset",
            ) from None
        for i, obj in enumerate(items):
            yield _alpaca_record(obj, f"{path} record {i}")
        return
    # JSONL: put back the character we peeked at.
    first = head + f.readline()
    lines = iter([first])

    def chain() -> Iterator[str]:
        yield from lines
        yield from f

    for n, obj in _read_jsonl(chain(), path):
        yield _alpaca_record(obj, f"{path} line {n}")


def _chat_record(obj: dict[str, Any], path: str, n: int) -> Record:
    msgs = obj.get("messages")
    where = f"{path} line {n}"
    if not isinstance(msgs, list) or not msgs:
        raise UserError(
            f"{where}: chat records need a non-empty 'messages' list of {{role, content}}",
            reason="MalformedDataset",
        )
    out: list[tuple[str, str]] = []
    for m in msgs:
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise UserError(
                f"{where}: each message needs role (system, user or assistant) and string "
                f"content; got {m!r:.80}",
                reason="MalformedDataset",
            )
        out.append((role, content))
    if not any(r == "assistant" for r, _ in out):
        raise UserError(
            f"{where}: no assistant message, nothing to learn from", reason="MalformedDataset"
        )
    messages = tuple(out)
    return Record("\n".join(c for _, c in messages), messages, where)
