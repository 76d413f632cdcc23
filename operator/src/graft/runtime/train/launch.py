"""Starting the trainer: in-process, under torchrun in a pod, or as N local processes.

Under torchrun the pod's main process is the elastic agent. torchrun does not pass on the
workers' exit codes, so each worker writes its classified failure to ``GRAFT_EXIT_DIR`` and
the launcher turns them into one exit code and one termination message. The launcher
handles SIGTERM itself (forwarding it to the workers and waiting for their final
checkpoint) instead of letting the agent SIGKILL them 30 seconds later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from graft.procs import children
from graft.runtime.train.config import RuntimeEnv, load_job_config
from graft.runtime.train.errors import (
    EXIT_CRASH,
    EXIT_OK,
    EXIT_RETRYABLE,
    EXIT_USER_ERROR,
    Termination,
    classify,
    write_termination,
)
from graft.runtime.train.progress import start_heartbeat

log = logging.getLogger(__name__)

WORKER_ENV = "GRAFT_TRAIN_WORKER"
EXIT_DIR_ENV = "GRAFT_EXIT_DIR"


def run_worker(env: RuntimeEnv) -> int:
    """One process: run the job, classify any failure, write the termination message."""
    from graft.runtime.train.runner import run_training

    started = False
    try:
        job = load_job_config(env)
        cfg: dict[str, Any] = {
            "name": job.name,
            "namespace": job.namespace,
            "attempt": job.attempt,
            "resumeFrom": job.resume_from,
            "spec": job.spec.wire(),
        }
        run_training(cfg, env=env, handle_sigterm=True)
        return EXIT_OK
    except BaseException as e:  # every way out gets a code and a message
        if isinstance(e, SystemExit) and e.code in (0, None):
            return EXIT_OK
        term = classify(e, started=started)
        level = logging.WARNING if term.code == EXIT_RETRYABLE else logging.ERROR
        log.log(
            level,
            term.message,
            extra={"reason": term.reason, "exitCode": term.code},
            exc_info=term.code == EXIT_CRASH,
        )
        exit_dir = os.environ.get(EXIT_DIR_ENV)
        if exit_dir:
            rank = os.environ.get("RANK", "0")
            _write_json(Path(exit_dir) / f"rank-{rank}.json", {**term.to_json(), "code": term.code})
        else:
            write_termination(env.termination_log, term)
        return term.code


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    try:
        path.write_text(json.dumps(obj))
    except OSError as e:
        log.warning("could not write exit record", extra={"path": str(path), "error": str(e)})


def merge_exit_records(exit_dir: Path) -> Termination | None:
    """The most telling failure of all ranks: a user error wins, then a retryable one."""
    records = []
    for p in sorted(exit_dir.glob("rank-*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        records.append(Termination.from_json(data, int(data.get("code", EXIT_CRASH))))
    if not records:
        return None
    for code in (EXIT_USER_ERROR, EXIT_RETRYABLE):
        for r in records:
            if r.code == code:
                return r
    return records[0]


def torchrun_args(env: RuntimeEnv) -> list[str]:
    args = [
        "--nnodes",
        str(env.nnodes),
        "--nproc-per-node",
        str(env.nproc_per_node),
        # The operator restarts the whole gang from a checkpoint; torchrun must not.
        "--max-restarts",
        "0",
        "--monitor-interval",
        "1",
        # The agent must not own SIGTERM: it would SIGKILL the workers 30 s later, maybe in
        # the middle of their final checkpoint. The launcher forwards it instead.
        "--signals-to-handle",
        "SIGHUP,SIGQUIT",
    ]
    if env.nnodes == 1 and not env.master_addr:
        args.append("--standalone")
    else:
        args += [
            "--node-rank",
            str(env.node_rank),
            "--master-addr",
            env.master_addr or "127.0.0.1",
            "--master-port",
            str(env.master_port),
        ]
    return [*args, "-m", "graft.runtime.train"]


def run_torchrun(env: RuntimeEnv) -> int:
    """This pod's share of the gang: GRAFT_NPROC_PER_NODE workers under torchrun."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torch_run

    exit_dir = Path(tempfile.mkdtemp(prefix="graft-exit-"))
    os.environ[WORKER_ENV] = "1"
    os.environ[EXIT_DIR_ENV] = str(exit_dir)
    terminated = threading.Event()
    me = os.getpid()

    def forward(signum: int, frame: Any) -> None:
        terminated.set()
        for pid in children(me):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    args = get_args_parser().parse_args(torchrun_args(env))
    term: Termination | None
    try:
        torch_run(args)  # type: ignore[no-untyped-call]
        code = EXIT_OK
        term = None
    except ChildFailedError:
        term = merge_exit_records(exit_dir) or Termination(
            EXIT_CRASH,
            "Crashed",
            True,
            "a trainer process died without a message (killed, "
            "or crashed in native code); see the pod log",
        )
        code = term.code
    except SignalException:
        terminated.set()
        term, code = None, EXIT_RETRYABLE
    except Exception as e:
        name = type(e).__name__
        if "Rendezvous" in name or "DistNetworkError" in name or "DistStoreError" in name:
            term = Termination(
                EXIT_RETRYABLE,
                "RendezvousFailed",
                True,
                f"rendezvous with the other pods failed: {e}",
            )
        else:
            term = classify(e, started=False)
        code = term.code
    if terminated.is_set() and code not in (EXIT_OK, EXIT_USER_ERROR):
        term = merge_exit_records(exit_dir) or Termination(
            EXIT_RETRYABLE, "Terminated", True, "SIGTERM; workers stopped"
        )
        code = EXIT_RETRYABLE
    if term is not None:
        write_termination(env.termination_log, term)
        log.warning(term.message, extra={"reason": term.reason, "exitCode": code})
    return code


def main_entry(env: RuntimeEnv | None = None) -> int:
    env = env or RuntimeEnv.from_env()
    launcher = env.launch_world_size > 1 and os.environ.get(WORKER_ENV) != "1"
    # before torch is imported: a gang that is starting up is not hung
    start_heartbeat(env, launcher=launcher)
    if launcher:
        return run_torchrun(env)
    return run_worker(env)


@dataclass
class LocalRun:
    """Result of ``launch_local``: the exit code, the termination message, the last report."""

    exit_code: int
    termination: dict[str, Any] | None
    last_progress: dict[str, Any] | None


def launch_local(
    job_config: Mapping[str, Any],
    *,
    nproc: int = 1,
    workdir: str | Path,
    pvc_root: str | Path | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    env: Mapping[str, str] | None = None,
    stderr: IO[str] | int | None = None,
    popen_hook: Callable[[subprocess.Popen[str]], None] | None = None,
    new_session: bool = False,
) -> LocalRun:
    """Run the job as a child ``python -m graft.runtime.train`` (torchrun when nproc > 1).

    For ``graft run``: the progress lines the trainer prints are parsed and handed to
    ``on_progress``; logs go to ``stderr`` (default: inherited). ``new_session`` keeps the
    trainer out of the terminal's process group, so a Ctrl-C reaches only the caller, which
    then sends SIGTERM (and the trainer checkpoints, as on a pod's preemption).
    """
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    cfg_path = wd / "job.json"
    cfg_path.write_text(json.dumps(dict(job_config)))
    term_path = wd / "termination-log"
    term_path.unlink(missing_ok=True)
    child_env = dict(os.environ if env is None else env)
    child_env.update(
        GRAFT_JOB_CONFIG=str(cfg_path),
        GRAFT_WORKDIR=str(wd / "work"),
        GRAFT_TERMINATION_LOG=str(term_path),
        GRAFT_NNODES="1",
        GRAFT_NPROC_PER_NODE=str(nproc),
    )
    if pvc_root is not None:
        child_env["GRAFT_PVC_ROOT"] = str(pvc_root)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", WORKER_ENV, EXIT_DIR_ENV, "MASTER_ADDR"):
        child_env.pop(k, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "graft.runtime.train"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=child_env,
        text=True,
        start_new_session=new_session,
    )
    if popen_hook is not None:
        popen_hook(proc)
    last: dict[str, Any] | None = None
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        last = report
        if on_progress is not None:
            on_progress(report)
    code = proc.wait()
    term = None
    if term_path.exists():
        try:
            term = json.loads(term_path.read_text())
        except json.JSONDecodeError:
            term = None
    return LocalRun(code, term, last)
