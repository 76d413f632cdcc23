"""Generate the CustomResourceDefinitions from the pydantic models.

``python -m graft.crdgen`` writes ``crds/*.yaml`` and the Helm chart's copy;
``python -m graft.crdgen --check`` exits 1 when either differs from the models.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from graft.api import finetunejob as ftj
from graft.api import modelservice as ms
from graft.api.common import GROUP, VERSION

REPO_ROOT = Path(__file__).resolve().parents[3]
# The chart renders its copy from files/crds/ in a template so that crds.enabled and
# crds.keep work (a chart's crds/ directory is installed unconditionally, never upgraded).
OUT_DIRS = (REPO_ROOT / "crds", REPO_ROOT / "charts" / "graft" / "files" / "crds")

# Keys of JSON Schema that an apiextensions.k8s.io/v1 structural schema accepts.
_ALLOWED = {
    "type",
    "description",
    "properties",
    "items",
    "required",
    "enum",
    "default",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "format",
    "nullable",
    "additionalProperties",
    "anyOf",
    "oneOf",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            target.update(extra)
            return _resolve(target, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one pydantic JSON Schema node into a Kubernetes structural schema node."""
    node = dict(node)
    if node.get("x-kubernetes-int-or-string"):
        branches = node.pop("anyOf", [])
        out: dict[str, Any] = {"x-kubernetes-int-or-string": True}
        # int-or-string: pattern binds only strings and minimum only integers, so both
        # can sit side by side as value validation.
        for b in branches:
            out.update({k: v for k, v in b.items() if k in ("pattern", "minimum")})
        if "description" in node:
            out["description"] = node["description"]
        if "default" in node:
            out["default"] = node["default"]
        return out
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) == 1:
            merged = dict(branches[0])
            merged.update({k: v for k, v in node.items() if k not in ("default",)})
            if node.get("default") is not None:
                merged["default"] = node["default"]
            node = merged
        else:
            raise ValueError(f"cannot express union in a structural schema: {branches}")
    if node.get("const") is not None:
        node["enum"] = [node.pop("const")]
    if node.get("default") is None:
        node.pop("default", None)
    if node.get("type") == "string" and node.get("default") == "":
        node.pop("default")  # Kubernetes 1.20 refuses empty-string defaults
    # JSON Schema 2020-12 numeric exclusive bounds -> OpenAPI v3 boolean form
    for excl, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(excl), int | float) and not isinstance(node.get(excl), bool):
            node[plain] = node[excl]
            node[excl] = True
    out = {k: v for k, v in node.items() if k in _ALLOWED}
    if "properties" in out:
        out["type"] = "object"
        out["properties"] = {k: _structural(v) for k, v in out["properties"].items()}
        # additionalProperties false is implied by a structural schema (unknown fields pruned)
        out.pop("additionalProperties", None)
    elif out.get("type") == "object" and isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(out["additionalProperties"])
    if "items" in out:
        out["items"] = _structural(out["items"])
    if "oneOf" in out:
        # value validation only: each branch may just name required fields
        out["oneOf"] = [{"required": b["required"]} for b in out["oneOf"] if "required" in b]
    # defaults that are objects are applied by Kubernetes property by property: drop them
    default = out.get("default")
    if isinstance(default, dict) or (isinstance(default, list) and not default):
        out.pop("default")
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(_resolve(raw, defs))


def _status_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = openapi_schema(model)
    schema["properties"]["graft"] = {
        "type": "object",
        "description": "The operator's own bookkeeping (handler progress, last handled spec).",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    return schema


def _crd(
    *,
    kind: str,
    plural: str,
    short: str,
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    description: str,
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    spec_schema = openapi_schema(spec_model)
    root = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "graft.dev/v1alpha1"},
            "kind": {"type": "string", "description": kind},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": _status_schema(status_model),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "graft"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["graft", "all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD object, for both kinds."""
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    return {
        f"{ftj.PLURAL}.{GROUP}.yaml": _crd(
            kind=ftj.KIND,
            plural=ftj.PLURAL,
            short="ftj",
            spec_model=ftj.FineTuneJobSpec,
            status_model=ftj.FineTuneJobStatus,
            description=ftj.FineTuneJob.__doc__ or "",
            columns=[
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Progress", "type": "string", "jsonPath": ".status.progressSummary"},
                {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
                {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
                {
                    "name": "Pool",
                    "type": "string",
                    "jsonPath": ".status.placement.nodePool",
                    "priority": 1,
                },
                {
                    "name": "GPU-Hours",
                    "type": "number",
                    "jsonPath": ".status.gpuHours",
                    "priority": 1,
                },
                age,
            ],
        ),
        f"{ms.PLURAL}.{GROUP}.yaml": _crd(
            kind=ms.KIND,
            plural=ms.PLURAL,
            short="msvc",
            spec_model=ms.ModelServiceSpec,
            status_model=ms.ModelServiceStatus,
            description=ms.ModelService.__doc__ or "",
            columns=[
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
                {
                    "name": "Endpoint",
                    "type": "string",
                    "jsonPath": ".status.endpoint",
                    "priority": 1,
                },
                age,
            ],
        ),
    }


HEADER = "# Generated by `python -m graft.crdgen` from graft.api; do not edit by hand.\n"


def render(obj: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(obj, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graft.crdgen", description=__doc__)
    p.add_argument("--check", action="store_true", help="fail when the files are out of date")
    args = p.parse_args(argv)
    drift = False
    for out_dir in OUT_DIRS:
        for name, obj in crds().items():
            path = out_dir / name
            text = render(obj)
            if args.check:
                old = path.read_text() if path.exists() else ""
                if old != text:
                    drift = True
                    sys.stdout.writelines(
                        difflib.unified_diff(
                            old.splitlines(True), text.splitlines(True), str(path), "generated"
                        )
                    )
            else:
                out_dir.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(REPO_ROOT)}")
    if drift:
        print("CRDs are out of date: run `make crds` and commit the result.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
