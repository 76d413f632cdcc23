"""Helpers shared by the reconcilers to write conditions into a status patch."""

from __future__ import annotations

from typing import Any

from graft.api.common import Condition, ConditionStatus, now_rfc3339, set_condition


def load_conditions(status: dict[str, Any] | None) -> list[Condition]:
    return [Condition.model_validate(c) for c in (status or {}).get("conditions", [])]


def with_condition(
    conditions: list[Condition],
    type_: str,
    status: bool | ConditionStatus,
    reason: str,
    message: str,
    generation: int | None,
    now: str | None = None,
) -> list[Condition]:
    st = (
        status
        if isinstance(status, ConditionStatus)
        else (ConditionStatus.TRUE if status else ConditionStatus.FALSE)
    )
    return set_condition(
        conditions,
        Condition(
            type=type_,
            status=st,
            reason=reason,
            message=message,
            last_transition_time=now or now_rfc3339(),
            observed_generation=generation,
        ),
    )


def dump_conditions(conditions: list[Condition]) -> list[dict[str, Any]]:
    return [c.wire() for c in conditions]
