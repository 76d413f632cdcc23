"""One trainer process running a whole FineTuneJob: the Python API behind the CLI and pods.

``run_training`` is what ``python -m graft.runtime.train`` calls in each process, and what
``graft run`` can call in-process. It validates everything cheap first (fail fast, exit
10), loads the model, prepares each stage's data, resumes from the newest complete
checkpoint, trains the stages in order and writes the output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.api.finetunejob import (
    FineTuneJobSpec,
    Method,
    Parallelism,
    Precision,
    StageType,
)
from graft.runtime.train import distributed as gdist
from graft.runtime.train.checkpoint import (
    CheckpointInfo,
    CheckpointStore,
    FileEntry,
    HashingWriter,
    checkpoint_name,
    load_rng_state,
    load_tensors,
    rng_file,
    rng_state,
    set_rng_state,
)
from graft.runtime.train.config import (
    JobConfig,
    RuntimeEnv,
    checkpoint_every,
    checkpoint_uri,
    default_workdir,
    parse_job_config,
    resolve,
)
from graft.runtime.train.curves import Curves
from graft.runtime.train.data import list_files
from graft.runtime.train.errors import Terminated, TrainerError, UserError, _is_oom
from graft.runtime.train.evaluate import Evaluator
from graft.runtime.train.loop import (
    LoopSpec,
    LoopStats,
    Order,
    StepReport,
    evaluate,
    make_optimizer,
    make_scheduler,
    train_steps,
)
from graft.runtime.train.model import (
    LoadedModel,
    check_seq_len,
    load_config,
    load_model,
    model_dir,
    save_output,
)
from graft.runtime.train.prepare import PreparedStage, prepare_stage
from graft.runtime.train.progress import (
    Heartbeat,
    Reporter,
    format_eta,
    lease_reporter,
    test_only_hang_in_collective,
)

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class StagePlan:
    index: int
    name: str
    type: StageType
    epochs: int
    max_steps: int | None
    learning_rate: float
    warmup_steps: int
    seq_len: int


@dataclass
class StageResult:
    name: str
    type: str
    steps: int
    total_steps: int
    losses: list[float]
    eval_loss: float | None
    tokens_per_second: float | None
    train_seconds: float
    data: dict[str, int]
    resumed_at: int | None = None
    skipped: bool = False

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


@dataclass
class TrainResult:
    """What a finished run produced; on ranks other than 0 ``output_uri`` is still set."""

    output_uri: str
    output_kind: str
    stages: list[StageResult] = field(default_factory=list)
    resumed_from: str | None = None
    last_checkpoint: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d


class StopRequest:
    """SIGTERM (or a caller's event): stop at the next step boundary after a checkpoint."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()
        self.in_loop = False

    def handler(self, signum: int, frame: Any) -> None:
        self.event.set()
        log.warning("stop requested", extra={"signal": signum, "inLoop": self.in_loop})
        if not self.in_loop:
            # Nothing to save yet: stop now instead of preparing data for minutes.
            raise Terminated("SIGTERM before training started; nothing to checkpoint")

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.handler)

    @property
    def requested(self) -> bool:
        return self.event.is_set()


def plan_stages(spec: FineTuneJobSpec) -> list[StagePlan]:
    hp = spec.hyperparameters
    plans = []
    for i, st in enumerate(spec.stages):
        o = st.hyperparameters
        max_steps = o.max_steps if o and o.max_steps is not None else None
        epochs = o.epochs if o and o.epochs is not None else hp.epochs
        if max_steps is None and not (o and o.epochs is not None):
            max_steps = hp.max_steps
        plans.append(
            StagePlan(
                index=i,
                name=st.name or f"stage-{i}",
                type=st.type,
                epochs=epochs,
                max_steps=max_steps,
                learning_rate=o.learning_rate if o and o.learning_rate else hp.learning_rate,
                warmup_steps=(
                    o.warmup_steps if o and o.warmup_steps is not None else hp.warmup_steps
                ),
                seq_len=o.max_seq_length if o and o.max_seq_length else hp.max_seq_length,
            )
        )
    return plans


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _save_torch(obj: Any) -> Callable[[HashingWriter], None]:
    def produce(w: HashingWriter) -> None:
        torch.save(obj, w)  # type: ignore[arg-type]

    return produce


def _save_json(obj: Any) -> Callable[[HashingWriter], None]:
    def produce(w: HashingWriter) -> None:
        w.write(json.dumps(obj, indent=1).encode())

    return produce


class Trainer:
    """State of one process for one run; see ``run_training``."""

    def __init__(
        self,
        job: JobConfig,
        env: RuntimeEnv,
        *,
        on_progress: ProgressCallback | None,
        stop: StopRequest,
        stdout_progress: bool,
    ) -> None:
        self.job = job
        self.spec = job.spec
        self.env = env
        self.on_progress = on_progress
        self.stop = stop
        self.stdout_progress = stdout_progress
        self.started = False
        self.last_ckpt: dict[str, Any] | None = None
        self.evaluator: Evaluator | None = None
        self.curves: Curves | None = None
        self.step_offset = 0  # optimizer steps of the stages before this one (TensorBoard x)

    # --- setup -----------------------------------------------------------------------
    def _validate(self, d: gdist.Dist, plans: list[StagePlan]) -> None:
        spec, hp = self.spec, self.spec.hyperparameters
        for p in plans:
            loc = resolve(
                spec.stages[p.index].dataset.uri,
                self.env.pvc_root,
                what=f"stages[{p.index}].dataset.uri",
            )
            list_files(loc)
        if spec.method == Method.QLORA and d.device.type != "cuda":
            raise UserError(
                "method qlora quantizes the base model to 4 bits with bitsandbytes, which needs "
                "a CUDA GPU: request GPUs (resources.gpus) or use method lora on CPU",
                reason="QLoRARequiresCUDA",
            )
        unit = hp.micro_batch_size * d.world_size
        if hp.global_batch_size % unit:
            fix = unit * max(1, hp.global_batch_size // unit)
            raise UserError(
                f"globalBatchSize {hp.global_batch_size} must be a multiple of microBatchSize "
                f"({hp.micro_batch_size}) x processes ({d.world_size}): use for example {fix}",
                reason="InvalidConfig",
            )

    def _precision(self, device: torch.device) -> Precision:
        p = self.spec.hyperparameters.precision
        if device.type == "cpu" and p == Precision.FP16:
            log.warning("precision fp16 is not supported on CPU; training in fp32")
            return Precision.FP32
        if device.type == "cuda" and p == Precision.BF16 and not torch.cuda.is_bf16_supported():
            raise UserError(
                "precision bf16 needs an Ampere (A100) or newer GPU: use fp16",
                reason="InvalidConfig",
            )
        return p

    def _local_first(self, d: gdist.Dist, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on local rank 0 first (it fills caches), then on the other ranks."""
        if d.local_rank == 0:
            out = fn()
            d.barrier()
            return out
        d.barrier()
        return fn()

    # --- checkpoints -----------------------------------------------------------------
    def _trainable_state(self, raw: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in raw.named_parameters() if p.requires_grad}

    def _save(
        self,
        d: gdist.Dist,
        store: CheckpointStore,
        *,
        stage: StagePlan,
        step: int,
        total: int,
        complete: bool,
        model: torch.nn.Module,
        raw: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any,
        scaler: Any,
        stats: LoopStats,
        reporter: Reporter,
        data_counts: dict[str, int],
        order: Order | None,
    ) -> CheckpointInfo | None:
        t0 = time.monotonic()
        reporter.emit(force=True, state="checkpointing")
        name = checkpoint_name(stage.index, step)
        model_sd: Any
        optim_sd: Any
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
            )
            model_sd, optim_sd = get_state_dict(model, optimizer or [], options=opts)
        else:
            model_sd = self._trainable_state(raw)
            optim_sd = optimizer.state_dict() if optimizer is not None else None
        if d.is_main:
            store.begin(name)
        d.barrier()
        files: dict[str, Callable[[HashingWriter], None]] = {
            rng_file(d.rank): _save_json(rng_state())
        }
        if d.is_main:
            files["model.pt"] = _save_torch(model_sd)
            if optim_sd is not None and not complete:
                files["optimizer.pt"] = _save_torch(optim_sd)
                files["scheduler.pt"] = _save_torch(scheduler.state_dict())
                if scaler is not None:
                    files["scaler.pt"] = _save_torch(scaler.state_dict())
            files["trainer_state.json"] = _save_json(
                {
                    "stage": stage.index,
                    "stageName": stage.name,
                    "step": step,
                    "totalSteps": total,
                    "stageComplete": complete,
                    "epoch": order.epoch_of(step) if order else None,
                    "dataPosition": {
                        "nextStep": step,
                        "sequencesConsumed": step * self.spec.hyperparameters.global_batch_size,
                        "seed": self.spec.hyperparameters.seed,
                    },
                    "worldSize": d.world_size,
                    "method": self.spec.method.value,
                    "recentLosses": stats.losses[-20:],
                    "data": data_counts,
                    "evaluation": self.evaluator.record if self.evaluator else None,
                }
            )
        with reporter.heartbeat.working():
            entries = store.write(name, files)
        gathered = d.gather_objects({k: (v.size, v.sha256) for k, v in entries.items()})
        info: CheckpointInfo | None = None
        if d.is_main:
            merged = {k: FileEntry(*v) for g in gathered for k, v in g.items()}
            info = store.commit(
                name, merged, {"stageComplete": complete, "worldSize": d.world_size}
            )
            self.last_ckpt = {"step": step, "uri": info.uri, "time": info.manifest["time"]}
            size = sum(e.size for e in merged.values())
            secs = time.monotonic() - t0
            log.info(
                "checkpoint written",
                extra={
                    "checkpoint": info.uri,
                    "bytes": size,
                    "seconds": round(secs, 3),
                    "MBps": round(size / 2**20 / max(secs, 1e-9), 1),
                },
            )
        else:
            self.last_ckpt = {"step": step, "uri": store.uri(name), "time": None}
        d.barrier()
        reporter.emit(force=True, state="training", step=step, lastCheckpoint=self.last_ckpt)
        return info

    def _load(
        self,
        ckpt_dir: Path,
        d: gdist.Dist,
        *,
        model: torch.nn.Module,
        raw: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any,
        scaler: Any,
    ) -> None:
        model_sd = load_tensors(ckpt_dir / "model.pt")
        optim_sd = None
        if optimizer is not None:
            optim_sd = load_tensors(ckpt_dir / "optimizer.pt")
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            opts = StateDictOptions(full_state_dict=True, strict=False)
            set_state_dict(
                model,
                optimizer or [],
                model_state_dict=model_sd,
                optim_state_dict=optim_sd or {},
                options=opts,
            )
        else:
            result = raw.load_state_dict(model_sd, strict=False)
            trainable = {n for n, p in raw.named_parameters() if p.requires_grad}
            missing = trainable & set(result.missing_keys)
            if result.unexpected_keys or missing:
                raise UserError(
                    f"checkpoint {ckpt_dir.name} does not match this model/method "
                    f"(unexpected {result.unexpected_keys[:3]}, missing {sorted(missing)[:3]}): "
                    "use a new checkpoint.uri after changing baseModel, method or lora",
                    reason="CheckpointMismatch",
                )
            if optimizer is not None and optim_sd is not None:
                optimizer.load_state_dict(optim_sd)
        if optimizer is not None:
            scheduler.load_state_dict(load_tensors(ckpt_dir / "scheduler.pt"))
            if scaler is not None and (ckpt_dir / "scaler.pt").exists():
                scaler.load_state_dict(load_tensors(ckpt_dir / "scaler.pt"))
        # Every load restores the RNGs, the weights-only one included: a run resumed from a
        # completed stage starts the next stage with the dropout stream the uninterrupted run
        # had there, not the one left by initializing LoRA.
        rng = load_rng_state(ckpt_dir, d.rank, self.env.allow_legacy_pickle)
        if rng is not None:
            set_rng_state(rng)

    # --- the run ---------------------------------------------------------------------
    _fsdp = False

    def run(self) -> TrainResult:
        d = gdist.init()
        lease = lease_reporter(self.env, d.is_main)
        heartbeat = lease.heartbeat if lease is not None else Heartbeat()
        reporter = Reporter(
            enabled=d.is_main,
            interval=self.env.progress_interval,
            lease=lease,
            heartbeat=heartbeat,
            on_progress=self.on_progress,
            stdout=self.stdout_progress,
        )
        try:
            return self._run(d, reporter)
        except BaseException as e:
            if _is_oom(e) and not self.started:
                err = UserError(
                    f"out of memory before the first step ({e}); lower microBatchSize or "
                    "maxSeqLength, turn on gradientCheckpointing, or use method lora/qlora",
                    reason="OutOfMemory",
                )
                reporter.emit(force=True, state="failed", message=err.message)
                raise err from e
            if not isinstance(e, Terminated):
                msg = e.message if isinstance(e, TrainerError) else f"{type(e).__name__}: {e}"
                reporter.emit(force=True, state="failed", message=msg[:500])
            raise
        finally:
            reporter.close()
            if self.curves is not None:
                self.curves.close()

    def _run(self, d: gdist.Dist, reporter: Reporter) -> TrainResult:
        spec, env, hp = self.spec, self.env, self.spec.hyperparameters
        workdir = env.workdir or default_workdir(self.job.name)
        workdir.mkdir(parents=True, exist_ok=True)
        plans = plan_stages(spec)
        reporter.update(stages=len(plans), state="preparing", attempt=self.job.attempt)
        reporter.emit(force=True)
        self._validate(d, plans)
        precision = self._precision(d.device)
        mpath: Path = self._local_first(
            d,
            lambda: model_dir(spec.base_model.uri, env.pvc_root, workdir, allow_hub=env.allow_hub),
        )
        config = load_config(mpath)
        for p in plans:
            check_seq_len(config, p.seq_len, f"stages[{p.index}] ({p.name})")
        # Same seed on every rank for the weights (LoRA init); then a per-rank stream so
        # dropout differs across ranks.
        seed_all(hp.seed)
        loaded = load_model(spec, mpath, device=d.device, precision=precision)
        seed_all(hp.seed + d.rank)
        raw = loaded.model
        params = [p for p in raw.parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in raw.parameters())
        n_train = sum(p.numel() for p in params)
        parallelism = gdist.choose_parallelism(
            spec.resources.parallelism,
            n_params=n_params,
            n_trainable=n_train,
            method=spec.method,
            device=d.device,
        )
        self._fsdp = d.enabled and parallelism == Parallelism.FSDP
        model = gdist.wrap(raw, parallelism, d)
        if self._fsdp:
            params = [p for p in model.parameters() if p.requires_grad]
        log.info(
            "model ready",
            extra={
                "params": n_params,
                "trainable": n_train,
                "parallelism": parallelism.value,
                "device": str(d.device),
                "world": d.world_size,
            },
        )

        ckpt_loc = resolve(checkpoint_uri(spec, env), env.pvc_root, what="checkpoint.uri")
        store = CheckpointStore(ckpt_loc, spec.checkpoint.keep, workdir / "ckpt-staging")
        self.curves = Curves(ckpt_loc, workdir, enabled=d.is_main)
        resume: CheckpointInfo | None = None
        if d.is_main:
            store.clean_stale()
            resume = store.newest_valid()
        resume_name = d.gather_objects(resume.name if resume else None)[0]
        resume_state: dict[str, Any] = {}
        resume_dir: Path | None = None
        if resume_name:
            resume_dir = store.local_dir(resume_name)
            resume_state = json.loads((resume_dir / "trainer_state.json").read_text())
            log.info(
                "resuming",
                extra={
                    "checkpoint": store.uri(resume_name),
                    "stage": resume_state["stage"],
                    "step": resume_state["step"],
                },
            )
            self.last_ckpt = {
                "step": resume_state["step"],
                "uri": store.uri(resume_name),
                "time": None,
            }
            if (
                self.job.resume_from
                and self.job.resume_from.rstrip("/").rsplit("/", 1)[-1] > resume_name
            ):
                log.warning(
                    "newest usable checkpoint is older than the one the operator "
                    "expected (it was damaged or removed)",
                    extra={"expected": self.job.resume_from, "using": resume_name},
                )
            # Weights first, for every case; optimizer state below, for a stage cut short.
            self._load(
                resume_dir, d, model=model, raw=raw, optimizer=None, scheduler=None, scaler=None
            )

        if spec.evaluation is not None:
            self.evaluator = Evaluator.load(
                spec.evaluation,
                env.pvc_root,
                loaded.tokenizer,
                seq_len=max(p.seq_len for p in plans),
                micro_batch=hp.micro_batch_size,
                precision=precision,
            )
            # A resumed run keeps the baseline of the untrained model its checkpoint carries.
            if not resume_name:
                base = self.evaluator.run_at("baseline", model, raw, d, self._fsdp)
                self.curves.evaluation(0, {**base.figures(), "datasets": base.datasets})
            elif not self.evaluator.restore(resume_state.get("evaluation")):
                log.warning("checkpoint carries no evaluation; the baseline is unknown")
            reporter.emit(force=True, evaluation=self.evaluator.record)
        result = TrainResult(
            output_uri=spec.output.uri,
            output_kind="adapter" if loaded.is_peft else "model",
            resumed_from=store.uri(resume_name) if resume_name else None,
        )
        cache_dir = workdir / "data"
        every_steps, every_secs = checkpoint_every(spec)
        for plan in plans:
            r_stage = int(resume_state.get("stage", -1))
            if resume_name and (
                r_stage > plan.index
                or (r_stage == plan.index and resume_state.get("stageComplete"))
            ):
                result.stages.append(
                    StageResult(
                        plan.name, plan.type.value, 0, 0, [], None, None, 0.0, {}, skipped=True
                    )
                )
                self.step_offset += plan.max_steps or 0
                continue
            if self.stop.requested:
                raise Terminated("stop requested between stages; the last checkpoint is current")
            res = self._train_stage(
                d,
                reporter,
                plan,
                model=model,
                raw=raw,
                loaded=loaded,
                params=params,
                precision=precision,
                store=store,
                cache_dir=cache_dir,
                every_steps=every_steps,
                every_secs=every_secs,
                resume_dir=resume_dir if r_stage == plan.index else None,
                resume_step=int(resume_state.get("step", 0)) if r_stage == plan.index else 0,
            )
            result.stages.append(res)
        reporter.emit(force=True, state="checkpointing")
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            full = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            if d.is_main:
                raw.load_state_dict(full, strict=False)
        if d.is_main:
            out = resolve(spec.output.uri, env.pvc_root, what="output.uri")
            kind = save_output(loaded, spec, out, workdir)
            result.output_kind = kind
            log.info("output written", extra={"uri": spec.output.uri, "kind": kind})
        d.barrier()
        result.last_checkpoint = self.last_ckpt
        if self.evaluator is not None:
            result.evaluation = self.evaluator.finish()
            reporter.update(evaluation=result.evaluation)
        reporter.emit(
            force=True,
            state="succeeded",
            output={"uri": spec.output.uri, "kind": result.output_kind},
        )
        return result

    def _train_stage(
        self,
        d: gdist.Dist,
        reporter: Reporter,
        plan: StagePlan,
        *,
        model: torch.nn.Module,
        raw: torch.nn.Module,
        loaded: LoadedModel,
        params: list[torch.nn.Parameter],
        precision: Precision,
        store: CheckpointStore,
        cache_dir: Path,
        every_steps: int | None,
        every_secs: float | None,
        resume_dir: Path | None,
        resume_step: int,
    ) -> StageResult:
        spec, env, hp = self.spec, self.env, self.spec.hyperparameters
        stage = spec.stages[plan.index]
        reporter.emit(
            force=True,
            state="preparing",
            stage=plan.name,
            stageIndex=plan.index,
            step=0,
            totalSteps=None,
            loss=None,
        )
        loc = resolve(stage.dataset.uri, env.pvc_root, what=f"stages[{plan.index}].dataset.uri")
        prepared: PreparedStage = self._local_first(
            d,
            lambda: prepare_stage(
                loc=loc,
                dataset=stage.dataset,
                prep=spec.data,
                stage_type=plan.type,
                seq_len=plan.seq_len,
                tokenizer=loaded.tokenizer,
                cache_dir=cache_dir,
            ),
        )
        counts = prepared.counts.to_json()
        order = Order(len(prepared.train), hp.global_batch_size, hp.seed, plan.index)
        if order.steps_per_epoch == 0:
            raise UserError(
                f"stage {plan.name}: {len(prepared.train)} training sequences after cleaning, "
                f"fewer than globalBatchSize {hp.global_batch_size}: lower globalBatchSize or "
                "add data",
                reason="DatasetTooSmall",
            )
        total = plan.max_steps or plan.epochs * order.steps_per_epoch
        optimizer = make_optimizer(params, plan.learning_rate, hp.weight_decay, d.device)
        scheduler = make_scheduler(optimizer, hp.scheduler, plan.warmup_steps, total)
        scaler = (
            torch.amp.GradScaler("cuda")
            if precision == Precision.FP16 and d.device.type == "cuda"
            else None
        )
        start = 0
        if resume_dir is not None and resume_step < total:
            self._load(
                resume_dir,
                d,
                model=model,
                raw=raw,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
            )
            start = resume_step
        clip = getattr(model, "clip_grad_norm_", None) if self._fsdp else None
        curves = self.curves
        assert curves is not None
        curves.start_stage(plan.name, plan.index, self.step_offset, start)
        spec_loop = LoopSpec(
            model=model,
            params=params,
            optimizer=optimizer,
            scheduler=scheduler,
            data=prepared.train,
            order=order,
            micro_batch=hp.micro_batch_size,
            rank=d.rank,
            world=d.world_size,
            device=d.device,
            precision=precision,
            max_grad_norm=hp.max_grad_norm,
            scaler=scaler,
            clip=clip,
        )
        stats = LoopStats()
        last_save = time.monotonic()
        window = {"t": time.monotonic(), "tokens": 0, "steps": 0}
        tps: list[float | None] = [None]
        reporter.emit(
            force=True,
            state="training",
            data=counts,
            totalSteps=total,
            step=start,
            epoch=round(order.epoch_of(start), 4),
            lastCheckpoint=self.last_ckpt,
        )

        def after_step(rep: StepReport, st: LoopStats) -> bool:
            nonlocal last_save
            self.started = True
            test_only_hang_in_collective(
                self.job.name, d.rank, d.world_size, self.job.attempt, rep.step
            )
            reporter.beat()
            window["tokens"] += rep.tokens
            window["steps"] += 1
            due_steps = bool(every_steps) and rep.step % (every_steps or 1) == 0
            due_time = every_secs is not None and time.monotonic() - last_save >= every_secs
            due_time, stop = d.any_flag(due_time, self.stop.requested)
            final = rep.step >= total
            if reporter.due() or stop or final:
                st.flush()
                curves.losses(st.losses, start)
                dt_ = time.monotonic() - window["t"]
                if dt_ > 0 and window["steps"]:
                    tps[0] = window["tokens"] / dt_
                    eta = (total - rep.step) * dt_ / window["steps"]
                else:
                    eta = None
                window.update(t=time.monotonic(), tokens=0, steps=0)
                curves.scalars(
                    rep.step,
                    learning_rate=float(scheduler.get_last_lr()[0]),
                    tokens_per_second=tps[0],
                )
                reporter.emit(
                    step=rep.step,
                    loss=round(st.losses[-1], 5) if st.losses else None,
                    epoch=round(order.epoch_of(rep.step), 4),
                    tokensPerSecond=round(tps[0], 1) if tps[0] else None,
                    eta=format_eta(eta),
                )
            if (due_steps or due_time or stop) and not final:
                self._save(
                    d,
                    store,
                    stage=plan,
                    step=rep.step,
                    total=total,
                    complete=False,
                    model=model,
                    raw=raw,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    stats=st,
                    reporter=reporter,
                    data_counts=counts,
                    order=order,
                )
                last_save = time.monotonic()
                window.update(t=time.monotonic(), tokens=0, steps=0)
            return stop

        self.stop.in_loop = True
        try:
            with reporter.heartbeat.loop():
                done, stats = train_steps(spec_loop, start, total, after_step, stats)
        finally:
            self.stop.in_loop = False
        stats.flush()
        if done < total:
            raise Terminated(
                f"SIGTERM at step {done} of stage {plan.name}; checkpoint "
                f"{self.last_ckpt['uri'] if self.last_ckpt else '(none)'} written; the job "
                "resumes from it"
            )
        eval_loss = None
        if len(prepared.eval):
            s, c = evaluate(
                model,
                prepared.eval,
                micro_batch=hp.micro_batch_size,
                rank=d.rank,
                world=d.world_size,
                device=d.device,
                precision=precision,
            )
            if d.enabled:
                t = torch.tensor([s, c], dtype=torch.float64, device=d.comm_device)
                torch.distributed.all_reduce(t)
                s, c = float(t[0]), float(t[1])
            eval_loss = s / c if c else None
        curves.losses(stats.losses, start)
        if self.evaluator is not None:
            ev = self.evaluator.run_at(plan.name, model, raw, d, self._fsdp)
            curves.evaluation(self.step_offset + total, {**ev.figures(), "datasets": ev.datasets})
            reporter.update(evaluation=self.evaluator.record)
        self.step_offset += total
        curves.sync()
        self.stop.in_loop = True  # a SIGTERM now only sets the flag; the save below is final
        try:
            self._save(
                d,
                store,
                stage=plan,
                step=total,
                total=total,
                complete=True,
                model=model,
                raw=raw,
                optimizer=None,
                scheduler=None,
                scaler=None,
                stats=stats,
                reporter=reporter,
                data_counts=counts,
                order=order,
            )
        finally:
            self.stop.in_loop = False
        reporter.emit(force=True, step=total, evalLoss=round(eval_loss, 5) if eval_loss else None)
        return StageResult(
            name=plan.name,
            type=plan.type.value,
            steps=total - start,
            total_steps=total,
            losses=stats.losses,
            eval_loss=eval_loss,
            tokens_per_second=tps[0],
            train_seconds=stats.seconds,
            data=counts,
            resumed_at=start if start else None,
        )


def run_training(
    job_config: Mapping[str, Any],
    *,
    workdir: str | Path | None = None,
    pvc_root: str | Path | None = None,
    checkpoint_uri: str | None = None,
    on_progress: ProgressCallback | None = None,
    stop_event: threading.Event | None = None,
    stdout_progress: bool = True,
    handle_sigterm: bool = False,
    env: RuntimeEnv | None = None,
) -> TrainResult:
    """Train a FineTuneJob in this process (one rank when started under torchrun).

    ``job_config``: the operator's job config (``{"name", "spec", ...}``), a whole
    FineTuneJob object (``{"apiVersion", "kind", "metadata", "spec"}``) or a bare spec.
    ``on_progress`` receives each progress object (rank 0). Setting ``stop_event`` asks for a
    checkpoint at the next step and a ``Terminated`` exception. Raises ``UserError`` (exit
    10), ``RetryableError``/``Terminated`` (exit 20) or anything else (a crash).
    """
    e = env or RuntimeEnv.from_env()
    overrides: dict[str, Any] = {}
    if workdir is not None:
        overrides["workdir"] = Path(workdir)
    if pvc_root is not None:
        overrides["pvc_root"] = Path(pvc_root)
    if checkpoint_uri is not None:
        overrides["checkpoint_uri"] = checkpoint_uri
    if overrides:
        e = dataclasses.replace(e, **overrides)
    job = parse_job_config(job_config, e)
    stop = StopRequest(stop_event)
    if handle_sigterm:
        stop.install()
    return Trainer(
        job, e, on_progress=on_progress, stop=stop, stdout_progress=stdout_progress
    ).run()
