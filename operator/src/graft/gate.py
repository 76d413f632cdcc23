"""The evaluation gate: one pure verdict on the trainer's figures, shared by the trainer
(``graft run``'s state file, the progress JSON) and the operator (status.evaluation, the
EvaluationPassed condition, status.output.promotable).

The operator recomputes the verdict from the figures and the spec instead of trusting the
``passed`` a trainer writes, so a workload cannot promote itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graft.api.finetunejob import (
    Evaluation,
    EvaluationMetrics,
    EvaluationStatus,
    StageEvaluation,
)

#: Reasons of the EvaluationPassed condition.
GATE_PASSED = "GatePassed"
GATE_FAILED = "GateFailed"
NO_GATE = "NoGate"
NOT_EVALUATED = "NotEvaluated"


@dataclass(frozen=True)
class Verdict:
    """What the gate says about one evaluation.

    ``passed`` is None without a gate; ``promotable`` is False only when a gate failed or
    could not be checked (figures missing).
    """

    passed: bool | None
    promotable: bool
    reason: str
    message: str


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0%}" if pct else f"{value:.4g}"


def describe(ev: EvaluationStatus) -> str:
    """``perplexity 12.3 -> 7.9 (ratio 0.64), score 0% -> 62%`` for messages and logs."""
    base = ev.baseline or EvaluationMetrics()
    final = ev.final or EvaluationMetrics()
    parts = []
    if base.perplexity is not None or final.perplexity is not None:
        text = f"perplexity {_fmt(base.perplexity)} -> {_fmt(final.perplexity)}"
        ratio = perplexity_ratio(ev)
        if ratio is not None:
            text += f" (ratio {ratio:.3f})"
        parts.append(text)
    if base.score is not None or final.score is not None:
        parts.append(f"score {_fmt(base.score, True)} -> {_fmt(final.score, True)}")
    return ", ".join(parts) or "no figures"


def perplexity_ratio(ev: EvaluationStatus) -> float | None:
    """final / baseline perplexity; None when either is missing."""
    if ev.baseline is None or ev.final is None:
        return None
    b, f = ev.baseline.perplexity, ev.final.perplexity
    if b is None or f is None or b <= 0:
        return None
    return f / b


def verdict(spec: Evaluation | None, ev: EvaluationStatus | None) -> Verdict | None:
    """The gate's verdict on a finished evaluation; None when the job has no spec.evaluation."""
    if spec is None:
        return None
    gate = spec.gate
    if ev is None or ev.final is None:
        if gate is None or (gate.max_perplexity_ratio is None and gate.min_score is None):
            return Verdict(None, True, NO_GATE, "no gate set; the trainer reported no figures")
        return Verdict(
            False,
            False,
            NOT_EVALUATED,
            "the trainer reported no final evaluation, so the gate could not be checked; "
            "look at the trainer's log, or run the job again with a trainer image that "
            "evaluates (the output is kept but not promotable)",
        )
    figures = describe(ev)
    if gate is None or (gate.max_perplexity_ratio is None and gate.min_score is None):
        return Verdict(None, True, NO_GATE, f"no gate set; {figures}")
    failed: list[str] = []
    missing: list[str] = []
    if gate.max_perplexity_ratio is not None:
        ratio = perplexity_ratio(ev)
        if ratio is None:
            missing.append("perplexity")
        elif ratio > gate.max_perplexity_ratio:
            failed.append(
                f"perplexity ratio {ratio:.3f} above maxPerplexityRatio "
                f"{gate.max_perplexity_ratio:g}"
            )
    if gate.min_score is not None:
        score = ev.final.score
        if score is None:
            missing.append("score")
        elif score < gate.min_score:
            failed.append(f"score {score:.0%} below minScore {gate.min_score:.0%}")
    if missing:
        return Verdict(
            False,
            False,
            NOT_EVALUATED,
            f"gate could not be checked: no {' or '.join(missing)} in the evaluation ({figures})",
        )
    if failed:
        return Verdict(
            False,
            False,
            GATE_FAILED,
            f"{'; '.join(failed)} ({figures}); the output is kept but not promotable: "
            "improve the data or hyperparameters, or relax spec.evaluation.gate",
        )
    return Verdict(True, True, GATE_PASSED, figures)


#: Bounds of each figure, as the API declares them.
_BOUNDS = {"loss": (0.0, math.inf), "perplexity": (1.0, math.inf), "score": (0.0, 1.0)}


def _figures(raw: Mapping[str, Any]) -> dict[str, float]:
    keep = {}
    for key, (lo, hi) in _BOUNDS.items():
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value) and lo <= value <= hi:
            keep[key] = float(value)
    return keep


def _metrics(raw: Any) -> EvaluationMetrics | None:
    return EvaluationMetrics(**_figures(raw)) if isinstance(raw, Mapping) else None


def _stage(raw: Any) -> StageEvaluation | None:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not raw["name"]:
        return None
    return StageEvaluation(name=raw["name"][:253], **_figures(raw))


def parse_evaluation(raw: Any, max_stages: int = 16) -> EvaluationStatus | None:
    """The trainer's ``evaluation`` object, validated piece by piece; never raises.

    A NaN, a negative loss or a score above 1 is dropped, the rest kept; ``passed`` is
    kept as reported (the operator replaces it with its own verdict).
    """
    if not isinstance(raw, Mapping):
        return None
    stages = raw.get("stages")
    parsed = (_stage(x) for x in (stages if isinstance(stages, list) else []))
    parsed_stages = [s for s in parsed if s is not None][:max_stages]
    passed = raw.get("passed")
    return EvaluationStatus(
        baseline=_metrics(raw.get("baseline")),
        stages=parsed_stages,
        final=_metrics(raw.get("final")),
        passed=passed if isinstance(passed, bool) else None,
    )


__all__ = [
    "GATE_FAILED",
    "GATE_PASSED",
    "NOT_EVALUATED",
    "NO_GATE",
    "Verdict",
    "describe",
    "parse_evaluation",
    "perplexity_ratio",
    "verdict",
]
