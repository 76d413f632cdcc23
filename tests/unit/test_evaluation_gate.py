"""spec.evaluation: the schema, the gate's verdict, and the operator's roll-up into status."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError
from test_reconcile import cond, job, lease, node, pod, run

from graft.api.finetunejob import (
    Evaluation,
    EvaluationMetrics,
    EvaluationStatus,
    FineTuneJobSpec,
    StageEvaluation,
)
from graft.gate import GATE_FAILED, GATE_PASSED, NO_GATE, NOT_EVALUATED, parse_evaluation, verdict
from graft.status import progress_from_annotation

TEXT = {"name": "held-out", "uri": "pvc://data/eval.txt", "format": "text"}
QA = {"name": "facts", "uri": "pvc://data/qa.jsonl", "format": "qa"}


def evaluation(gate: dict[str, Any] | None = None, *sets: dict[str, Any]) -> Evaluation:
    body: dict[str, Any] = {"datasets": list(sets) or [TEXT, QA]}
    if gate is not None:
        body["gate"] = gate
    return Evaluation.model_validate(body)


def figures(
    base_ppl: float | None = 20.0,
    final_ppl: float | None = 10.0,
    base_score: float | None = 0.0,
    final_score: float | None = 0.6,
    **extra: Any,
) -> EvaluationStatus:
    return EvaluationStatus(
        baseline=EvaluationMetrics(perplexity=base_ppl, score=base_score),
        final=EvaluationMetrics(perplexity=final_ppl, score=final_score),
        **extra,
    )


# Schema -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"datasets": [TEXT, TEXT]}, "unique"),
        (
            {"datasets": [TEXT], "gate": {"minScore": 0.5}},
            "minScore needs a dataset with format qa",
        ),
        ({"datasets": [QA], "gate": {"maxPerplexityRatio": 0.9}}, "maxPerplexityRatio needs"),
        ({"datasets": []}, "at least 1"),
        ({"datasets": [{**QA, "format": "quiz"}]}, "format"),
        ({"datasets": [TEXT], "gate": {"maxPerplexityRatio": 0}}, "greater than 0"),
        ({"datasets": [QA], "gate": {"minScore": 1.5}}, "less than or equal to 1"),
    ],
)
def test_bad_evaluation_specs_are_refused_with_the_reason(body: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        Evaluation.model_validate(body)


def test_evaluation_is_part_of_the_spec_and_mounts_its_claim() -> None:
    from graft.builders.finetunejob import pvc_claims

    spec = FineTuneJobSpec.model_validate(
        {
            **job()["spec"],
            "evaluation": {
                "datasets": [{**QA, "uri": "pvc://heldout/qa.jsonl"}],
                "gate": {"minScore": 0.5},
            },
        }
    )
    assert spec.evaluation is not None and spec.evaluation.match == "contains"
    assert pvc_claims(spec)["heldout"] is False  # mounted read-only


# Verdict ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gate", "ev", "passed", "promotable", "reason", "words"),
    [
        ({"maxPerplexityRatio": 0.7}, figures(), True, True, GATE_PASSED, "ratio 0.500"),
        ({"maxPerplexityRatio": 0.4}, figures(), False, False, GATE_FAILED, "above"),
        ({"minScore": 0.5}, figures(), True, True, GATE_PASSED, "score 0% -> 60%"),
        ({"minScore": 0.7}, figures(), False, False, GATE_FAILED, "below minScore 70%"),
        (
            {"minScore": 0.5, "maxPerplexityRatio": 0.9},
            figures(final_ppl=19.0),
            False,
            False,
            GATE_FAILED,
            "ratio 0.950 above maxPerplexityRatio 0.9",
        ),
        ({"minScore": 0.5}, figures(final_score=None), False, False, NOT_EVALUATED, "no score"),
        ({"minScore": 0.5}, None, False, False, NOT_EVALUATED, "no final evaluation"),
        ({"maxPerplexityRatio": 2}, figures(base_ppl=None), False, False, NOT_EVALUATED, "no perp"),
        (None, figures(), None, True, NO_GATE, "perplexity 20 -> 10"),
        ({}, figures(), None, True, NO_GATE, "no gate"),
    ],
)
def test_gate_verdict(
    gate: dict[str, Any] | None,
    ev: EvaluationStatus | None,
    passed: bool | None,
    promotable: bool,
    reason: str,
    words: str,
) -> None:
    v = verdict(evaluation(gate), ev)
    assert v is not None
    assert (v.passed, v.promotable, v.reason) == (passed, promotable, reason)
    assert words in v.message


def test_no_evaluation_no_verdict() -> None:
    assert verdict(None, figures()) is None


def test_parse_evaluation_keeps_good_pieces_and_drops_bad_ones() -> None:
    raw = {
        "baseline": {"loss": 3.0, "perplexity": 20.08, "score": 0.0},
        "stages": [
            {"name": "cpt", "loss": 2.5, "perplexity": 12.2},
            {"loss": 1.0},  # no name
            "junk",
            {"name": "sft", "loss": -1, "perplexity": 0.5, "score": 1.5},
        ],
        "final": {"loss": float("nan"), "perplexity": 9.0, "score": True},
        "passed": "yes",
    }
    assert parse_evaluation(raw) == EvaluationStatus(
        baseline=EvaluationMetrics(loss=3.0, perplexity=20.08, score=0.0),
        stages=[
            StageEvaluation(name="cpt", loss=2.5, perplexity=12.2),
            StageEvaluation(name="sft"),
        ],
        final=EvaluationMetrics(perplexity=9.0),
        passed=None,
    )
    assert parse_evaluation("nope") is None


def test_trainer_cannot_claim_promotable() -> None:
    text = json.dumps({"output": {"uri": "pvc://o", "kind": "adapter", "promotable": True}})
    out = progress_from_annotation(text).output
    assert out is not None and out.promotable is None


# Operator roll-up -------------------------------------------------------------------------

NODES = {"n0": node("n0"), "n1": node("n1")}


def finished_job(report: dict[str, Any] | None, gate: dict[str, Any] | None) -> Any:
    spec: dict[str, Any] = {}
    if gate is not False:
        ev: dict[str, Any] = {"datasets": [TEXT, QA]}
        if gate is not None:
            ev["gate"] = gate
        spec["evaluation"] = ev
    body = job(**spec)
    body["status"] = run(body, [], {}).status.wire()
    p0 = pod(1, 0, "n0", phase="Succeeded")
    pods = [p0, pod(1, 1, "n1", phase="Succeeded")]
    return run(body, pods, NODES, lease=lease(report) if report is not None else None)


REPORT = {
    "state": "succeeded",
    "output": {"uri": "pvc://models/out", "kind": "adapter"},
    "evaluation": {
        "baseline": {"loss": 3.0, "perplexity": 20.0, "score": 0.0},
        "stages": [{"name": "stage-0", "loss": 2.3, "perplexity": 10.0, "score": 0.6}],
        "final": {"loss": 2.3, "perplexity": 10.0, "score": 0.6},
        # The operator recomputes the verdict; a trainer's claim counts for nothing.
        "passed": True,
    },
}


def test_gate_passes_job_succeeds_promotable() -> None:
    plan = finished_job(REPORT, {"maxPerplexityRatio": 0.8, "minScore": 0.5})
    c = cond(plan, "EvaluationPassed")
    assert (c.status, c.reason) == ("True", "GatePassed")
    assert "perplexity 20 -> 10 (ratio 0.500), score 0% -> 60%" in c.message
    assert plan.status.phase is not None and plan.status.phase.value == "Succeeded"
    assert plan.status.output is not None and plan.status.output.promotable is True
    ev = plan.status.evaluation
    assert ev is not None and ev.passed is True and ev.stages[0].name == "stage-0"


def test_gate_fails_job_still_succeeds_not_promotable() -> None:
    plan = finished_job(REPORT, {"minScore": 0.9})
    c = cond(plan, "EvaluationPassed")
    assert (c.status, c.reason) == ("False", "GateFailed")
    assert "score 60% below minScore 90%" in c.message
    assert plan.status.phase is not None and plan.status.phase.value == "Succeeded"
    assert plan.status.output is not None and plan.status.output.promotable is False
    assert plan.status.evaluation is not None and plan.status.evaluation.passed is False


def test_gate_without_figures_is_not_promotable() -> None:
    plan = finished_job({"state": "succeeded"}, {"minScore": 0.1})
    c = cond(plan, "EvaluationPassed")
    assert (c.status, c.reason) == ("False", "NotEvaluated")
    assert plan.status.output is not None and plan.status.output.promotable is False


def test_no_gate_reports_figures_and_stays_promotable() -> None:
    plan = finished_job(REPORT, None)
    c = cond(plan, "EvaluationPassed")
    assert (c.status, c.reason) == ("True", "NoGate")
    assert plan.status.output is not None and plan.status.output.promotable is True
    assert plan.status.evaluation is not None and plan.status.evaluation.passed is None


def test_job_without_evaluation_is_promotable_and_has_no_condition() -> None:
    plan = finished_job({"state": "succeeded"}, False)
    assert all(c.type != "EvaluationPassed" for c in plan.status.conditions)
    assert plan.status.output is not None and plan.status.output.promotable is True


def test_evaluation_rolls_up_while_running() -> None:
    body = job(evaluation={"datasets": [TEXT]})
    body["status"] = run(body, [], {}).status.wire()
    report = {"evaluation": {"baseline": {"loss": 3.0, "perplexity": 20.0}}}
    plan = run(body, [pod(1, 0, "n0"), pod(1, 1, "n1")], NODES, lease=lease(report))
    assert plan.status.evaluation == EvaluationStatus(
        baseline=EvaluationMetrics(loss=3.0, perplexity=20.0)
    )
    assert all(c.type != "EvaluationPassed" for c in plan.status.conditions)
