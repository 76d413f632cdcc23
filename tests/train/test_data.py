"""Readers, cleaning, split and tokenization: fast, no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graft.api.finetunejob import DataPrep, Dataset, StageType
from graft.runtime.train.config import Location, resolve
from graft.runtime.train.data import read_records
from graft.runtime.train.dedup import Cleaner, Verdict, in_eval, normalize
from graft.runtime.train.errors import UserError
from graft.runtime.train.model import load_tokenizer
from graft.runtime.train.prepare import prepare_stage
from graft.runtime.train.tokens import IGNORE_INDEX, PreparedData, render_chat
from graft.testing.corpus import domain_documents, plant_duplicates, write_jsonl, write_text


def loc(p: Path) -> Location:
    return resolve(f"file://{p}", Path("/nonexistent"))


def test_uri_resolution(tmp_path: Path) -> None:
    assert resolve("pvc://claim/a/b", Path("/mnt/pvc")).path == "/mnt/pvc/claim/a/b"
    assert resolve("file:///x/y", Path("/p")).path == "/x/y"
    s3 = resolve("s3://bucket/key", Path("/p"))
    assert not s3.local and s3.path == "bucket/key"
    with pytest.raises(UserError, match="GRAFT_ALLOW_HUB"):
        resolve("hf://org/data", Path("/p"), what="dataset")


def test_text_blocks_and_directory_order(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second file\n")
    (tmp_path / "d" / "a.txt").write_text("one\nstill one\n\n\n two \n")
    (tmp_path / "d" / ".hidden").write_text("skipped\n")
    recs = list(
        read_records(
            loc(tmp_path / "d"),
            Dataset(uri="file:///x", format="text"),
            StageType.CONTINUED_PRETRAINING,
        )
    )
    assert [r.text for r in recs] == ["one\nstill one", " two ", "second file"]


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(UserError, match=r"x\.jsonl line 4: not valid JSON") as e:
        list(
            read_records(
                loc(p), Dataset(uri="file:///x", format="jsonl"), StageType.CONTINUED_PRETRAINING
            )
        )
    assert e.value.reason == "MalformedDataset"


def test_jsonl_missing_field_says_which_setting(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "x.jsonl", [{"body": "hello"}])
    with pytest.raises(UserError, match="textField"):
        list(
            read_records(
                loc(p), Dataset(uri="file:///x", format="jsonl"), StageType.CONTINUED_PRETRAINING
            )
        )


def test_alpaca_array_and_jsonl_agree(tmp_path: Path) -> None:
    recs = [
        {"instruction": "Do it", "input": "now", "output": "done"},
        {"instruction": "Say hi", "output": "hi"},
    ]
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(recs, indent=2))
    jl = write_jsonl(tmp_path / "a.jsonl", recs)
    ds = Dataset(uri="file:///x", format="alpaca")
    a = list(read_records(loc(arr), ds, StageType.SFT))
    b = list(read_records(loc(jl), ds, StageType.SFT))
    assert [r.messages for r in a] == [r.messages for r in b]
    assert a[0].messages == (("user", "Do it\n\nnow"), ("assistant", "done"))


def test_chat_without_assistant_is_rejected(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError, match="line 1: no assistant message"):
        list(read_records(loc(p), Dataset(uri="file:///x", format="chat"), StageType.SFT))


def test_sft_needs_instruction_format(tmp_path: Path) -> None:
    p = write_text(tmp_path / "t.txt", ["doc"])
    with pytest.raises(UserError, match="alpaca"):
        list(read_records(loc(p), Dataset(uri="file:///x", format="text"), StageType.SFT))


def test_dedup_removes_planted_duplicates_and_keeps_the_rest() -> None:
    docs = domain_documents(150, seed=3)
    planted = plant_duplicates(docs, exact=12, near=9, seed=4)
    cleaner = Cleaner(DataPrep(eval_fraction=0.1))
    kept = [d for d in planted.documents if cleaner.judge(d) in (Verdict.TRAIN, Verdict.EVAL)]
    c = cleaner.counts
    assert c.documents_in == 150 + 12 + 9
    assert c.exact_duplicates == 12
    assert c.near_duplicates == 9
    assert c.filtered == 0
    assert c.documents_out == 150
    # Every kept document is an original or (when it came first) its one-word variant.
    originals = {normalize(d) for d in docs}
    assert all(normalize(d) in originals or "refurbished" in d for d in kept)
    assert len({normalize(d) for d in kept}) == 150
    assert 5 <= c.eval <= 30


def test_filters_length_and_junk() -> None:
    cleaner = Cleaner(DataPrep(min_chars=10, max_chars=200))
    assert cleaner.judge("short") == Verdict.FILTERED
    assert cleaner.judge("x" * 300) == Verdict.FILTERED
    assert cleaner.judge("12345 67890 ||| ### $$$ %%% 0000 1111") == Verdict.FILTERED
    assert cleaner.judge("a perfectly ordinary sentence about gearboxes") != Verdict.FILTERED
    assert cleaner.counts.filtered == 3


def test_split_is_deterministic_and_order_free() -> None:
    docs = [normalize(d) for d in domain_documents(400, seed=5)]
    first = {d for d in docs if in_eval(d, 0.1)}
    again = {d for d in reversed(docs) if in_eval(d, 0.1)}
    assert first == again
    assert 20 <= len(first) <= 60


def test_sft_labels_only_on_the_answer(assets: dict[str, Path], tmp_path: Path) -> None:
    tok = load_tokenizer(assets["base"])
    text, spans = render_chat(tok, [("user", "Which part failed?"), ("assistant", "The gearbox.")])
    assert text[spans[0][0] : spans[0][1]] == "The gearbox.</s>"
    p = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"instruction": f"Which part of turbine T{i:03d} failed?", "output": "The gearbox."}
            for i in range(20)
        ],
    )
    prep = prepare_stage(
        loc=loc(p),
        dataset=Dataset(uri="file:///x", format="alpaca"),
        prep=DataPrep(eval_fraction=0.0, near_dedup={"enabled": False}),
        stage_type=StageType.SFT,
        seq_len=64,
        tokenizer=tok,
        cache_dir=tmp_path / "cache",
    )
    data = prep.train
    assert len(data) == 20 and prep.counts.train == 20
    b = data.batch([0, 1])
    labels = b["labels"][0]
    kept = labels[labels != IGNORE_INDEX].tolist()
    assert tok.decode(kept) == "The gearbox.</s>"
    assert data.loss_tokens([0]) == len(kept)
    # Padding never carries loss and is masked out of attention.
    assert ((b["attention_mask"] == 0) <= (b["labels"] == IGNORE_INDEX)).all()
    # The cache is reused (same fingerprint) rather than rebuilt.
    again = prepare_stage(
        loc=loc(p),
        dataset=Dataset(uri="file:///x", format="alpaca"),
        prep=DataPrep(eval_fraction=0.0, near_dedup={"enabled": False}),
        stage_type=StageType.SFT,
        seq_len=64,
        tokenizer=tok,
        cache_dir=tmp_path / "cache",
    )
    assert again.fingerprint == prep.fingerprint


def test_packing_makes_full_sequences(assets: dict[str, Path], tmp_path: Path) -> None:
    tok = load_tokenizer(assets["base"])
    prep = prepare_stage(
        loc=loc(assets["cpt"]),
        dataset=Dataset(uri="file:///x", format="text"),
        prep=DataPrep(eval_fraction=0.0),
        stage_type=StageType.CONTINUED_PRETRAINING,
        seq_len=32,
        tokenizer=tok,
        cache_dir=tmp_path / "cache",
    )
    data: PreparedData = prep.train
    n_tokens = sum(
        len(tok(d, add_special_tokens=False)["input_ids"]) + 1
        for d in domain_documents(160, seed=11)
    )
    assert len(data) == n_tokens // 32
    b = data.batch([0, 3])
    assert b["input_ids"].shape == (2, 32)
    assert tok.eos_token_id in data.tokens[: 32 * len(data)].tolist()
    assert data.loss_tokens([0, 3]) == 2 * 31
