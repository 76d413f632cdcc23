"""The Ray Serve application: ``graft.runtime.serve.app:build_app``.

One deployment, ``LLMServer``, is both the HTTP ingress and the engine, so Serve's
autoscaling (driven by requests in flight per replica) scales exactly what does the work.
Its ``user_config`` carries the adapters: ``{"adapters": [{"name", "uri"}]}``. Serve calls
``reconfigure`` with it on every replica when only the user_config changes, so adapters
come and go without restarting replicas (or the Ray cluster).
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures at runtime
# and Serve's ingress wrapper cannot resolve string annotations such as "Request".
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel
from ray import serve
from ray.serve.deployment import Application
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from graft.runtime.serve import storage
from graft.runtime.serve.auth import ApiKeys, bearer
from graft.runtime.serve.canary import CanaryArg, engine_name
from graft.runtime.serve.engine import make_engine, resolve_engine_name
from graft.runtime.serve.metrics import Metrics
from graft.runtime.serve.protocol import OpenAIError
from graft.runtime.serve.service import OpenAIService

log = logging.getLogger("graft.serve")

DEPLOYMENT_NAME = "LLMServer"
ADAPTER_LOAD_FAILED = "failed to load; see the replica's log"
ADAPTER_NAME_TAKEN = "adapter name equals the served model name"
#: 4 MiB holds a 128k-token prompt several times over, JSON escaping included.
MAX_REQUEST_BYTES = 4 * 2**20


class _Args(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ModelArg(_Args):
    name: str = Field(min_length=1)
    uri: str = Field(min_length=1)


class ServeArgs(_Args):
    """The application's ``args`` in the serve config (see docs/runtime-contract.md)."""

    model: ModelArg
    engine: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    max_batch_size: int = Field(default=8, ge=1)
    #: Largest request body accepted; a bigger one is refused (413) before it is read whole.
    max_request_bytes: int = Field(default=MAX_REQUEST_BYTES, ge=1024)
    #: A file of API keys, one per line; unset: the endpoint takes no key.
    api_key_file: str | None = None


class AdapterSpec(_Args):
    name: str = Field(min_length=1)
    uri: str = Field(min_length=1)
    canary: CanaryArg | None = None


class UserConfig(_Args):
    adapters: list[AdapterSpec] = Field(default_factory=list)


api = FastAPI(title="graft", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(OpenAIError)
async def _openai_error(_: Request, e: OpenAIError) -> Response:
    return JSONResponse(e.body(), status_code=e.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> Response:
    err = OpenAIError(
        e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None
    )
    return JSONResponse(err.body(), status_code=e.status_code)


@api.exception_handler(Exception)
async def _internal_error(_: Request, e: Exception) -> Response:
    # The client gets OpenAI's shape and no exception text (it can carry paths and
    # internals); the replica's log has the traceback.
    log.error("unhandled error in a request", exc_info=e)
    err = OpenAIError(500, "The server had an error processing the request.", type_="server_error")
    return JSONResponse(err.body(), status_code=500)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it passes ``limit`` bytes."""

    def too_large() -> OpenAIError:
        return OpenAIError(
            413,
            f"The request body is larger than this server's limit of {limit} bytes; "
            "send a shorter prompt or fewer prompts per request.",
            code="request_too_large",
        )

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _assigned_gpus() -> float:
    import ray

    return float(len(ray.get_runtime_context().get_accelerator_ids().get("GPU", [])))


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=16,
    health_check_period_s=10,
    # Model loading on a cold node can be slow; give the constructor room before Serve
    # gives up on the replica.
    graceful_shutdown_timeout_s=30,
)
@serve.ingress(api)
class LLMServer:
    def __init__(self, args: dict[str, Any]) -> None:
        self._args = ServeArgs.model_validate(args)
        gpus = _assigned_gpus()
        engine_name = resolve_engine_name(self._args.engine, gpus=gpus)
        model_dir = storage.resolve(self._args.model.uri)
        log.info("loading %s from %s with %s", self._args.model.name, model_dir, engine_name)
        self._engine = make_engine(
            engine_name,
            model_dir,
            max_model_len=self._args.max_model_len,
            tensor_parallel_size=self._args.tensor_parallel_size,
            gpus=gpus,
            max_batch_size=self._args.max_batch_size,
        )
        ctx = serve.get_replica_context()
        self._replica = ctx.replica_id.unique_id
        self._service = OpenAIService(
            self._engine,
            self._args.model.name,
            metrics=Metrics(),
            headers={"x-graft-replica": self._replica},
        )
        self._uris: dict[str, str] = {}
        self._failed: dict[str, str] = {}
        self._keys = ApiKeys(Path(self._args.api_key_file)) if self._args.api_key_file else None

    def _authorize(self, request: Request) -> None:
        """A 401 in OpenAI's shape unless the request carries an accepted API key."""
        if self._keys is None:
            return
        key = bearer(request.headers.get("authorization"))
        if key is None:
            raise OpenAIError(
                401,
                "You didn't provide an API key. Pass it in an Authorization header "
                "(Authorization: Bearer YOUR_KEY); the OpenAI clients send their api_key so.",
                code="invalid_api_key",
            )
        if not self._keys.accepts(key):
            raise OpenAIError(
                401,
                "Incorrect API key provided. Ask the ModelService's owner for a key listed "
                "in its spec.auth.apiKeySecretRef Secret.",
                code="invalid_api_key",
            )

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Bring the loaded adapters in line with the user_config.

        A bad adapter is logged and reported on /readyz but does not fail the replica:
        raising here would make Serve replace every replica, taking the base model and
        the good adapters down with it.
        """
        try:
            specs = UserConfig.model_validate(config or {}).adapters
        except ValidationError as e:
            log.error("ignoring invalid user_config: %s", e)
            return
        # A canary is one more engine adapter; the router decides who gets it.
        wanted = {a.name: a.uri for a in specs}
        wanted.update({engine_name(a.name): a.canary.uri for a in specs if a.canary})
        for name in [n for n in self._uris if wanted.get(n) != self._uris[n]]:
            await self._engine.remove_adapter(name)
            del self._uris[name]
        self._failed = {n: e for n, e in self._failed.items() if n in wanted}
        for name, uri in wanted.items():
            if name in self._uris or name == self._args.model.name:
                continue
            try:
                path = storage.resolve(uri)
                await self._engine.add_adapter(name, path)
            except Exception:
                # The reason stays in the replica's log: /readyz is reachable by every
                # client and exception text can name paths and internals.
                log.exception("adapter %s from %s failed to load", name, uri)
                self._failed[name] = ADAPTER_LOAD_FAILED
                continue
            self._uris[name] = uri
            self._failed.pop(name, None)
        if self._args.model.name in wanted:
            self._failed[self._args.model.name] = ADAPTER_NAME_TAKEN
        self._service.canaries.configure({a.name: a.canary for a in specs}, self._failed)

    def check_health(self) -> None:
        self._engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()

    @api.get("/healthz")
    async def healthz(self) -> Response:
        try:
            self._engine.check_health()
        except Exception:
            log.exception("health check failed")
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @api.get("/readyz")
    async def readyz(self) -> Response:
        try:
            self._engine.check_health()
        except Exception:
            log.exception("readiness check failed")
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse(
            {
                "ready": True,
                "model": self._args.model.name,
                "adapters": self._engine.adapters(),
                "failedAdapters": self._failed,
                "canaries": self._service.canaries.report(),
                "replica": self._replica,
                "pid": os.getpid(),
            },
            headers={"x-graft-replica": self._replica},
        )

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(self._service.models(), headers={"x-graft-replica": self._replica})

    @api.get("/v1/models/{name}")
    async def get_model(self, name: str, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(self._service.model_card(name))

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        return await self._service.completions(
            await read_body(request, self._args.max_request_bytes)
        )

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        return await self._service.chat(await read_body(request, self._args.max_request_bytes))


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder; refuses bad args before any replica starts."""
    try:
        ServeArgs.model_validate(args)
    except ValidationError as e:
        raise ValueError(f"invalid graft serve args: {e}") from e
    return LLMServer.bind(args)  # type: ignore[attr-defined,no-any-return]
