"""``graft serve``: a ModelService on a local Ray Serve, with the operator's serve config.

The config is ``build_serve_config`` (what the operator puts in the RayService's
``serveConfigV2``) with only local changes: URIs made absolute, HTTP on 127.0.0.1:<port>,
and, on a machine without GPUs, replicas on CPU with the transformers engine. It is handed
to the Serve controller the way KubeRay's call to the dashboard does.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graft.api.modelservice import Engine
from graft.builders.serve_config import (
    APP_NAME,
    DEPLOYMENT_NAME,
    ResolvedAdapter,
    ResolvedCanary,
    build_serve_config,
    replica_cpus,
    served_name,
)
from graft.local import state as st
from graft.local.spec import ServiceFile, SpecError

DEFAULT_PORT = 8000


@dataclass
class ServeOptions:
    workdir: Path = st.DEFAULT_WORKDIR
    pvc_root: Path = st.DEFAULT_PVC_ROOT
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    verbose: bool = False
    deploy_timeout: float = 600.0
    #: A file of API keys, one per line (``graft serve --api-key-file``); None: no keys.
    api_key_file: Path | None = None


@dataclass
class LocalService:
    """A running local deployment: where it answers and what it serves."""

    endpoint: str
    model: str
    adapters: list[str]
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def absolute_uri(uri: str, pvc_root: Path) -> str:
    """file:// and pvc:// as absolute file:// URIs (Ray workers do not share our cwd or
    flags); other schemes unchanged."""
    path = st.local_path(uri, pvc_root)
    return f"file://{path}" if path is not None else uri


def gate_refusal(state: dict[str, Any]) -> str | None:
    """Why a succeeded local run's output must not be served, or None when it may: the
    rule of the operator (docs/modelservice.md, "Promotion gate") on ``graft run``'s state."""
    evaluation = state.get("evaluation")
    passed = evaluation.get("passed") if isinstance(evaluation, dict) else None
    if passed is True:
        return None
    if passed is False or (state.get("output") or {}).get("promotable") is False:
        return "did not pass its evaluation gate"
    try:
        job = yaml.safe_load(Path(str(state.get("file"))).read_text()) or {}
        gate = ((job.get("spec") or {}).get("evaluation") or {}).get("gate")
    except (OSError, yaml.YAMLError, AttributeError):
        gate = None
    return "has an evaluation gate but no evaluation result" if gate else None


def _job_uri(
    svc: ServiceFile, opts: ServeOptions, field_: str, job: str, allow_unevaluated: bool
) -> tuple[str | None, str | None]:
    """(URI, None), or (None, why) when the job's gate keeps its output out of service;
    SpecError when the job cannot be served at all."""
    where = st.state_path(opts.workdir, job)
    state = st.read_state(opts.workdir, job)
    if state is None:
        raise SpecError(
            f"{svc.path}: {field_}: no local run of FineTuneJob {job!r} ({where} not "
            f"found); run `graft run <its file>` first with --workdir {opts.workdir}, "
            "or give the adapter a uri"
        )
    if state.get("phase") != "Succeeded":
        raise SpecError(
            f"{svc.path}: {field_}: FineTuneJob {job!r} has not succeeded here (phase "
            f"{state.get('phase')}); run `graft run {state.get('file', '<its file>')}` "
            "again to finish it"
        )
    output = state.get("output") or {}
    if output.get("kind") not in (None, "adapter"):
        raise SpecError(
            f"{svc.path}: {field_}: FineTuneJob {job!r} wrote a full model "
            f"({output.get('uri')}), not an adapter; serve it as the base model instead"
        )
    refusal = gate_refusal(state)
    if refusal is not None and not allow_unevaluated:
        return None, (
            f"{field_}: FineTuneJob {job!r} {refusal}; not served. Retrain, or set "
            "allowUnevaluated: true to serve it anyway"
        )
    path = output.get("path")
    return (f"file://{path}" if path else str(output.get("uri"))), None


def resolve_adapters(
    svc: ServiceFile, opts: ServeOptions, notes: list[str] | None = None
) -> list[ResolvedAdapter]:
    """Each adapter with a concrete URI; ``fromFineTuneJob: X`` is read from the state file
    that ``graft run`` wrote for X (``<workdir>/jobs/X.json``). An adapter (or canary) whose
    job did not pass its evaluation gate is left out, with a line in ``notes``."""
    out = []
    notes = notes if notes is not None else []
    pvc_root = opts.pvc_root.absolute()
    for a in svc.spec.model.adapters:
        field_ = f"spec.model.adapters[{a.name}]"
        if a.uri is not None:
            uri: str | None = absolute_uri(a.uri, pvc_root)
        else:
            uri, why = _job_uri(
                svc,
                opts,
                f"{field_}.fromFineTuneJob",
                str(a.from_fine_tune_job),
                a.allow_unevaluated,
            )
            if why is not None:
                notes.append(why)
        if uri is None:
            continue
        canary = None
        if a.canary is not None:
            c = a.canary
            if c.uri is not None:
                curi: str | None = absolute_uri(c.uri, pvc_root)
            else:
                curi, why = _job_uri(
                    svc,
                    opts,
                    f"{field_}.canary.fromFineTuneJob",
                    str(c.from_fine_tune_job),
                    c.allow_unevaluated,
                )
                if why is not None:
                    notes.append(why)
            if curi is not None:
                canary = ResolvedCanary.of(curi, c)
        out.append(ResolvedAdapter(a.name, uri, canary))
    return out


def local_config(
    svc: ServiceFile, adapters: list[ResolvedAdapter], opts: ServeOptions, *, gpus: float
) -> tuple[dict[str, Any], list[str]]:
    """The operator's serve config with the local changes, and a note for each change."""
    cfg = copy.deepcopy(build_serve_config(_with_name(svc), adapters))
    notes: list[str] = []
    cfg["http_options"] = {"host": opts.host, "port": opts.port}
    app = cfg["applications"][0]
    app["args"]["model"]["uri"] = absolute_uri(
        svc.spec.model.base_model.uri, opts.pvc_root.absolute()
    )
    dep = app["deployments"][0]
    actor = dep["ray_actor_options"]
    wanted = float(actor.get("num_gpus") or 0)
    if wanted > gpus:
        actor["num_gpus"] = 0
        if app["args"]["engine"] == Engine.VLLM.value:
            app["args"]["engine"] = Engine.TRANSFORMERS.value
        notes.append(
            f"replicas ask for {wanted:g} GPU(s) and this machine has {gpus:g}: serving on "
            "CPU with the transformers engine"
        )
    if opts.api_key_file is not None:
        app["args"]["apiKeyFile"] = str(opts.api_key_file.absolute())
    if "memory" in actor:
        del actor["memory"]
        notes.append("resources.memory ignored locally (Ray would wait for that much)")
    return cfg, notes


def read_api_keys(path: Path) -> list[str]:
    """The keys in an ``--api-key-file``; SpecError when it cannot serve as one."""
    from graft.runtime.serve.auth import parse_keys

    try:
        keys = parse_keys(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"--api-key-file {path}: cannot read it ({e})") from e
    if not keys:
        raise SpecError(f"--api-key-file {path}: no key in it; put one API key per line")
    return keys


def _with_name(svc: ServiceFile) -> Any:
    from graft.api.modelservice import ModelService

    return ModelService.model_validate({"metadata": {"name": svc.name}, "spec": svc.body["spec"]})


@contextmanager
def local_service(svc: ServiceFile, opts: ServeOptions | None = None) -> Iterator[LocalService]:
    """Start Ray and Serve here, deploy ``svc``, wait until it runs; shut down on exit."""
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    opts = opts or ServeOptions()
    held: list[str] = []
    adapters = resolve_adapters(svc, opts, held)
    if opts.api_key_file is not None:
        read_api_keys(opts.api_key_file)
    env = {
        "GRAFT_PVC_ROOT": str(opts.pvc_root.absolute()),
        "TOKENIZERS_PARALLELISM": "false",
    }
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not opts.verbose:
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.update(env)
    cpus = max(os.cpu_count() or 1, math.ceil(replica_cpus(_with_name(svc))))
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=opts.verbose,
        logging_level=logging.INFO if opts.verbose else logging.ERROR,
        runtime_env={"env_vars": env},
    )
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]
        cfg, notes = local_config(svc, adapters, opts, gpus=gpus)
        client = serve_start(http_options={"host": opts.host, "port": opts.port})
        client.deploy_apps(ServeDeploySchema.model_validate(cfg))
        wait_running(opts.deploy_timeout)
        host = "127.0.0.1" if opts.host in ("0.0.0.0", "") else opts.host
        yield LocalService(
            endpoint=f"http://{host}:{opts.port}/v1",
            model=served_name(_with_name(svc)),
            adapters=[a.name for a in adapters],
            config=cfg,
            notes=held + notes,
        )
    finally:
        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()


class DeployError(Exception):
    """The Serve application did not come up; the message is Serve's."""


def wait_running(timeout: float) -> None:
    """Until the Serve app runs; DeployError with Serve's message when it cannot."""
    from ray import serve

    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        status = app.status if app else None
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            msg = app.message if app else ""
            dep = app.deployments.get(DEPLOYMENT_NAME) if app else None
            if dep is not None and dep.message:
                msg = f"{msg}\n{dep.message}"
            raise DeployError(msg or "deploy failed")
        time.sleep(0.5)
    raise DeployError(f"the application was not RUNNING after {timeout:.0f}s (last: {status})")


def ask(
    endpoint: str, model: str, question: str, *, max_tokens: int = 48, api_key: str | None = None
) -> str:
    """One chat question through the OpenAI API (the official client), greedy."""
    import openai

    client = openai.OpenAI(
        base_url=endpoint, api_key=api_key or "unused", max_retries=2, timeout=300
    )
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return resp.choices[0].message.content or ""
