"""The typed API: defaults, bounds and cross-field rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from graft import crdgen
from graft.api.common import Condition, ConditionStatus, parse_uri, set_condition
from graft.api.finetunejob import FineTuneJob, FineTuneJobSpec, duration_seconds
from graft.api.modelservice import ModelService, ModelServiceSpec
from graft.validation import InvalidSpec, parse_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def minimal() -> dict[str, Any]:
    return {
        "baseModel": {"uri": "pvc://models/llama"},
        "stages": [{"type": "SFT", "dataset": {"uri": "file:///d.jsonl", "format": "alpaca"}}],
        "output": {"uri": "file:///out"},
    }


def test_examples_parse() -> None:
    for f in sorted(EXAMPLES.glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        model = FineTuneJob if doc["kind"] == "FineTuneJob" else ModelService
        model.model_validate(doc)


def test_defaults_are_sensible() -> None:
    s = FineTuneJobSpec.model_validate(minimal())
    assert s.method.value == "lora"
    assert s.lora.target_modules == ["q_proj", "v_proj"]
    assert s.checkpoint.every == "30m" and s.checkpoint.keep == 3
    assert s.restart_policy.max_restarts == 3
    assert s.wire()["hyperparameters"]["globalBatchSize"] == 8


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda s: s.update(hyperparameters={"globalBatchSize": 10, "microBatchSize": 4}),
            "globalBatchSize",
        ),
        (lambda s: s.update(resources={"gpus": 8, "nodes": 2}), "gpus or nodes"),
        (lambda s: s.update(checkpoint={"every": 0}), "every"),
        (lambda s: s.update(unknownField=1), "unknownField"),
    ],
)
def test_cross_field_rules_name_the_field(mutate: Any, field: str) -> None:
    spec = minimal()
    mutate(spec)
    with pytest.raises(InvalidSpec, match=field):
        parse_spec(FineTuneJobSpec, spec)


def test_modelservice_rules() -> None:
    base = {"model": {"baseModel": {"uri": "pvc://m/x"}}}
    ModelServiceSpec.model_validate(base)
    with pytest.raises(ValidationError, match="exactly one"):
        ModelServiceSpec.model_validate(
            {"model": {"baseModel": {"uri": "pvc://m/x"}, "adapters": [{"name": "a"}]}}
        )
    with pytest.raises(ValidationError, match="minReplicas"):
        ModelServiceSpec.model_validate(
            {**base, "autoscaling": {"minReplicas": 3, "maxReplicas": 2}}
        )
    with pytest.raises(ValidationError, match="unique"):
        ModelServiceSpec.model_validate(
            {
                "model": {
                    "baseModel": {"uri": "pvc://m/x"},
                    "adapters": [
                        {"name": "a", "uri": "pvc://a/1"},
                        {"name": "a", "uri": "pvc://a/2"},
                    ],
                }
            }
        )


def test_durations() -> None:
    assert duration_seconds("1h30m") == 5400
    assert duration_seconds("90s") == 90
    with pytest.raises(ValueError, match="30m"):
        duration_seconds("soon")


def test_parse_uri() -> None:
    assert parse_uri("pvc://claim/path/x") == ("pvc", "claim/path/x")
    with pytest.raises(ValueError, match="pvc://"):
        parse_uri("ftp://host/x")


def test_condition_transition_time_moves_only_on_status_change() -> None:
    c1 = Condition(
        type="Ready", status=ConditionStatus.FALSE, reason="A", last_transition_time="t1"
    )
    same = set_condition([c1], c1.model_copy(update={"reason": "B", "last_transition_time": "t2"}))
    assert same[0].last_transition_time == "t1" and same[0].reason == "B"
    flipped = set_condition(
        same,
        Condition(type="Ready", status=ConditionStatus.TRUE, reason="C", last_transition_time="t3"),
    )
    assert flipped[0].last_transition_time == "t3"


def test_crds_have_no_drift() -> None:
    assert crdgen.main(["--check"]) == 0


def test_crd_schema_is_structural() -> None:
    # every node that has properties is an object and every node has a type (or is
    # int-or-string / preserve-unknown-fields): what apiextensions/v1 requires.
    def walk(node: dict[str, Any], path: str) -> None:
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), path
        for k, v in node.get("properties", {}).items():
            walk(v, f"{path}.{k}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    for obj in crdgen.crds().values():
        walk(obj["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")
