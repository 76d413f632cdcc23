"""What handlers.startup tells Kopf, checked against the handlers Kopf has registered."""

from __future__ import annotations

import kopf

import graft.handlers.finetunejob  # registers the handlers
import graft.handlers.modelservice  # noqa: F401
from graft.api.modelservice import PLURAL as MODELSERVICES
from graft.handlers.startup import LeanStatusDiffBaseStorage


def test_only_the_kinds_the_lean_diff_base_covers_have_change_handlers() -> None:
    """The lean diff base is built only for CHANGE_HANDLED kinds; a change handler (or a
    daemon) on any other resource would then never see a change."""
    registry = kopf.get_default_registry()
    handlers = [*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers()]
    assert handlers
    covered = {group for group, _ in LeanStatusDiffBaseStorage.CHANGE_HANDLED}
    for h in handlers:
        assert (h.selector.group, h.selector.any_name) in {(g, MODELSERVICES) for g in covered}, h


def test_the_lean_diff_base_is_the_spec_and_labels_for_modelservices_and_none_else() -> None:
    storage = LeanStatusDiffBaseStorage(field="status.graft.lastHandledConfiguration")
    meta = {"name": "m", "labels": {"a": "b"}, "managedFields": [{"x": 1}]}
    svc = {"apiVersion": "graft.dev/v1alpha1", "kind": "ModelService", "metadata": meta}
    essence = storage.build(body=kopf.Body({**svc, "spec": {"x": 1}, "status": {"y": 2}}))
    assert essence["spec"] == {"x": 1} and essence["metadata"] == {"labels": {"a": "b"}}
    assert "status" not in essence
    for other in (
        {"apiVersion": "graft.dev/v1alpha1", "kind": "FineTuneJob", "metadata": meta},
        {"apiVersion": "v1", "kind": "Pod", "metadata": meta},
    ):
        assert storage.build(body=kopf.Body(other)) is None
