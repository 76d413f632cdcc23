"""The OpenAI endpoint under hostile input: limits, type errors, and one tenant's bad request
never failing another's. Real Ray Serve, real app, tiny model."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from servekit import LocalServe, TinyModels, modelservice, serve_config

from graft.runtime.serve.app import ADAPTER_LOAD_FAILED, MAX_REQUEST_BYTES
from graft.runtime.serve.engine import EngineError, GenerationRequest
from graft.runtime.serve.protocol import MAX_PROMPTS

pytestmark = pytest.mark.slow

GOOD = ["the model serves tokens", "gpu memory latency", "adapters change in place"]
SECRET_PATH = "no-such-dir-7f3a"


@pytest.fixture(scope="module")
def app(local_serve: LocalServe, tiny: TinyModels) -> Iterator[LocalServe]:
    broken = tiny.base.parent / SECRET_PATH
    local_serve.deploy(serve_config(modelservice(tiny.base), {"a1": tiny.a1, "bad": broken}))
    yield local_serve


def _post(app: LocalServe, path: str, body: Any, **kw: Any) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(
            f"{app.url}{path}",
            content=body,
            headers={"content-type": "application/json"},
            timeout=120,
            **kw,
        )
    return httpx.post(f"{app.url}{path}", json=body, timeout=120, **kw)


def _openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    return dict(err)


def test_poisoned_request_does_not_fail_its_batch(app: LocalServe) -> None:
    """seed 2**70 in a batch with three innocent requests failed all four (HTTP 500)."""

    def body(prompt: str, **kw: Any) -> dict[str, Any]:
        return {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0} | kw

    alone = [_post(app, "/v1/completions", body(p)).json()["choices"][0]["text"] for p in GOOD]

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=app.url, timeout=120) as c:
            # A long request first, so the four below queue up behind it and are decoded
            # as one batch when it finishes.
            head = asyncio.create_task(
                c.post("/v1/completions", json=body("warm up the engine", max_tokens=120))
            )
            await asyncio.sleep(0.2)
            poison = body(GOOD[0], seed=2**70, temperature=0.9)
            rest = await asyncio.gather(
                *[c.post("/v1/completions", json=b) for b in [poison, *map(body, GOOD)]]
            )
            await head
            return list(rest)

    poisoned, *good = asyncio.run(together())
    err = _openai_error(poisoned, 400)
    assert err["param"] == "seed" and err["type"] == "invalid_request_error"
    assert [r.status_code for r in good] == [200, 200, 200], [r.text for r in good]
    assert [r.json()["choices"][0]["text"] for r in good] == alone


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"model": "tiny", "messages": [{"role": "user", "content": 123}]}, "messages.0.content"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages",
        ),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"text": 5}]}]}, None),
        ({"model": "tiny", "messages": "hello"}, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": -1}, "seed"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 2**63}, "seed"),
        (
            '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
            None,
        ),
        ('{"model": "tiny", "seed": ' + "9" * 5000 + "}", None),
        ('{"model": "tiny", "stream_options": ' + "[" * 100_000 + "]" * 100_000 + "}", None),
        ('{"model": "tiny", "logprobs": ' + '{"a":' * 50_000 + "1" + "}" * 50_000 + "}", None),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["s" * 300]},
            None,
        ),
    ],
)
def test_type_errors_are_openai_400(app: LocalServe, raw: Any, param: str | None) -> None:
    """`"content": 123` and a deeply nested body gave HTTP 500."""
    err = _openai_error(_post(app, "/v1/chat/completions", raw), 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    assert "Traceback" not in err["message"]


def test_prompt_count_is_capped(app: LocalServe) -> None:
    ok = _post(app, "/v1/completions", {"model": "tiny", "prompt": ["x"] * MAX_PROMPTS})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == MAX_PROMPTS
    many = {"model": "tiny", "prompt": ["x"] * (MAX_PROMPTS + 1), "max_tokens": 1}
    err = _openai_error(_post(app, "/v1/completions", many), 400)
    assert err["param"] == "prompt" and str(MAX_PROMPTS) in err["message"]


def test_body_over_the_cap_is_413(app: LocalServe) -> None:
    big = json.dumps({"model": "tiny", "prompt": "a" * (MAX_REQUEST_BYTES + 1)})
    err = _openai_error(_post(app, "/v1/completions", big), 413)
    assert err["code"] == "request_too_large"

    # Chunked (no Content-Length): cut off while streaming in, not after.
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(MAX_REQUEST_BYTES // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    r = httpx.post(f"{app.url}/v1/completions", content=chunks(), timeout=120)
    _openai_error(r, 413)


def test_long_prompt_is_refused_before_tokenizing(app: LocalServe) -> None:
    """A 20 MB prompt was tokenized on the event loop: every request stalled for 21.7 s."""
    prompt = "lorem ipsum " * 250_000  # 3 MB: under the body cap, far over the context

    async def run() -> tuple[httpx.Response, httpx.Response, float, float]:
        async with httpx.AsyncClient(base_url=app.url, timeout=120) as c:
            t0 = time.perf_counter()
            long_task = asyncio.create_task(
                c.post("/v1/completions", json={"model": "tiny", "prompt": prompt})
            )
            small = await c.post(
                "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}
            )
            t_small = time.perf_counter() - t0
            long = await long_task
            return long, small, time.perf_counter() - t0, t_small

    long, small, t_long, t_small = asyncio.run(run())
    err = _openai_error(long, 400)
    assert "characters" in err["message"] and "maximum context length" in err["message"]
    assert small.status_code == 200
    print(f"3 MB prompt refused in {t_long:.2f} s; a small request beside it took {t_small:.2f} s")


def test_readyz_carries_no_exception_text(app: LocalServe) -> None:
    r = httpx.get(f"{app.url}/readyz", timeout=10)
    assert r.status_code == 200
    ready = r.json()
    assert ready["failedAdapters"] == {"bad": ADAPTER_LOAD_FAILED}
    assert SECRET_PATH not in r.text and "Error" not in r.text


def test_engine_isolates_a_failing_row(tiny: TinyModels) -> None:
    """Requests that reach the engine despite the protocol layer fail alone: a seed torch
    refuses before the batch, NaN sampling parameters inside it."""
    from graft.runtime.serve.hf_engine import TransformersEngine

    engine = TransformersEngine(tiny.base)

    def req(prompt: str, **kw: Any) -> GenerationRequest:
        return GenerationRequest("t", prompt, **({"max_tokens": 10, "temperature": 0} | kw))

    async def text(r: GenerationRequest) -> str:
        return "".join([d.text async for d in engine.generate(r)])

    async def run() -> None:
        alone = [await text(req(p)) for p in GOOD]
        with pytest.raises(EngineError, match="seed"):
            await text(req(GOOD[0], seed=2**70, temperature=0.9))
        # Hold the model so that the worker takes the next five as one batch.
        engine._model_lock.acquire()
        try:
            first = asyncio.ensure_future(text(req("first")))
            await asyncio.sleep(0.3)
            batch = [
                asyncio.ensure_future(text(r))
                for r in [req(GOOD[0], temperature=float("nan")), *map(req, GOOD)]
            ]
            await asyncio.sleep(0.3)
        finally:
            engine._model_lock.release()
        await first
        results = await asyncio.gather(*batch, return_exceptions=True)
        assert isinstance(results[0], EngineError), results[0]
        assert results[1:] == alone

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
