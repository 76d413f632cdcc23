"""The data pass of a stage: read, clean, tokenize, write memory-mapped shards.

The result is cached in the work directory under a fingerprint of everything that shapes
it, so a restarted pod with the same scratch volume skips the pass; without the cache the
pass is simply repeated, with the same result (it is deterministic).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graft.api.finetunejob import DataPrep, Dataset, StageType
from graft.runtime.train.config import Location
from graft.runtime.train.data import Record, list_files, read_records
from graft.runtime.train.dedup import Cleaner, DataCounts, Verdict
from graft.runtime.train.errors import UserError
from graft.runtime.train.tokens import PreparedData, ShardWriter, encode_sft, render_chat

log = logging.getLogger(__name__)

BATCH = 256


@dataclass
class PreparedStage:
    train: PreparedData
    eval: PreparedData
    counts: DataCounts
    fingerprint: str


def fingerprint(
    loc: Location,
    dataset: Dataset,
    prep: DataPrep,
    stage_type: StageType,
    seq_len: int,
    tokenizer: Any,
) -> str:
    fs = loc.filesystem()
    files = []
    for path in list_files(loc):
        info = fs.info(path)
        files.append([path, info.get("size"), str(info.get("mtime") or info.get("ETag") or "")])
    vocab = tokenizer.get_vocab()
    tok_hash = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    blob = json.dumps(
        {
            "v": 1,
            "files": files,
            "dataset": dataset.wire(),
            "prep": prep.wire(),
            "type": stage_type.value,
            "seqLen": seq_len,
            "tokenizer": tok_hash,
            "template": getattr(tokenizer, "chat_template", None),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _batches(it: Iterator[Record], n: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for r in it:
        batch.append(r)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare_stage(
    *,
    loc: Location,
    dataset: Dataset,
    prep: DataPrep,
    stage_type: StageType,
    seq_len: int,
    tokenizer: Any,
    cache_dir: Path,
) -> PreparedStage:
    """Clean and tokenize a stage's dataset into ``cache_dir/<fingerprint>`` (or reuse it)."""
    fp = fingerprint(loc, dataset, prep, stage_type, seq_len, tokenizer)
    final = cache_dir / fp
    if (final / "done.json").exists():
        counts = DataCounts.from_dict(json.loads((final / "done.json").read_text())["counts"])
        log.info("reusing prepared data", extra={"dir": str(final)})
        return PreparedStage(
            PreparedData.open(final / "train"), PreparedData.open(final / "eval"), counts, fp
        )
    tmp = cache_dir / f".tmp-{fp}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kind = "packed" if stage_type == StageType.CONTINUED_PRETRAINING else "sft"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = int(pad or 0)
    writers = {
        Verdict.TRAIN: ShardWriter(tmp / "train", kind, seq_len, pad),
        Verdict.EVAL: ShardWriter(tmp / "eval", kind, seq_len, pad),
    }
    cleaner = Cleaner(prep)
    eos = tokenizer.eos_token_id
    for batch in _batches(read_records(loc, dataset, stage_type), BATCH):
        kept = [(r, v) for r in batch if (v := cleaner.judge(r.key_text())) in writers]
        if not kept:
            continue
        if kind == "packed":
            enc = tokenizer([r.text for r, _ in kept], add_special_tokens=False)["input_ids"]
            for (_, v), ids in zip(kept, enc, strict=True):
                writers[v].add_document(list(ids) + ([eos] if eos is not None else []))
        else:
            rendered = [render_chat(tokenizer, r.messages or ()) for r, _ in kept]
            for (_, v), item in zip(kept, encode_sft(tokenizer, rendered, seq_len), strict=True):
                if item is None:
                    cleaner.counts.too_long += 1
                    if v == Verdict.TRAIN:
                        cleaner.counts.train -= 1
                    else:
                        cleaner.counts.eval -= 1
                    continue
                writers[v].add_example(*item)
    for w in writers.values():
        w.close()
    counts = cleaner.counts
    if counts.documents_in == 0:
        raise UserError(
            f"dataset {loc.uri} is empty: it has no {dataset.format.value} records; point "
            "stages[].dataset.uri at the data or fix dataset.format",
            reason="DatasetEmpty",
        )
    if writers[Verdict.TRAIN].n_sequences == 0:
        raise UserError(
            f"dataset {loc.uri}: nothing left to train on after cleaning ({counts.to_json()}); "
            f"with maxSeqLength {seq_len} a packed stage needs at least that many tokens. Add "
            "data, lower maxSeqLength, or relax spec.data (minChars, maxNonAlphaRatio, "
            "nearDedup.threshold)",
            reason="DatasetEmpty",
        )
    (tmp / "done.json").write_text(json.dumps({"counts": counts.as_dict()}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.info("prepared data", extra={"dir": str(final), **counts.to_json()})
    return PreparedStage(
        PreparedData.open(final / "train"), PreparedData.open(final / "eval"), counts, fp
    )
