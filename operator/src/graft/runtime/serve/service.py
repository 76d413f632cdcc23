"""The OpenAI API over an engine: model names, completions, chat, streaming, metrics.

Independent of Ray so that it reads as plain request handling; app.py mounts it on Ray
Serve's FastAPI ingress.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from graft.runtime.serve import protocol as p
from graft.runtime.serve.canary import CanaryRouter, Route, is_internal
from graft.runtime.serve.chat import message_text, render_chat
from graft.runtime.serve.engine import (
    Engine,
    EngineError,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
)
from graft.runtime.serve.metrics import Metrics


class _Request:
    """One request's route, once known, so that its outcome can be recorded."""

    def __init__(self, start: float, route: str) -> None:
        self.start = start
        self.route = route
        self.canary: Route | None = None


class OpenAIService:
    """Maps OpenAI requests to engine requests; ``model`` picks the base or an adapter
    (and, for an adapter with a canary, which version answers)."""

    def __init__(
        self,
        engine: Engine,
        served_name: str,
        *,
        metrics: Metrics | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.engine = engine
        self.served_name = served_name
        self._metrics = metrics
        self._headers = headers or {}
        self._created = p.now()
        self.canaries = CanaryRouter()

    def _public_adapters(self) -> list[str]:
        return [a for a in self.engine.adapters() if not is_internal(a)]

    def models(self) -> dict[str, Any]:
        names = [self.served_name, *self._public_adapters()]
        return {"object": "list", "data": [self.model_card(n) for n in names]}

    def model_card(self, name: str) -> dict[str, Any]:
        self._adapter_for(name)
        card: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": "graft",
            "max_model_len": self.engine.max_model_len,
        }
        if name != self.served_name:
            card["parent"] = self.served_name
        return card

    def _adapter_for(self, name: str) -> str | None:
        if name == self.served_name:
            return None
        if name in self._public_adapters():
            return name
        raise p.model_not_found(name)

    def _label(self, name: str) -> str:
        return name if name == self.served_name or name in self._public_adapters() else "unknown"

    async def completions(self, body: bytes) -> Response:
        return await self._handle("completions", body, self._completions)

    async def chat(self, body: bytes) -> Response:
        return await self._handle("chat", body, self._chat)

    async def _handle(
        self,
        route: str,
        body: bytes,
        fn: Callable[[bytes, _Request], Awaitable[tuple[str, Response]]],
    ) -> Response:
        req = _Request(time.perf_counter(), route)
        model = "unknown"
        try:
            model, response = await fn(body, req)
        except p.OpenAIError as e:
            self._count(model, route, e.status, None)
            self._outcome(req, ok=e.status < 500)
            return JSONResponse(e.body(), status_code=e.status, headers=self._headers)
        except EngineError as e:
            self._count(model, route, 400, None)
            self._outcome(req, ok=False)
            err = p.OpenAIError(400, str(e))
            return JSONResponse(err.body(), status_code=400, headers=self._headers)
        except Exception:
            self._outcome(req, ok=False)
            raise
        if not isinstance(response, StreamingResponse):
            self._count(model, route, 200, time.perf_counter() - req.start)
            self._outcome(req, ok=True)
        return response

    def _outcome(self, req: _Request, *, ok: bool) -> None:
        # A request that fails counts against its version whatever the status: the split
        # ignores the request's content, so mistakes of the clients fall on both versions
        # alike and cancel out in the comparison, while a version that fails requests the
        # other answers stands out (a broken adapter's failed sampling is a 400 here).
        if req.canary is not None:
            self.canaries.record(req.canary, ok=ok, latency_s=time.perf_counter() - req.start)

    def _count(self, model: str, route: str, status: int, latency: float | None) -> None:
        if self._metrics is not None:
            self._metrics.request_done(model=model, route=route, status=status, latency_s=latency)

    def _base_request(
        self, req: p.CompletionRequest | p.ChatCompletionRequest, ctx: _Request
    ) -> dict[str, Any]:
        adapter = self._adapter_for(req.model)
        if adapter is not None:
            ctx.canary = self.canaries.route(adapter)
            adapter = ctx.canary.engine_adapter
        return {
            "adapter": adapter,
            "max_tokens": req.limit(),
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stop": req.stop_list(),
            "seed": req.seed,
        }

    async def _completions(self, body: bytes, ctx: _Request) -> tuple[str, Response]:
        start, route = ctx.start, ctx.route
        req = p.parse(body, p.CompletionRequest)
        label = self._label(req.model)
        common = self._base_request(req, ctx)
        rid = p.new_id("cmpl")
        created = p.now()
        prompts = req.prompts()
        if req.stream:
            if len(prompts) != 1:
                raise p.OpenAIError(400, "streaming supports one prompt", param="prompt")
            gen = self.engine.generate(GenerationRequest(rid, prompts[0], **common))
            first = await _first(gen)

            def chunk(d: GenerationDelta) -> dict[str, Any]:
                return p.completion_chunk(rid, req.model, created, d.text, d.finish_reason)

            usage_obj = "text_completion" if req.include_usage() else None
            stream = self._stream(gen, first, chunk, None, usage_obj, rid, req.model, created)
            return label, self._sse(stream, label, ctx)
        results = await asyncio.gather(
            *[
                self._collect(
                    GenerationRequest(f"{rid}-{i}", prompt, **common), label, route, start
                )
                for i, prompt in enumerate(prompts)
            ]
        )
        texts = [(t, f) for t, f, _, _ in results]
        u = p.usage(sum(r[2] for r in results), sum(r[3] for r in results))
        return label, JSONResponse(
            p.completion_body(rid, req.model, created, texts, u), headers=self._headers
        )

    async def _chat(self, body: bytes, ctx: _Request) -> tuple[str, Response]:
        start, route = ctx.start, ctx.route
        req = p.parse(body, p.ChatCompletionRequest)
        label = self._label(req.model)
        common = self._base_request(req, ctx)
        try:
            messages = [{"role": m.role, "content": message_text(m.content)} for m in req.messages]
        except ValueError as e:
            raise p.OpenAIError(400, str(e), param="messages") from e
        prompt, has_special, implicit = render_chat(self.engine.tokenizer, messages)
        rid = p.new_id("chatcmpl")
        created = p.now()
        greq = GenerationRequest(
            rid, prompt, add_special_tokens=not has_special, implicit_stop=implicit, **common
        )
        if req.stream:
            gen = self.engine.generate(greq)
            first = await _first(gen)

            def chunk(d: GenerationDelta) -> dict[str, Any]:
                delta = {"content": d.text} if d.text else {}
                return p.chat_chunk(rid, req.model, created, delta, d.finish_reason)

            opening = p.chat_chunk(
                rid, req.model, created, {"role": "assistant", "content": ""}, None
            )
            usage_obj = "chat.completion.chunk" if req.include_usage() else None
            stream = self._stream(gen, first, chunk, opening, usage_obj, rid, req.model, created)
            return label, self._sse(stream, label, ctx)
        text, finish, pt, ct = await self._collect(greq, label, route, start)
        body_out = p.chat_body(rid, req.model, created, text, finish, p.usage(pt, ct))
        return label, JSONResponse(body_out, headers=self._headers)

    async def _collect(
        self, req: GenerationRequest, label: str, route: str, start: float
    ) -> tuple[str, FinishReason | None, int, int]:
        parts: list[str] = []
        last: GenerationDelta | None = None
        async for d in self.engine.generate(req):
            if last is None and self._metrics is not None:
                self._metrics.first_token(
                    model=label, route=route, seconds=time.perf_counter() - start
                )
            parts.append(d.text)
            last = d
        assert last is not None
        if self._metrics is not None:
            self._metrics.tokens(
                model=label, prompt=last.prompt_tokens, completion=last.completion_tokens
            )
        return "".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens

    async def _stream(
        self,
        gen: AsyncIterator[GenerationDelta],
        first: GenerationDelta,
        chunk: Callable[[GenerationDelta], dict[str, Any]],
        opening: dict[str, Any] | None,
        usage_obj: str | None,
        rid: str,
        model: str,
        created: int,
    ) -> AsyncIterator[tuple[bytes, GenerationDelta | None]]:
        if opening is not None:
            yield p.sse(opening), None
        last = first
        yield p.sse(chunk(first)), first
        async for d in gen:
            last = d
            yield p.sse(chunk(d)), d
        if usage_obj is not None:
            u = p.usage(last.prompt_tokens, last.completion_tokens)
            yield p.sse(p.usage_chunk(rid, usage_obj, model, created, u)), None
        yield p.sse("[DONE]"), None

    def _sse(
        self,
        stream: AsyncIterator[tuple[bytes, GenerationDelta | None]],
        label: str,
        ctx: _Request,
    ) -> StreamingResponse:
        metrics = self._metrics
        route, start = ctx.route, ctx.start

        async def body() -> AsyncIterator[bytes]:
            last: GenerationDelta | None = None
            try:
                async for data, d in stream:
                    if d is not None:
                        if last is None and metrics is not None:
                            metrics.first_token(
                                model=label, route=route, seconds=time.perf_counter() - start
                            )
                        last = d
                    yield data
            except Exception:
                self._outcome(ctx, ok=False)
                raise
            self._outcome(ctx, ok=True)
            if metrics is not None:
                metrics.request_done(
                    model=label, route=route, status=200, latency_s=time.perf_counter() - start
                )
                if last is not None:
                    metrics.tokens(
                        model=label, prompt=last.prompt_tokens, completion=last.completion_tokens
                    )

        return StreamingResponse(body(), media_type="text/event-stream", headers=self._headers)


async def _first(gen: AsyncIterator[GenerationDelta]) -> GenerationDelta:
    """Wait for the first delta before answering, so engine refusals become a 400."""
    return await gen.__anext__()
