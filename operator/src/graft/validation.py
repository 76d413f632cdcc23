"""Turn a raw custom-resource body into a typed model, or a message that names the bad field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class InvalidSpec(Exception):
    """The spec passed the CRD schema but not the cross-field rules; message names the field."""


def describe(err: ValidationError, prefix: str = "spec") -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_spec(model: type[M], spec: Mapping[str, Any]) -> M:
    """Validate ``spec`` (camelCase, as stored) into ``model``; InvalidSpec names the field."""
    try:
        return model.model_validate(dict(spec))
    except ValidationError as e:
        raise InvalidSpec(describe(e) + ". Fix the field and apply the resource again.") from e
