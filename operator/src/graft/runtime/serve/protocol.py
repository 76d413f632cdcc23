"""The OpenAI wire format: request models, response builders and the error shape.

Requests are validated here (not by FastAPI) so that every refusal, malformed JSON
included, is a 400 in OpenAI's error shape, which the official clients parse.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from graft.runtime.serve.engine import FinishReason

#: ``seed`` is a signed 64-bit integer in OpenAI's API; torch's generators take no more.
SEED_MAX = 2**63 - 1
#: Prompts in one ``/v1/completions`` request; each is a generation of its own.
MAX_PROMPTS = 16
#: Messages in one chat request, and stop strings' length: bounds on work per request.
MAX_MESSAGES = 1024
MAX_STOP_CHARS = 256


class OpenAIError(Exception):
    """An error returned to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{name}` does not exist.",
        param="model",
        code="model_not_found",
    )


class _Request(BaseModel):
    # Clients send fields this server ignores (user, logit_bias, ...); refusing them would
    # break the official SDKs, so only fields that change the answer are checked.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1)
    stop: (
        Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]
        | list[Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]]
        | None
    ) = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("n")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: Any) -> Any:
        if v not in (None, False):
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("presence and frequency penalties are not supported")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


_R = TypeVar("_R", bound=_Request)


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and len(v) > MAX_PROMPTS:
            raise ValueError(
                f"at most {MAX_PROMPTS} prompts per request ({len(v)} given); "
                "send the rest in further requests"
            )
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def limit(self) -> int | None:
        # OpenAI's legacy completions default to 16 tokens; chat defaults to the context.
        return super().limit() or 16


class ContentPart(BaseModel):
    """A part of a message's content; only ``{"type": "text", "text": ...}`` is served."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("tools are not supported")
        return v


def _is_type_tag(part: int | str) -> bool:
    # pydantic names the member of a union it tried ("str", "list[ContentPart]"); the
    # client wants the field's path only.
    return isinstance(part, str) and (
        "[" in part or part in ("str", "int", "float", "bool", "none", "function-after")
    )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse(body: bytes, model: type[_R]) -> _R:
    """Parse a request body; any problem is a 400 in OpenAI's shape naming the field."""
    try:
        # NaN and Infinity are not JSON; Python accepts them unless told not to, and a NaN
        # temperature would pass every bound check.
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError as e:
        raise OpenAIError(400, "The request body is nested too deeply.") from e
    except (ValueError, UnicodeDecodeError) as e:
        # ValueError also covers integers longer than Python's int/str conversion limit.
        raise OpenAIError(400, f"The request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except RecursionError as e:
        raise OpenAIError(400, "The request body is nested too deeply.") from e
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"] if not _is_type_tag(x)) or None
        raise OpenAIError(400, f"Invalid request: {param}: {first['msg']}", param=param) from e


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    rid: str,
    model: str,
    created: int,
    texts: list[tuple[str, FinishReason | None]],
    u: dict[str, int],
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "text": t, "logprobs": None, "finish_reason": f}
            for i, (t, f) in enumerate(texts)
        ],
        "usage": u,
    }


def completion_chunk(
    rid: str, model: str, created: int, text: str, finish: FinishReason | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def chat_body(
    rid: str, model: str, created: int, text: str, finish: FinishReason | None, u: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": u,
    }


def chat_chunk(
    rid: str, model: str, created: int, delta: dict[str, str], finish: FinishReason | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def usage_chunk(rid: str, obj: str, model: str, created: int, u: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": u}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def now() -> int:
    return int(time.time())
