"""Held-out evaluation (spec.evaluation): perplexity on text sets, a fact score on qa sets.

The trainer evaluates the model before training (the baseline), after each stage, and
reports the last stage's figures as ``final`` (the same weights as the output). The figures
go into the progress JSON as ``evaluation`` (the operator copies them into
status.evaluation) and into ``graft run``'s state file; ``passed`` is the gate's verdict
(graft.gate, the function the operator uses too).

Text sets are scored one document (or conversation) per sequence, cut to the stage's
maxSeqLength, so a figure does not depend on how documents happen to pack: a document
starts after an end-of-sequence token, as it does inside a packed training sequence, and
for alpaca and chat only the answer tokens count, as in SFT. qa sets are answered by greedy
decoding with a KV cache, prompts rendered as ``graft serve`` renders a chat request.

Under torch.distributed every rank scores its share and the sums are all-reduced. Every
rank runs the same number of forward passes (a rank short of work repeats a batch with
weight zero; generation runs its full length), because an FSDP forward is a collective.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graft.api.finetunejob import (
    AnswerMatch,
    Dataset,
    DatasetFormat,
    Evaluation,
    EvaluationDataset,
    EvaluationFormat,
    EvaluationStatus,
    Precision,
    StageType,
)
from graft.gate import parse_evaluation, verdict
from graft.prompts import STOP, generation_prompt
from graft.runtime.train.config import resolve
from graft.runtime.train.data import _read_jsonl, list_files, read_records
from graft.runtime.train.errors import UserError
from graft.runtime.train.loop import autocast
from graft.runtime.train.tokens import IGNORE_INDEX, encode_sft, render_chat

log = logging.getLogger(__name__)

#: Questions answered together by greedy decoding.
QA_BATCH = 32
#: Answers kept per qa set in the report (the progress JSON stays small).
EXAMPLES = 4


@dataclass(frozen=True)
class QAItem:
    question: str
    answers: tuple[str, ...]


@dataclass
class EvalSet:
    """One held-out set, tokenized: scored sequences (text sets) or questions (qa)."""

    name: str
    format: EvaluationFormat
    sequences: list[tuple[list[int], list[int]]] = field(default_factory=list)
    questions: list[QAItem] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)


@dataclass
class Answer:
    question: str
    expected: tuple[str, ...]
    answer: str
    right: bool


@dataclass
class EvalResult:
    """One evaluation of the model on every set."""

    loss: float | None
    perplexity: float | None
    score: float | None
    datasets: list[dict[str, Any]]
    answers: dict[str, list[Answer]]
    seconds: float

    def figures(self) -> dict[str, Any]:
        """loss, perplexity, score (those that exist), as the API's EvaluationMetrics."""
        out: dict[str, Any] = {}
        if self.loss is not None:
            out["loss"] = round(self.loss, 5)
            out["perplexity"] = round(self.perplexity or math.exp(self.loss), 4)
        if self.score is not None:
            out["score"] = round(self.score, 4)
        return out


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def is_right(answer: str, expected: Sequence[str], match: AnswerMatch) -> bool:
    got = normalize(answer)
    for e in expected:
        want = normalize(e)
        if match == AnswerMatch.EXACT and got.rstrip(" .!") == want.rstrip(" .!"):
            return True
        if match == AnswerMatch.CONTAINS and want and want in got:
            return True
    return False


def _read_qa(path: str, fs: Any, limit: int) -> list[QAItem]:
    items: list[QAItem] = []
    with fs.open(path, "rt", encoding="utf-8") as f:
        for n, obj in _read_jsonl(f, path):
            q, a = obj.get("question"), obj.get("answer")
            answers = [a] if isinstance(a, str) else a
            if (
                not isinstance(q, str)
                or not q.strip()
                or not isinstance(answers, list)
                or not answers
                or not all(isinstance(x, str) and x.strip() for x in answers)
            ):
                raise UserError(
                    f"{path} line {n}: a qa record needs a non-empty string 'question' and an "
                    "'answer' that is a non-empty string or a list of them",
                    reason="MalformedDataset",
                )
            items.append(QAItem(q, tuple(answers)))
            if len(items) >= limit:
                break
    return items


def qa_prompt(tokenizer: Any, question: str) -> list[int]:
    """The question as ``graft serve`` would render a one-turn chat request."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = (tokenizer.bos_token or "") + generation_prompt([("user", question)])
    return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])


def load_set(ds: EvaluationDataset, pvc_root: Path, tokenizer: Any, seq_len: int) -> EvalSet:
    where = f"evaluation.datasets[{ds.name}].uri"
    loc = resolve(ds.uri, pvc_root, what=where)
    files = list_files(loc)
    out = EvalSet(ds.name, ds.format)
    if ds.format == EvaluationFormat.QA:
        fs = loc.filesystem()
        for path in files:
            out.questions += _read_qa(path, fs, ds.max_examples - len(out.questions))
            if len(out.questions) >= ds.max_examples:
                break
        if not out.questions:
            raise UserError(f"{ds.uri}: no qa records", reason="DatasetEmpty")
        out.prompts = [qa_prompt(tokenizer, q.question) for q in out.questions]
        return out
    fmt = DatasetFormat(ds.format.value)
    chat = fmt in (DatasetFormat.ALPACA, DatasetFormat.CHAT)
    dataset = Dataset(uri=ds.uri, format=fmt, text_field=ds.text_field)
    records = []
    for r in read_records(loc, dataset, StageType.SFT if chat else StageType.CONTINUED_PRETRAINING):
        records.append(r)
        if len(records) >= ds.max_examples:
            break
    eos = tokenizer.eos_token_id
    if chat:
        rendered = [render_chat(tokenizer, r.messages or ()) for r in records]
        out.sequences = [x for x in encode_sft(tokenizer, rendered, seq_len) if x is not None]
    else:
        lead = [eos] if eos is not None else []
        enc = tokenizer([r.text for r in records], add_special_tokens=False)["input_ids"]
        for ids in enc:
            seq = (lead + list(ids) + lead)[:seq_len]
            if len(seq) >= 2:
                out.sequences.append((seq, [0] * len(lead) + [1] * (len(seq) - len(lead))))
    if not out.sequences:
        raise UserError(
            f"{ds.uri}: no {ds.format.value} records to evaluate on", reason="DatasetEmpty"
        )
    return out


def _share(n: int, rank: int, world: int, per_batch: int) -> list[list[int]]:
    """This rank's batches of indices; every rank gets the same number (some may be empty)."""
    mine = list(range(n))[rank::world]
    batches = math.ceil(math.ceil(n / world) / per_batch)
    return [mine[b * per_batch : (b + 1) * per_batch] for b in range(batches)]


@torch.no_grad()
def _loss_sums(
    module: torch.nn.Module,
    seqs: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    micro_batch: int,
    rank: int,
    world: int,
    device: torch.device,
    precision: Precision,
) -> tuple[float, float]:
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    loss_sum = count = 0.0
    for batch in _share(len(order), rank, world, micro_batch):
        chosen = [order[i] for i in batch] or [order[0]]
        weight = 1.0 if batch else 0.0
        width = max(len(seqs[i][0]) for i in chosen)
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(chosen), width), dtype=torch.long)
        lab = torch.full((len(chosen), width), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(chosen):
            toks, mask = seqs[i]
            t = torch.tensor(toks, dtype=torch.long)
            ids[row, : len(toks)] = t
            att[row, : len(toks)] = 1
            lab[row, : len(toks)] = torch.where(torch.tensor(mask) > 0, t, IGNORE_INDEX)
        k = int((lab[:, 1:] != IGNORE_INDEX).sum())
        if k == 0:
            continue
        with autocast(device, precision):
            out = module(
                input_ids=ids.to(device),
                attention_mask=att.to(device),
                labels=lab.to(device),
                num_items_in_batch=k,
                use_cache=False,
            )
        loss_sum += float(out.loss) * k * weight
        count += k * weight
    return loss_sum, count


@torch.no_grad()
def greedy(
    module: torch.nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
    device: torch.device,
    precision: Precision,
    early_stop: bool = True,
) -> list[list[int]]:
    """Greedy continuations of left-padded ``prompts``, with a KV cache.

    ``early_stop`` False runs all ``max_new_tokens`` steps (ranks of an FSDP model must make
    the same number of forward calls).
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        att[row, width - len(p) :] = 1
    ids, att = ids.to(device), att.to(device)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with autocast(device, precision):
        # Only the last position's logits are needed: the full [batch, length, vocab] tensor
        # would cost as much as the model body for a small model with a large vocabulary.
        out = module(
            input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True, logits_to_keep=1
        )
    # transformers 5.x names the KV cache ``cache``; 4.x ``past_key_values``.
    cache_kw = "cache" if getattr(out, "cache", None) is not None else "past_key_values"
    cache = getattr(out, cache_kw)
    nxt = out.logits[:, -1].argmax(-1)
    last = pos[:, -1]
    gen: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for t in range(max_new_tokens):
        for row, tok in enumerate(nxt.tolist()):
            if not done[row]:
                gen[row].append(int(tok))
                done[row] = int(tok) in stop_ids
        if t == max_new_tokens - 1 or (early_stop and all(done)):
            break
        att = torch.cat([att, torch.ones((len(prompts), 1), dtype=att.dtype, device=device)], 1)
        last = last + 1
        with autocast(device, precision):
            out = module(
                input_ids=nxt[:, None],
                attention_mask=att,
                position_ids=last[:, None],
                use_cache=True,
                **{cache_kw: cache},
            )
        cache = getattr(out, cache_kw)
        nxt = out.logits[:, -1].argmax(-1)
    return gen


def _decode(tokenizer: Any, ids: list[int]) -> str:
    text = str(tokenizer.decode(ids, skip_special_tokens=True))
    if not getattr(tokenizer, "chat_template", None):
        for stop in STOP:
            text = text.split(stop, 1)[0]
    return text.strip()


def _stop_ids(tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if tokenizer.chat_template else None
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return {int(i) for i in ids}


class Evaluator:
    """spec.evaluation for one run: the sets, loaded once, and the record of results."""

    def __init__(
        self,
        evaluation: Evaluation,
        sets: list[EvalSet],
        tokenizer: Any,
        *,
        micro_batch: int,
        precision: Precision,
    ) -> None:
        self.spec = evaluation
        self.sets = sets
        self.tokenizer = tokenizer
        self.micro_batch = micro_batch
        self.precision = precision
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_id = int(pad)
        self.stop_ids = _stop_ids(tokenizer)
        #: The evaluation object of the contract: {baseline, stages, final, passed}.
        self.record: dict[str, Any] = {"baseline": None, "stages": [], "final": None}
        self.last: EvalResult | None = None
        self.history: dict[str, EvalResult] = {}

    @classmethod
    def load(
        cls,
        evaluation: Evaluation,
        pvc_root: Path,
        tokenizer: Any,
        *,
        seq_len: int,
        micro_batch: int,
        precision: Precision,
    ) -> Evaluator:
        sets = [load_set(ds, pvc_root, tokenizer, seq_len) for ds in evaluation.datasets]
        return cls(evaluation, sets, tokenizer, micro_batch=micro_batch, precision=precision)

    def evaluate(
        self,
        module: torch.nn.Module,
        *,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        sync: bool = False,
        comm_device: torch.device | None = None,
    ) -> EvalResult:
        """Score ``module`` on every set. ``sync``: ranks drive one sharded (FSDP) model."""
        t0 = time.monotonic()
        was_training = module.training
        module.eval()
        # Per set: loss sum, loss tokens, right answers, questions (summed over ranks).
        sums = torch.zeros((len(self.sets), 4), dtype=torch.float64)
        answers: dict[str, list[Answer]] = {}
        try:
            for i, s in enumerate(self.sets):
                if s.format != EvaluationFormat.QA:
                    ls, c = _loss_sums(
                        module,
                        s.sequences,
                        pad_id=self.pad_id,
                        micro_batch=self.micro_batch,
                        rank=rank,
                        world=world,
                        device=device,
                        precision=self.precision,
                    )
                    sums[i, 0], sums[i, 1] = ls, c
                    continue
                got: list[Answer] = []
                # A decode step reads every weight once whatever the batch, so large batches
                # cost little more per step than small ones.
                per = max(self.micro_batch, QA_BATCH)
                for batch in _share(len(s.questions), rank, world, per):
                    chosen = batch or [0]
                    gen = greedy(
                        module,
                        [s.prompts[j] for j in chosen],
                        max_new_tokens=self.spec.max_new_tokens,
                        stop_ids=self.stop_ids,
                        pad_id=self.pad_id,
                        device=device,
                        precision=self.precision,
                        early_stop=not sync,
                    )
                    for j, ids in zip(batch, gen, strict=False):
                        q = s.questions[j]
                        text = _decode(self.tokenizer, ids)
                        got.append(
                            Answer(
                                q.question,
                                q.answers,
                                text,
                                is_right(text, q.answers, self.spec.match),
                            )
                        )
                sums[i, 2] = sum(a.right for a in got)
                sums[i, 3] = len(got)
                answers[s.name] = got
        finally:
            if was_training:
                module.train()
        if world > 1:
            t = sums.to(comm_device or device)
            torch.distributed.all_reduce(t)
            sums = t.cpu()
        per_set: list[dict[str, Any]] = []
        for s, (ls, c, right, n) in zip(self.sets, sums.tolist(), strict=True):
            if s.format == EvaluationFormat.QA:
                per_set.append(
                    {
                        "name": s.name,
                        "score": round(right / n, 4) if n else None,
                        "questions": int(n),
                        # A few of this rank's answers, for people reading the report.
                        "examples": [
                            {
                                "question": a.question[:200],
                                "expected": a.expected[0][:200],
                                "answer": a.answer[:300],
                                "right": a.right,
                            }
                            for a in answers.get(s.name, [])[:EXAMPLES]
                        ],
                    }
                )
            else:
                loss = ls / c if c else None
                per_set.append(
                    {
                        "name": s.name,
                        "loss": round(loss, 5) if loss is not None else None,
                        "perplexity": round(math.exp(loss), 4) if loss is not None else None,
                        "tokens": int(c),
                    }
                )
        total = sums.sum(0).tolist()
        loss = total[0] / total[1] if total[1] else None
        score = total[2] / total[3] if total[3] else None
        return EvalResult(
            loss=loss,
            perplexity=math.exp(loss) if loss is not None else None,
            score=score,
            datasets=per_set,
            answers=answers,
            seconds=time.monotonic() - t0,
        )

    # --- the record ------------------------------------------------------------------
    def _entry(self, result: EvalResult) -> dict[str, Any]:
        return {**result.figures(), "datasets": result.datasets}

    def set_baseline(self, result: EvalResult) -> None:
        self.record["baseline"] = self._entry(result)
        self.history["baseline"] = result
        self.last = result

    def add_stage(self, name: str, result: EvalResult) -> None:
        self.record["stages"].append({"name": name, **self._entry(result)})
        self.history[name] = result
        self.last = result

    def finish(self) -> dict[str, Any]:
        """Set ``final`` (the last stage's figures) and ``passed``; returns the record."""
        stages = self.record["stages"]
        if stages:
            self.record["final"] = {k: v for k, v in stages[-1].items() if k != "name"}
        self.record["passed"] = self.verdict_passed()
        return self.record

    def status(self) -> EvaluationStatus:
        parsed = parse_evaluation(self.record)
        return parsed if parsed is not None else EvaluationStatus()

    def verdict_passed(self) -> bool | None:
        v = verdict(self.spec, self.status())
        return v.passed if v is not None else None

    def verdict_message(self) -> str:
        v = verdict(self.spec, self.status())
        return v.message if v is not None else ""

    def restore(self, saved: Any) -> bool:
        """Take the record a checkpoint carried (a resumed run); False when there is none."""
        if not isinstance(saved, dict) or not isinstance(saved.get("stages"), list):
            return False
        self.record = {
            "baseline": saved.get("baseline"),
            "stages": list(saved["stages"]),
            "final": None,
        }
        return True

    def run_at(
        self, name: str, model: torch.nn.Module, raw: torch.nn.Module, d: Any, fsdp: bool
    ) -> EvalResult:
        """Evaluate now (``name``: "baseline" or a stage) and record it.

        A DDP rank holds a full replica, so it scores ``raw`` with no collectives but the
        final sum; FSDP ranks must drive the sharded ``model`` together.
        """
        result = self.evaluate(
            model if fsdp else raw,
            device=d.device,
            rank=d.rank,
            world=d.world_size,
            sync=fsdp,
            comm_device=d.comm_device,
        )
        if name == "baseline":
            self.set_baseline(result)
        else:
            self.add_stage(name, result)
        log.info(
            "evaluation",
            extra={"at": name, **result.figures(), "seconds": round(result.seconds, 1)},
        )
        return result
