"""FineTuneJob reconciler."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from graft.api.common import is_true
from graft.api.finetunejob import FineTuneJobPhase, FineTuneJobSpec
from graft.config import Settings
from graft.kube import Kube
from graft.reconcile.conditions import dump_conditions, load_conditions, with_condition
from graft.validation import InvalidSpec, parse_spec

log = logging.getLogger(__name__)


async def reconcile(kube: Kube, settings: Settings, body: kopf.Body) -> dict[str, Any]:
    """Return the status patch for ``body``."""
    del kube, settings  # used once the gang is reconciled
    generation = body.metadata.get("generation")
    conditions = load_conditions(dict(body.get("status") or {}))
    try:
        parse_spec(FineTuneJobSpec, body.spec)
    except InvalidSpec as e:
        msg = str(e)
        conditions = with_condition(conditions, "Accepted", False, "InvalidSpec", msg, generation)
        conditions = with_condition(conditions, "Failed", True, "InvalidSpec", str(e), generation)
        kopf.warn(body, reason="InvalidSpec", message=str(e))
        return {
            "phase": FineTuneJobPhase.FAILED.value,
            "conditions": dump_conditions(conditions),
            "observedGeneration": generation,
        }
    if not is_true(conditions, "Accepted"):
        kopf.info(body, reason="Accepted", message="spec is valid")
    conditions = with_condition(
        conditions, "Accepted", True, "Validated", "spec is valid", generation
    )
    return {
        "phase": FineTuneJobPhase.PENDING.value,
        "conditions": dump_conditions(conditions),
        "observedGeneration": generation,
    }
