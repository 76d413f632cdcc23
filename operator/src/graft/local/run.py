"""``graft run``: a FineTuneJob on this machine, through the trainer's local launcher.

The trainer runs as a child process (``python -m graft.runtime.train``, torchrun with N
workers when N > 1), exactly as in a pod; this module turns its progress lines into a
progress bar, its exit into a message, and the terminal's Ctrl-C into the SIGTERM a pod
gets on preemption, so that the trainer checkpoints and ``graft run`` again resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from rich.console import Console
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
)

from graft.api.finetunejob import FineTuneJobSpec
from graft.gate import Verdict, parse_evaluation, verdict
from graft.local import state as st
from graft.local.spec import JobFile, load_job
from graft.procs import descendants

EXIT_OK = 0
EXIT_USER_ERROR = 10
EXIT_RETRYABLE = 20


@dataclass
class RunOptions:
    """What ``graft run`` was told besides the file."""

    workdir: Path = st.DEFAULT_WORKDIR
    pvc_root: Path = st.DEFAULT_PVC_ROOT
    nproc: int | None = None
    fresh: bool = False
    verbose: bool = False
    #: Seconds between the trainer's progress lines (GRAFT_PROGRESS_INTERVAL).
    progress_interval: float = 1.0


@dataclass
class RunResult:
    exit_code: int
    output_uri: str | None = None
    output_path: Path | None = None
    resumed_step: int | None = None
    last_checkpoint: dict[str, Any] | None = None
    termination: dict[str, Any] | None = None


def local_processes(spec: FineTuneJobSpec, cpus: int) -> tuple[int, str]:
    """How many local trainer processes stand for the spec's GPUs, and why.

    One process per requested GPU (``gpus``, or ``nodes`` x ``gpusPerNode``; a CPU-only
    node counts as one), at most one per CPU core, and at most the largest count that
    divides the global batch into whole micro-batches per process (the trainer refuses
    anything else).
    """
    r = spec.resources
    if r.gpus is not None:
        asked, what = max(r.gpus, 1), f"gpus: {r.gpus}"
    elif r.nodes is not None or r.gpus_per_node is not None:
        per_node = r.gpus_per_node or 1
        asked = (r.nodes or 1) * per_node
        what = f"nodes: {r.nodes or 1} x gpusPerNode: {r.gpus_per_node or 'unset'}"
    else:
        asked, what = 1, "no GPU count"
    n = max(1, min(asked, cpus))
    hp = spec.hyperparameters
    while n > 1 and hp.global_batch_size % (hp.micro_batch_size * n):
        n -= 1
    why = f"{what} -> {n} local process{'es' if n > 1 else ''}"
    notes = []
    if asked > cpus:
        notes.append(f"capped at {cpus} CPU core{'s' if cpus > 1 else ''}")
    if n < min(asked, cpus):
        notes.append(
            f"globalBatchSize {hp.global_batch_size} must split into microBatchSize "
            f"{hp.micro_batch_size} x processes"
        )
    return n, why + (f" ({'; '.join(notes)})" if notes else "")


class _TrainerLog:
    """Drains the trainer's stderr (JSON log lines) into trainer.log and picks out events."""

    def __init__(self, path: Path, echo: Console | None) -> None:
        self.path = path
        self.echo = echo
        self.resumed: dict[str, Any] | None = None
        self.errors: list[str] = []
        self._thread: threading.Thread | None = None

    def start(self, stream: IO[str]) -> None:
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[str]) -> None:
        with open(self.path, "a", encoding="utf-8") as out:
            for line in stream:
                out.write(line)
                out.flush()
                if self.echo is not None:
                    self.echo.print(line.rstrip("\n"), markup=False, highlight=False)
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(rec, dict):
                    continue
                if rec.get("msg") == "resuming" and self.resumed is None:
                    self.resumed = rec
                if str(rec.get("level", "")).upper() in ("ERROR", "CRITICAL"):
                    self.errors.append(str(rec.get("msg", "")))

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


class _Interrupts:
    """Ctrl-C (SIGINT), SIGTERM, SIGHUP: the first asks the trainer to checkpoint and stop;
    a second Ctrl-C kills it at once."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.proc: subprocess.Popen[Any] | None = None
        self.count = 0
        self._saved: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._saved[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if self.count == 1:
            self.console.print(
                "[yellow]Stopping: the trainer finishes this step and writes a checkpoint "
                "(Ctrl-C again to kill it without one).[/]"
            )
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        else:
            self.console.print(
                "[red]Killing the trainer; resume starts from the last checkpoint.[/]"
            )
            for pid in reversed([proc.pid, *descendants(proc.pid)]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@dataclass
class _Display:
    """The progress bar, one task per stage, plus event lines printed above it."""

    console: Console
    stages: int
    progress: Progress
    tasks: dict[int, TaskID] = field(default_factory=dict)
    last_ckpt_uri: str | None = None
    evaluations_shown: int = 0

    @classmethod
    def make(cls, console: Console, stages: int) -> _Display:
        progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("[dim]{task.fields[state]}"),
            console=console,
            transient=False,
        )
        return cls(console, stages, progress)

    def update(self, p: dict[str, Any]) -> None:
        idx = int(p.get("stageIndex", 0) or 0)
        name = str(p.get("stage") or f"stage-{idx}")
        desc = f"{idx + 1}/{p.get('stages', self.stages)} {name}"
        total = p.get("totalSteps") or None
        step = int(p.get("step") or 0)
        loss = p.get("loss")
        tps = p.get("tokensPerSecond")
        fields: dict[str, Any] = {
            "loss": f"{loss:.4f}" if isinstance(loss, int | float) else "-",
            "tps": f"{tps:,.0f}" if isinstance(tps, int | float) else "-",
            "eta": p.get("eta") or "-",
            "state": p.get("state") or "",
        }
        if idx not in self.tasks:
            self.tasks[idx] = self.progress.add_task(desc, total=total, completed=step, **fields)
        else:
            self.progress.update(
                self.tasks[idx], description=desc, total=total, completed=step, **fields
            )
        self._show_evaluations(p.get("evaluation"))
        ck = p.get("lastCheckpoint")
        if isinstance(ck, dict) and ck.get("time") and ck.get("uri") != self.last_ckpt_uri:
            self.last_ckpt_uri = str(ck.get("uri"))
            self.console.print(
                f"[dim]checkpoint at step {ck.get('step')}: {ck.get('uri')}[/]", soft_wrap=True
            )

    def _show_evaluations(self, ev: Any) -> None:
        if not isinstance(ev, dict):
            return
        raw = ev.get("stages")
        stages = [x for x in raw if isinstance(x, dict)] if isinstance(raw, list) else []
        base = ev.get("baseline")
        entries = [("baseline", base)] if isinstance(base, dict) else []
        entries += [(str(x.get("name")), x) for x in stages]
        for name, e in entries[self.evaluations_shown :]:
            self.console.print(f"[cyan]evaluation {name}: {_figures(e)}[/]", soft_wrap=True)
        self.evaluations_shown = max(self.evaluations_shown, len(entries))


def _figures(e: dict[str, Any]) -> str:
    parts = []
    if isinstance(e.get("perplexity"), int | float):
        parts.append(f"perplexity {e['perplexity']:.3f} (loss {e.get('loss', 0):.4f})")
    if isinstance(e.get("score"), int | float):
        parts.append(f"score {e['score']:.0%}")
    return ", ".join(parts) or "no figures"


def _gate(spec: FineTuneJobSpec, raw: Any) -> tuple[dict[str, Any] | None, Verdict | None]:
    """The evaluation for the state file, with ``passed`` from the gate (as the operator sets
    it), and the verdict."""
    if spec.evaluation is None:
        return None, None
    parsed = parse_evaluation(raw)
    v = verdict(spec.evaluation, parsed)
    if not isinstance(raw, dict) or v is None:
        return None, v
    return {**raw, "passed": v.passed}, v


def _panel(console: Console, title: str, body: str, style: str = "red") -> None:
    console.print(Panel(body, title=title, border_style=style, title_align="left"))


def run_job(
    path: str | Path,
    opts: RunOptions | None = None,
    *,
    console: Console | None = None,
    job: JobFile | None = None,
) -> RunResult:
    """Run the FineTuneJob in ``path`` here; raises SpecError for an invalid file."""
    from graft.runtime.train import launch_local

    opts = opts or RunOptions()
    console = console or Console(stderr=True)
    job = job or load_job(path)
    spec = job.spec
    workdir = opts.workdir.absolute()
    pvc_root = opts.pvc_root.absolute()
    rdir = st.run_dir(workdir, job.name)

    default_ckpt = "file://" + str(st.default_checkpoint_dir(workdir, job.name))
    ckpt_uri = spec.checkpoint.uri or default_ckpt
    ckpt_path = st.local_path(ckpt_uri, pvc_root)
    if opts.fresh:
        for p in (ckpt_path, rdir):
            if p is not None and p.exists():
                shutil.rmtree(p)
                console.print(f"[dim]--fresh: removed {p}[/]", soft_wrap=True)

    cpus = os.cpu_count() or 1
    if opts.nproc is not None:
        nproc, why = opts.nproc, f"--nproc {opts.nproc}"
    else:
        nproc, why = local_processes(spec, cpus)

    previous = st.read_state(workdir, job.name) or {}
    attempt = int(previous.get("attempt", 0)) + 1
    out_path = st.local_path(spec.output.uri, pvc_root)
    record: dict[str, Any] = {
        "apiVersion": job.body.get("apiVersion"),
        "kind": "FineTuneJob",
        "name": job.name,
        "file": str(job.path.absolute()),
        "phase": "Running",
        "attempt": attempt,
        "processes": nproc,
        "pvcRoot": str(pvc_root),
        "checkpointUri": ckpt_uri,
        "output": {"uri": spec.output.uri, "path": str(out_path) if out_path else None},
        "startTime": st.now(),
        "completionTime": None,
        "exitCode": None,
        "termination": None,
        "progress": None,
        "lastCheckpoint": previous.get("lastCheckpoint"),
        "pid": os.getpid(),
    }
    st.write_state(workdir, job.name, record)

    env = dict(os.environ)
    # Outside a cluster: never try to patch a Pod, even if these leak in from a shell.
    env.pop("POD_NAME", None)
    env.pop("POD_NAMESPACE", None)
    env.setdefault("GRAFT_PROGRESS_INTERVAL", str(opts.progress_interval))
    env["GRAFT_CHECKPOINT_URI"] = ckpt_uri
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")

    config = {
        "name": job.name,
        "namespace": job.namespace,
        "attempt": attempt,
        "resumeFrom": "",
        "spec": job.body["spec"],
    }
    stages = len(spec.stages)
    console.print(
        f"[bold]graft run[/] {job.name}: {stages} stage{'s' if stages > 1 else ''} "
        f"({', '.join(s.type.value for s in spec.stages)}), method {spec.method.value}, "
        f"{why}"
    )
    console.print(f"[dim]checkpoints: {ckpt_uri}   output: {spec.output.uri}[/]", soft_wrap=True)
    console.print(
        f"[dim]trainer log: {rdir / 'trainer.log'}   state: {st.state_path(workdir, job.name)}[/]",
        soft_wrap=True,
    )
    if ckpt_path is not None:
        # The trainer writes TensorBoard event files next to its checkpoints (curves.py).
        tb = ckpt_path / "tensorboard"
        record["tensorboard"] = str(tb)
        console.print(f"[dim]curves: tensorboard --logdir {tb}[/]", soft_wrap=True)

    rdir.mkdir(parents=True, exist_ok=True)
    tlog = _TrainerLog(rdir / "trainer.log", console if opts.verbose else None)
    interrupts = _Interrupts(console)
    display = _Display.make(console, stages)
    resumed_printed = False
    last: dict[str, Any] = {}
    t0 = time.monotonic()

    def announce_resume() -> None:
        nonlocal resumed_printed
        r = tlog.resumed
        if r is None or resumed_printed:
            return
        resumed_printed = True
        s = int(r.get("stage", 0))
        sname = spec.stages[s].name if s < stages else None
        console.print(
            f"[bold cyan]Resumed from checkpoint {r.get('checkpoint')} "
            f"(stage {s + 1}/{stages}{' ' + sname if sname else ''}, step {r.get('step')})[/]",
            soft_wrap=True,
        )

    def on_progress(p: dict[str, Any]) -> None:
        announce_resume()
        last.clear()
        last.update(p)
        display.update(p)

    def hook(proc: subprocess.Popen[str]) -> None:
        interrupts.proc = proc
        if proc.stderr is not None:
            tlog.start(proc.stderr)
        # A Ctrl-C that came while the child was starting has not been passed on yet.
        if interrupts.count:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    interrupts.install()
    try:
        with display.progress:
            run = launch_local(
                config,
                nproc=nproc,
                workdir=rdir,
                pvc_root=pvc_root,
                on_progress=on_progress,
                env=env,
                stderr=subprocess.PIPE,
                popen_hook=hook,
                # Ctrl-C must reach only us: a trainer in our process group would take
                # SIGINT as KeyboardInterrupt and die without its final checkpoint
                new_session=True,
            )
    finally:
        interrupts.restore()
    tlog.join()
    announce_resume()
    elapsed = time.monotonic() - t0

    code = run.exit_code if run.exit_code >= 0 else 128 - run.exit_code
    progress = run.last_progress or (dict(last) if last else None)
    ckpt = (progress or {}).get("lastCheckpoint") or record["lastCheckpoint"]
    result = RunResult(
        exit_code=code,
        resumed_step=int(tlog.resumed["step"]) if tlog.resumed else None,
        last_checkpoint=ckpt,
        termination=run.termination,
    )
    record.update(
        exitCode=code,
        termination=run.termination,
        progress=progress,
        lastCheckpoint=ckpt,
        completionTime=st.now(),
        pid=None,
    )
    if code == EXIT_OK:
        out = (progress or {}).get("output") or {}
        record["phase"] = "Succeeded"
        record["output"] = {
            "uri": out.get("uri", spec.output.uri),
            "kind": out.get("kind"),
            "path": str(out_path) if out_path else None,
        }
        result.output_uri = record["output"]["uri"]
        result.output_path = out_path
        evaluation, gate = _gate(spec, (progress or {}).get("evaluation"))
        record["output"]["promotable"] = gate.promotable if gate else True
        if gate is not None:
            record["evaluation"] = evaluation
            record["evaluationPassed"] = {
                "status": gate.passed is not False,
                "reason": gate.reason,
                "message": gate.message,
            }
        st.write_state(workdir, job.name, record)
        if gate is not None:
            style = "green" if gate.promotable else "bold red"
            console.print(f"[{style}]Evaluation {gate.reason}[/]: {gate.message}", soft_wrap=True)
        console.print(
            f"[bold green]Succeeded[/] in {elapsed:.0f}s: {record['output']['kind'] or 'output'} "
            f"written to {record['output']['uri']}"
            + (f" ({out_path})" if out_path and not spec.output.uri.startswith("file:///") else ""),
            soft_wrap=True,
        )
        return result

    term = run.termination or {}
    message = str(term.get("message") or "")
    reason = str(term.get("reason") or "")
    ck_text = (
        f"checkpoint at step {ckpt['step']} ({ckpt.get('uri')})"
        if isinstance(ckpt, dict) and ckpt.get("step") is not None
        else "no checkpoint yet"
    )
    again = f"graft run {job.path}"
    if code == EXIT_USER_ERROR:
        record["phase"] = "Failed"
        advice = f"Fix the spec or the data, then run [bold]{again}[/] again."
        title = f"Trainer refused the job: {reason or 'user error'} (exit 10)"
    elif code == EXIT_RETRYABLE:
        record["phase"] = "Stopped"
        advice = f"Latest {ck_text}. Run [bold]{again}[/] again to resume from it."
        title = f"Trainer stopped: {reason or 'retryable'} (exit 20)"
    else:
        record["phase"] = "Failed"
        if not message:
            message = "; ".join(tlog.errors[-3:]) or "the trainer died without a message"
        advice = (
            f"See {rdir / 'trainer.log'}. Latest {ck_text}; "
            f"run [bold]{again}[/] again to resume from it."
        )
        title = f"Trainer crashed: {reason or 'exit ' + str(code)}"
    st.write_state(workdir, job.name, record)
    body = (message + "\n\n" if message else "") + advice
    _panel(console, title, body)
    return result
