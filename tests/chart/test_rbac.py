"""The chart grants the operator exactly what its code calls: every Kubernetes API call in
graft/kube.py, what Kopf itself needs, and what the trainer identities it creates hold (a
Role can only grant what its creator holds). A verb no code uses fails this test, and so
does a call the chart forgot."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
from helm import REPO_ROOT, render

from graft import kube
from graft.api.finetunejob import FineTuneJob, Placement
from graft.builders.finetunejob import build_trainer_identity

Rule = tuple[str, str, str]  # (apiGroup, resource, verb)

KUBE_PY = REPO_ROOT / "operator" / "src" / "graft" / "kube.py"
RBAC_GROUP = "rbac.authorization.k8s.io"
_API_GROUPS = {
    "core": "",
    "rbac": RBAC_GROUP,
    "coordination": "coordination.k8s.io",
    "networking": "networking.k8s.io",
}
_VERBS = {"read": "get", "get": "get", "list": "list", "create": "create", "delete": "delete"}
#: Custom resources the operator server-side applies (creates) as children.
APPLIED_CUSTOM = {"rayservices"}

#: What Kopf does on its own (kopf.dev/en/stable/deployment/#rbac): watch what it serves or
#: indexes, patch the served resources (finalizers, status.graft), post Events, and follow
#: CRDs and (cluster-wide) namespaces. finalizers/update: a child's owner reference with
#: blockOwnerDeletion needs it on the owner.
KOPF: set[Rule] = {
    *(
        ("graft.dev", r, v)
        for r in ("finetunejobs", "modelservices")
        for v in ("list", "watch", "patch")
    ),
    ("graft.dev", "finetunejobs/status", "patch"),
    ("graft.dev", "modelservices/status", "patch"),
    ("graft.dev", "finetunejobs/finalizers", "update"),
    ("graft.dev", "modelservices/finalizers", "update"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("coordination.k8s.io", "leases", "list"),
    ("coordination.k8s.io", "leases", "watch"),
    ("", "nodes", "list"),
    ("", "nodes", "watch"),
    ("ray.io", "rayservices", "list"),
    ("ray.io", "rayservices", "watch"),
    ("", "events", "create"),
    ("events.k8s.io", "events", "create"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
CLUSTER_WIDE_ONLY = {("", "namespaces", "list"), ("", "namespaces", "watch")}


def _plural(snake: str) -> str:
    word = snake.replace("_", "")
    return word[:-1] + "ies" if word.endswith("y") else word + "s"


def calls_in_kube_py(path: Path = KUBE_PY) -> set[Rule]:
    """(group, resource, verb) of every ``self.<api>.<method>`` that kube.py names."""
    out: set[Rule] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
            and node.value.attr in ("core", "rbac", "custom", "coordination", "networking")
        ):
            continue
        m = re.fullmatch(
            r"(create|delete|patch|read|list|get)_(namespaced_)?(\w+?)(_status)?", node.attr
        )
        assert m, f"kube.py calls {node.value.attr}.{node.attr}: teach this test its rule"
        verb, kind, status = m.group(1), m.group(3), m.group(4)
        if node.value.attr == "custom":
            targets = [(api.split("/")[0], plural) for (api, _), plural in kube._CUSTOM.items()]
            if status:  # the operator writes the status of its own resources only
                targets = [t for t in targets if t[0] == "graft.dev"]
        else:
            targets = [(_API_GROUPS[node.value.attr], _plural(kind))]
        for group, resource in targets:
            res = resource + ("/status" if status else "")
            if verb == "patch":
                out.add((group, res, "patch"))
                # server-side apply of an object that does not exist yet is authorized as
                # create (kube.apply); status patches and graft's own resources never are
                if (
                    not status
                    and (group != "graft.dev")
                    and (node.value.attr != "custom" or resource in APPLIED_CUSTOM)
                ):
                    out.add((group, res, "create"))
            else:
                out.add((group, res, _VERBS[verb]))
    return out


def trainer_identity_rules() -> set[Rule]:
    job = FineTuneJob.model_validate(
        {
            "metadata": {"name": "j", "namespace": "n"},
            "spec": {
                "baseModel": {"uri": "pvc://m/b"},
                "stages": [{"type": "SFT", "dataset": {"uri": "pvc://d/x"}}],
                "output": {"uri": "pvc://m/o"},
            },
        }
    )
    out: set[Rule] = set()
    for obj in build_trainer_identity(job, Placement(node_pool="p", nodes=1, gpus_per_node=0), 1):
        for rule in obj.get("rules") or []:
            out |= {
                (g, r, v)
                for g in rule["apiGroups"]
                for r in rule["resources"]
                for v in rule["verbs"]
            }
    return out


def granted(docs: list[dict[str, Any]]) -> set[Rule]:
    out: set[Rule] = set()
    for doc in docs:
        if doc.get("kind") not in ("ClusterRole", "Role"):
            continue
        for rule in doc.get("rules") or []:
            assert "resourceNames" not in rule
            out |= {
                (g, r, v)
                for g in rule.get("apiGroups", [])
                for r in rule.get("resources", [])
                for v in rule.get("verbs", [])
            }
    return out


@pytest.mark.usefixtures("helm")
@pytest.mark.parametrize("values", [{}, {"watchNamespace": "team-a"}], ids=["cluster", "ns"])
def test_the_chart_grants_exactly_what_the_code_calls(values: dict[str, Any]) -> None:
    needed = calls_in_kube_py() | KOPF | trainer_identity_rules()
    if not values:
        needed |= CLUSTER_WIDE_ONLY
    have = granted(render(values))
    assert sorted(have - needed) == [], "granted but never called: drop them"
    assert sorted(needed - have) == [], "called but not granted: add them to the chart"


def test_the_call_scanner_sees_kube_py_calls() -> None:
    calls = calls_in_kube_py()
    assert ("", "pods", "create") in calls and ("", "pods", "delete") in calls
    assert ("", "configmaps", "patch") in calls and ("", "configmaps", "create") in calls
    assert ("ray.io", "rayservices", "patch") in calls
    assert ("graft.dev", "finetunejobs/status", "patch") in calls
    assert ("graft.dev", "finetunejobs", "create") not in calls
