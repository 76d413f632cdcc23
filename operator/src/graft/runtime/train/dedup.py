"""Cleaning before training: exact and near de-duplication, filters, the train/eval split.

Memory grows with the number of *kept* documents (an 8-byte hash each, plus a MinHash
signature in the LSH index), never with their text, so the pass streams.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from datasketch import MinHash, MinHashLSH

from graft.api.finetunejob import DataPrep

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


class Verdict(StrEnum):
    TRAIN = "train"
    EVAL = "eval"
    EXACT_DUPLICATE = "exact_duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    FILTERED = "filtered"


@dataclass
class DataCounts:
    documents_in: int = 0
    train: int = 0
    eval: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    filtered: int = 0
    too_long: int = 0

    @property
    def documents_out(self) -> int:
        return self.train + self.eval

    @property
    def duplicates_removed(self) -> int:
        return self.exact_duplicates + self.near_duplicates

    def to_json(self) -> dict[str, int]:
        """camelCase, the shape status.data and the progress annotation use."""
        return {
            "documentsIn": self.documents_in,
            "documentsOut": self.documents_out,
            "duplicatesRemoved": self.duplicates_removed,
            "filtered": self.filtered + self.too_long,
            "exactDuplicates": self.exact_duplicates,
            "nearDuplicates": self.near_duplicates,
            "train": self.train,
            "eval": self.eval,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataCounts:
        return cls(**{k: int(v) for k, v in d.items() if k in cls.__dataclass_fields__})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def normalize(text: str) -> str:
    """Case and whitespace folded: what "the same document" means for exact dedup."""
    return _WS.sub(" ", text).strip().lower()


def _hash64(text: str, salt: bytes = b"") -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=salt).digest(), "big"
    )


def in_eval(normalized: str, fraction: float) -> bool:
    """Deterministic split: the same text lands on the same side in every run and on every rank."""
    if fraction <= 0:
        return False
    return _hash64(normalized, salt=b"graft-split") / 2**64 < fraction


class Cleaner:
    """Decides, document by document, whether to keep it and on which side of the split."""

    def __init__(self, prep: DataPrep) -> None:
        self.prep = prep
        self.counts = DataCounts()
        self._seen: set[int] = set()
        near = prep.near_dedup
        self._lsh: MinHashLSH | None = (
            MinHashLSH(threshold=near.threshold, num_perm=near.num_perm) if near.enabled else None
        )
        self._n = 0

    def _quality_ok(self, text: str) -> bool:
        n = len(text)
        if n < self.prep.min_chars or n == 0:
            return False
        if self.prep.max_chars is not None and n > self.prep.max_chars:
            return False
        other = sum(1 for c in text if not (c.isalpha() or c.isspace()))
        return other / n <= self.prep.max_non_alpha_ratio

    def _minhash(self, normalized: str) -> MinHash:
        near = self.prep.near_dedup
        words = _WORD.findall(normalized)
        k = near.shingle_size
        shingles = (
            {" ".join(words[i : i + k]) for i in range(len(words) - k + 1)}
            if len(words) >= k
            else {" ".join(words)}
        )
        m = MinHash(num_perm=near.num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in shingles])
        return m

    def judge(self, text: str) -> Verdict:
        self.counts.documents_in += 1
        if not self._quality_ok(text):
            self.counts.filtered += 1
            return Verdict.FILTERED
        norm = normalize(text)
        if self.prep.exact_dedup:
            h = _hash64(norm)
            if h in self._seen:
                self.counts.exact_duplicates += 1
                return Verdict.EXACT_DUPLICATE
            self._seen.add(h)
        if self._lsh is not None:
            mh = self._minhash(norm)
            if self._lsh.query(mh):
                self.counts.near_duplicates += 1
                return Verdict.NEAR_DUPLICATE
            self._lsh.insert(str(self._n), mh)
            self._n += 1
        if in_eval(norm, self.prep.eval_fraction):
            self.counts.eval += 1
            return Verdict.EVAL
        self.counts.train += 1
        return Verdict.TRAIN
