"""``make demo``: the whole flow on one machine, in a few minutes on 2 CPU cores.

1. Generates a tiny random LLaMA (with a tokenizer trained on the corpus), a wind-turbine
   maintenance corpus and an instruction set: nothing is downloaded.
2. Writes a two-stage FineTuneJob (continued pre-training, then LoRA SFT) and a
   ModelService serving the base model plus the job's adapter by name: the same YAML as
   examples/local/.
3. Trains with ``graft run``'s code, serves with ``graft serve``'s code, asks one question
   through the OpenAI API and prints the answer, then shuts Ray down.

Files go where the CLI looks by default (``./.graft``; datasets and models under
``./.graft/pvc``), so afterwards ``graft serve examples/local/modelservice-local.yaml``
serves the same model again. ``python -m graft.demo --prepare`` only generates the inputs,
for replaying the steps by hand (docs/local.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from graft.local import state as st

JOB_NAME = "turbine-assistant"
SERVICE_NAME = "turbine-llm"
CLAIM = "demo"
QUESTION = "What should be done about vibration in the gearbox?"

FINETUNEJOB_YAML = f"""\
# The local demo's training job (make demo; docs/local.md). Run it by hand with
#   python -m graft.demo --prepare        # generates the model and data under .graft/pvc
#   graft run examples/local/finetunejob-local.yaml
# pvc://{CLAIM}/... is read from --pvc-root (default ./.graft/pvc), as a pod reads a claim.
apiVersion: graft.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: {JOB_NAME}
spec:
  baseModel:
    uri: pvc://{CLAIM}/models/tiny-llama
  stages:
    - name: domain
      type: ContinuedPretraining
      dataset:
        uri: pvc://{CLAIM}/datasets/maintenance-logs.txt
        format: text
      hyperparameters:
        maxSteps: 30
        learningRate: 0.01
    - name: sft
      type: SFT
      dataset:
        uri: pvc://{CLAIM}/datasets/instructions.jsonl
        format: alpaca
      hyperparameters:
        maxSteps: 60
        learningRate: 0.01
  data:
    exactDedup: true
    nearDedup:
      enabled: true
      threshold: 0.85
    evalFraction: 0.05
  method: lora
  lora:
    r: 16
    alpha: 32
    dropout: 0.0
    targetModules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
  hyperparameters:
    globalBatchSize: 8
    microBatchSize: 4
    maxSeqLength: 128
    warmupSteps: 2
    precision: fp32
    seed: 7
  resources:
    gpus: 0
  checkpoint:
    every: 10
    keep: 2
  output:
    uri: pvc://{CLAIM}/adapters/{JOB_NAME}
"""

MODELSERVICE_YAML = f"""\
# The local demo's service (make demo; docs/local.md): the base model plus the adapter
# that `graft run examples/local/finetunejob-local.yaml` wrote, found by the job's name.
#   graft serve examples/local/modelservice-local.yaml
apiVersion: graft.dev/v1alpha1
kind: ModelService
metadata:
  name: {SERVICE_NAME}
spec:
  model:
    baseModel:
      uri: pvc://{CLAIM}/models/tiny-llama
    adapters:
      - name: {JOB_NAME}
        fromFineTuneJob: {JOB_NAME}
  engine: transformers
  resources:
    gpusPerReplica: 0
    cpu: "1"
  autoscaling:
    minReplicas: 1
    maxReplicas: 1
"""

#: The trainer's built-in SFT layout (docs/trainer.md) as the tokenizer's chat template, so
#: that serving renders chat prompts exactly as the adapter was trained (the server's
#: fallback for template-less tokenizers, graft.prompts, is the same layout).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}### {{ m['role'] | capitalize }}:\n"
    "{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n\n"
    "{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def prepare(pvc_root: Path, console: Console) -> None:
    """Generate the base model and the datasets under ``pvc_root/demo``."""
    from transformers import AutoTokenizer

    from graft.testing.corpus import (
        domain_documents,
        instruction_records,
        write_jsonl,
        write_text,
    )
    from graft.testing.tiny_model import build_tiny_model

    root = pvc_root / CLAIM
    model_dir = root / "models" / "tiny-llama"
    docs = domain_documents(240, seed=101)
    instructions = instruction_records(480, seed=202)
    write_text(root / "datasets" / "maintenance-logs.txt", docs)
    write_jsonl(root / "datasets" / "instructions.jsonl", instructions)
    build_tiny_model(model_dir, seed=0, max_position_embeddings=256)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(model_dir))
    console.print(
        f"generated under {root}: a random LLaMA (models/tiny-llama), {len(docs)} maintenance "
        f"log documents, {len(instructions)} instructions"
    )


def write_specs(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    job = directory / "finetunejob-local.yaml"
    svc = directory / "modelservice-local.yaml"
    job.write_text(FINETUNEJOB_YAML)
    svc.write_text(MODELSERVICE_YAML)
    return job, svc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m graft.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", type=Path, default=st.DEFAULT_WORKDIR)
    parser.add_argument("--pvc-root", type=Path, default=st.DEFAULT_PVC_ROOT)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--prepare", action="store_true", help="only generate the model and the data"
    )
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    t0 = time.monotonic()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    console.rule("[bold]1. Generate a tiny base model, a domain corpus and instructions")
    prepare(args.pvc_root, console)
    job_file, svc_file = write_specs(args.workdir / "demo")
    if args.prepare:
        console.print(
            "Now: graft run examples/local/finetunejob-local.yaml && "
            "graft serve examples/local/modelservice-local.yaml"
        )
        return 0
    console.print(f"specs: {job_file}, {svc_file} (the same as examples/local/)")

    from graft.local.run import RunOptions, run_job
    from graft.local.serve import ServeOptions, ask, local_service
    from graft.local.spec import load_service

    console.rule("[bold]2. graft run: continued pre-training, then LoRA SFT")
    t1 = time.monotonic()
    result = run_job(
        job_file,
        RunOptions(workdir=args.workdir, pvc_root=args.pvc_root, fresh=True),
        console=console,
    )
    if result.exit_code != 0:
        console.print(f"[red]training failed (exit {result.exit_code}); see above[/]")
        return result.exit_code
    train_s = time.monotonic() - t1

    console.rule("[bold]3. graft serve: base model + adapter on Ray Serve, one question")
    t2 = time.monotonic()
    svc = load_service(svc_file)
    opts = ServeOptions(workdir=args.workdir, pvc_root=args.pvc_root, port=args.port)
    with local_service(svc, opts) as live:
        console.print(
            f"endpoint: [bold]{live.endpoint}[/] (models: {live.model}, {', '.join(live.adapters)})"
        )
        adapter_answer = ask(live.endpoint, JOB_NAME, QUESTION)
        base_answer = ask(live.endpoint, live.model, QUESTION)
    serve_s = time.monotonic() - t2

    console.print(
        Panel(
            f"[bold]Q:[/] {QUESTION}\n\n"
            f"[bold]{JOB_NAME}[/] (base + the adapter just trained):\n{adapter_answer!s}\n\n"
            f"[bold]{SERVICE_NAME}[/] (the base model alone):\n{base_answer!s}",
            title="POST /v1/chat/completions (openai client, temperature 0)",
            title_align="left",
        )
    )
    console.print(
        "Honestly: the base model is a random 150k-parameter LLaMA and the adapter saw 90 "
        "steps of generated text, so expect the shape of a maintenance answer with domain "
        "words, often wrong or repeated, not a correct one; the base model alone has learned "
        "nothing and answers gibberish. Same flow, real model: point "
        "baseModel at LLaMA-class weights and run it on a cluster (README, Install)."
    )
    total = time.monotonic() - t0
    console.print(
        f"[bold]Demo wall time: {total:.0f}s[/] (training {train_s:.0f}s, serving "
        f"{serve_s:.0f}s). Ray is shut down. Replay by hand: graft run "
        "examples/local/finetunejob-local.yaml; graft serve examples/local/modelservice-local.yaml"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
