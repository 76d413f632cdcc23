"""spec.evaluation in the trainer, for real on the tiny model: baseline, stages, final, gate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from trainkit import make_job

from graft.api.finetunejob import AnswerMatch, Evaluation, Precision
from graft.runtime.train import run_training
from graft.runtime.train.errors import UserError
from graft.runtime.train.evaluate import Evaluator, greedy, is_right, qa_prompt
from graft.runtime.train.model import load_tokenizer
from graft.testing.corpus import domain_documents, write_jsonl, write_text


@pytest.mark.parametrize(
    ("answer", "expected", "match", "right"),
    [
        ("The code is  E-417.", ["e-417"], AnswerMatch.CONTAINS, True),
        ("The code is E-418.", ["E-417"], AnswerMatch.CONTAINS, False),
        ("E-417.", ["E-417"], AnswerMatch.EXACT, True),
        ("It is E-417", ["E-417"], AnswerMatch.EXACT, False),
        ("torque 45 Nm", ["40 Nm", "45 nm"], AnswerMatch.CONTAINS, True),
        ("", ["x"], AnswerMatch.CONTAINS, False),
    ],
)
def test_answer_matching(answer: str, expected: list[str], match: AnswerMatch, right: bool) -> None:
    assert is_right(answer, expected, match) is right


def test_batched_greedy_with_cache_equals_hf_generate(assets: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(assets["base"]))
    model.eval()
    tok = load_tokenizer(assets["base"])
    prompts = [
        qa_prompt(tok, q) for q in ("gearbox noise?", "How is the pitch motor checked?", "x")
    ]
    assert len({len(p) for p in prompts}) == 3  # left padding is exercised
    ours = greedy(
        model,
        prompts,
        max_new_tokens=12,
        stop_ids=set(),
        pad_id=tok.pad_token_id,
        device=torch.device("cpu"),
        precision=Precision.FP32,
    )
    for p, got in zip(prompts, ours, strict=True):
        ref = model.generate(
            torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12
        )[0, len(p) :].tolist()
        assert got == ref


def test_bad_qa_file_is_a_user_error(assets: dict[str, Path], tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": 3}])
    ev = Evaluation.model_validate(
        {"datasets": [{"name": "facts", "uri": f"file://{bad}", "format": "qa"}]}
    )
    with pytest.raises(UserError, match="line 1: a qa record needs"):
        Evaluator.load(
            ev,
            tmp_path,
            load_tokenizer(assets["base"]),
            seq_len=64,
            micro_batch=2,
            precision=Precision.FP32,
        )


def _evaluation(tmp_path: Path, gate: dict[str, Any]) -> dict[str, Any]:
    held_out = write_text(tmp_path / "heldout.txt", domain_documents(24, seed=99))
    qa = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": f"Which part fails first on turbine {i}?", "answer": "gearbox"}
            for i in range(6)
        ],
    )
    return {
        "datasets": [
            {"name": "manuals", "uri": f"file://{held_out}", "format": "text"},
            {"name": "facts", "uri": f"file://{qa}", "format": "qa"},
        ],
        "gate": gate,
        "maxNewTokens": 8,
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("gate", "passed"),
    [
        ({"maxPerplexityRatio": 0.8, "minScore": 0.0}, True),
        # Perplexity is at least 1, so a ratio of 0.001 to a random model's is out of reach.
        ({"maxPerplexityRatio": 0.001}, False),
    ],
)
def test_evaluation_baseline_stages_final_and_gate(
    assets: dict[str, Path],
    tmp_path: Path,
    quiet_env: None,
    gate: dict[str, Any],
    passed: bool,
) -> None:
    job = make_job(
        assets,
        tmp_path,
        method="full",
        max_steps=10,
        every=100,
        stages=[("ContinuedPretraining", "cpt", "text"), ("SFT", "alpaca", "alpaca")],
        evaluation=_evaluation(tmp_path, gate),
    )
    seen: list[dict[str, Any]] = []
    res = run_training(job, workdir=tmp_path / "w", stdout_progress=False, on_progress=seen.append)
    ev = res.evaluation
    assert ev is not None
    base, (cpt, sft), final = ev["baseline"], ev["stages"], ev["final"]
    assert [cpt["name"], sft["name"]] == ["stage-0", "stage-1"]
    for figures in (base, cpt, sft, final):
        assert figures["perplexity"] == pytest.approx(math.exp(figures["loss"]), rel=1e-3)
        assert 0.0 <= figures["score"] <= 1.0
        assert [d["name"] for d in figures["datasets"]] == ["manuals", "facts"]
        assert figures["datasets"][1]["questions"] == 6
    # Continued pre-training on the domain lowers held-out perplexity well below a random
    # model's (the tiny base is untrained).
    assert cpt["perplexity"] < 0.5 * base["perplexity"]
    assert final == {k: v for k, v in sft.items() if k != "name"}
    assert ev["passed"] is passed
    last = seen[-1]
    assert last["state"] == "succeeded" and last["evaluation"] == ev
    # Each stage-end checkpoint carries the record so far (a resumed run keeps its baseline).
    states = sorted((tmp_path / "ckpt").glob("*/trainer_state.json"))
    saved = json.loads(states[-1].read_text())["evaluation"]
    assert saved["baseline"] == base and len(saved["stages"]) == 2

    # TensorBoard event files next to the checkpoints, read back with TensorBoard's reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "ckpt" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/learning_rate",
        "train/tokens_per_second",
        "eval/perplexity",
        "eval/score",
        "eval/manuals/perplexity",
        "eval/facts/score",
    } <= tags
    # One x axis across both stages: 10 steps each, evaluations at 0, 10 and 20.
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 21))
    assert [e.step for e in acc.Scalars("eval/perplexity")] == [0, 10, 20]
    assert acc.Scalars("eval/perplexity")[0].value == pytest.approx(base["perplexity"], rel=1e-3)


def test_sft_loss_on_answer_positions_equals_the_full_loss(assets: dict[str, Path]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from graft.runtime.train.loop import accepts_logits_to_keep, loss_positions

    torch.manual_seed(0)
    base: Any = AutoModelForCausalLM.from_pretrained(str(assets["base"]))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert accepts_logits_to_keep(model)
    ids = torch.randint(3, 200, (3, 24))
    att = torch.ones_like(ids)
    att[2, 18:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 10:20] = ids[0, 10:20]
    labels[1, 5:9] = ids[1, 5:9]
    labels[2, 12:18] = ids[2, 12:18]
    k = int((labels[:, 1:] != -100).sum())
    extra = loss_positions(labels)
    assert len(extra["logits_to_keep"]) < ids.shape[1] - 5  # prompt positions dropped
    losses, grads = [], []
    for kwargs in ({}, extra):
        model.zero_grad()
        out = model(
            input_ids=ids, attention_mask=att, labels=labels, num_items_in_batch=k, **kwargs
        )
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for g0, g1 in zip(*grads, strict=True):
        assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-6)


def test_left_padded_length_sorted_micro_batches_keep_the_step_gradient(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """The loop's SFT micro-batches (sorted, left-padded, logits only where loss is) give the
    step the same loss and gradients as plain right-padded batches in the given order."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from graft.api.finetunejob import DataPrep, Dataset, StageType
    from graft.runtime.train.config import resolve
    from graft.runtime.train.loop import micro_batches
    from graft.runtime.train.model import load_tokenizer
    from graft.runtime.train.prepare import prepare_stage

    data = prepare_stage(
        loc=resolve(f"file://{assets['alpaca']}", Path("/")),
        dataset=Dataset(uri="file:///x", format="alpaca"),
        prep=DataPrep(eval_fraction=0.0, near_dedup={"enabled": False}),
        stage_type=StageType.SFT,
        seq_len=64,
        tokenizer=load_tokenizer(assets["base"]),
        cache_dir=tmp_path / "cache",
    ).train
    step = list(range(8))
    assert len({data.length(i) for i in step}) > 2  # rows of different lengths
    torch.manual_seed(0)
    base: Any = AutoModelForCausalLM.from_pretrained(str(assets["base"]))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    denom = data.loss_tokens(step)
    plain = [data.batch(step[:4]), data.batch(step[4:])]
    ours = micro_batches(data, step, 4, select=True)
    lengths = [data.length(i) for i in step]
    assert [int(n) for b in ours for n in b["attention_mask"].sum(1)] == sorted(lengths)
    assert (ours[0]["attention_mask"][:, -1] == 1).all()  # left-padded: every row ends last
    assert sum(len(b["logits_to_keep"]) for b in ours) < sum(b["input_ids"].shape[1] for b in plain)
    losses, grads = [], []
    for batches in (plain, ours):
        model.zero_grad()
        total = torch.zeros(())
        for b in batches:
            loss = model(**b, num_items_in_batch=denom, use_cache=False).loss
            loss.backward()
            total += loss.detach()
        losses.append(total)
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for g0, g1 in zip(*grads, strict=True):
        assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-6)
