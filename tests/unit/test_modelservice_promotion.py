"""ModelService promotion gate and canaries, in the pure ``decide`` (no cluster)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import yaml

from graft.builders.serve_config import canary_version
from graft.config import load_settings
from graft.reconcile import modelservice as ms
from graft.testing.cluster import TEST_NODE_POOLS

NOW = dt.datetime(2026, 12, 1, 3, 0, 0, tzinfo=dt.UTC)
SETTINGS = load_settings({"GRAFT_NODE_POOLS": json.dumps(TEST_NODE_POOLS)})


def svc(adapters: list[dict[str, Any]], status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "graft.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {"name": "s", "namespace": "ns", "generation": 1, "uid": "u"},
        "spec": {"model": {"baseModel": {"uri": "pvc://models/llama"}, "adapters": adapters}},
        "status": status or {},
    }


def job(
    uri: str = "pvc://models/a",
    *,
    passed: bool | None = None,
    gate: bool = False,
    promotable: bool | None = None,
    evaluated: bool = True,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Succeeded", "output": {"uri": uri, "kind": "adapter"}}
    if promotable is not None:
        status["output"]["promotable"] = promotable
    if evaluated:
        status["evaluation"] = {"baseline": {"loss": 3.0, "perplexity": 20.1}, "passed": passed}
        if passed is not None:
            status["conditions"] = [
                {
                    "type": "EvaluationPassed",
                    "status": "True" if passed else "False",
                    "reason": "GatePassed" if passed else "GateFailed",
                    "message": "perplexity ratio 1.20 > maxPerplexityRatio 0.90",
                }
            ]
    spec: dict[str, Any] = {"output": {"uri": uri}}
    if gate:
        spec["evaluation"] = {"gate": {"maxPerplexityRatio": 0.9}}
    return {"spec": spec, "status": status}


def cond(plan: ms.Plan, type_: str) -> Any:
    return next(c for c in plan.status.conditions if c.type == type_)


def user_config(plan: ms.Plan) -> list[dict[str, Any]]:
    assert plan.rayservice is not None
    cfg = yaml.safe_load(plan.rayservice["spec"]["serveConfigV2"])
    out: list[dict[str, Any]] = cfg["applications"][0]["deployments"][0]["user_config"]["adapters"]
    return out


@pytest.mark.parametrize(
    ("job_obj", "allow", "served"),
    [
        (job(passed=True, gate=True), False, True),
        (job(passed=False, gate=True), False, False),
        (job(passed=False, gate=True), True, True),
        (job(evaluated=False), False, True),  # no gate, no evaluation
        (job(passed=None), False, True),  # evaluated without a gate
        (job(evaluated=False, gate=True), False, False),  # gate but no result yet
        (job(evaluated=False, promotable=False), False, False),
    ],
)
def test_promotion_gate(job_obj: dict[str, Any], allow: bool, served: bool) -> None:
    adapter: dict[str, Any] = {"name": "a", "fromFineTuneJob": "j"}
    if allow:
        adapter["allowUnevaluated"] = True
    plan = ms.decide(svc([adapter]), {"j": job_obj}, None, SETTINGS, NOW)
    assert [a["name"] for a in user_config(plan)] == (["a"] if served else [])
    c = cond(plan, "AdaptersReady")
    assert (c.status == "True") == served
    if not served:
        assert c.reason == "EvaluationGateFailed"
        assert "allowUnevaluated: true" in c.message and "'j'" in c.message
        assert "EvaluationGateFailed" in {e[1] for e in plan.events}


def test_gate_message_carries_the_figures() -> None:
    plan = ms.decide(
        svc([{"name": "a", "fromFineTuneJob": "j"}]),
        {"j": job(passed=False, gate=True)},
        None,
        SETTINGS,
        NOW,
    )
    assert "perplexity ratio 1.20 > maxPerplexityRatio 0.90" in cond(plan, "AdaptersReady").message


V2 = canary_version("pvc://models/a-v2")


def canary_adapter(weight: int = 10, uri: str = "pvc://models/a-v2") -> dict[str, Any]:
    return {
        "name": "a",
        "uri": "pvc://models/a-v1",
        "canary": {"uri": uri, "weight": weight, "rollback": {"minRequests": 5}},
    }


def test_canary_is_rendered_and_reported_in_status() -> None:
    plan = ms.decide(svc([canary_adapter()]), {}, None, SETTINGS, NOW)
    [a] = user_config(plan)
    assert a["uri"] == "pvc://models/a-v1"
    assert a["canary"] == {
        "uri": "pvc://models/a-v2",
        "version": canary_version("pvc://models/a-v2"),
        "weight": 10,
        "windowSeconds": 60.0,
        "minRequests": 5,
        "maxErrorRateIncrease": 0.05,
        "maxP99LatencyRatio": 1.5,
    }
    [c] = plan.status.canaries
    assert (c.name, c.state, c.weight, c.stable_uri, c.canary_uri) == (
        "a",
        "Progressing",
        10,
        "pvc://models/a-v1",
        "pvc://models/a-v2",
    )
    assert ("Normal", "CanaryStarted") in {(e[0], e[1]) for e in plan.events}


def passes(body: dict[str, Any], reports: list[dict[str, Any]], live: Any = None) -> ms.Plan:
    plan = ms.decide(body, {}, live, SETTINGS, NOW, reports)
    body["status"] = plan.status.model_dump(by_alias=True, exclude_none=True, mode="json")
    return plan


def test_replica_rollback_report_sticks_until_a_new_version() -> None:
    body = svc([canary_adapter()])
    first = passes(body, [])
    version = canary_version("pvc://models/a-v2")
    report = {
        "canaries": {
            "a": {"version": version, "state": "RolledBack", "reason": "error rate 100.0%"}
        }
    }
    rolled = passes(body, [{"canaries": {}}, report], first.rayservice)
    [a] = user_config(rolled)
    assert "canary" not in a
    [c] = rolled.status.canaries
    assert (c.state, c.weight, c.reason) == ("RolledBack", 0, "error rate 100.0%")
    assert ("Warning", "CanaryRolledBack") in {(e[0], e[1]) for e in rolled.events}
    # later passes without reports keep it rolled back and say nothing more
    again = passes(body, [], rolled.rayservice)
    assert again.rayservice is None and again.status.canaries[0].state == "RolledBack"
    assert not again.events
    # a new canary version starts again
    body["spec"]["model"]["adapters"] = [canary_adapter(uri="pvc://models/a-v3")]
    fresh = passes(body, [], rolled.rayservice)
    assert fresh.status.canaries[0].state == "Progressing"
    assert user_config(fresh)[0]["canary"]["uri"] == "pvc://models/a-v3"


@pytest.mark.parametrize(
    "report",
    [
        {"canaries": {"a": {"version": "someoneelse", "state": "RolledBack"}}},
        {
            "canaries": {
                "zzz": {"version": canary_version("pvc://models/a-v2"), "state": "RolledBack"}
            }
        },
        {"canaries": {"a": {"version": canary_version("pvc://models/a-v2"), "state": "Promote"}}},
        {"canaries": ["a"]},
        {"canaries": None},
    ],
)
def test_reports_that_do_not_match_are_ignored(report: dict[str, Any]) -> None:
    body = svc([canary_adapter()])
    passes(body, [])
    plan = passes(body, [report])
    assert plan.status.canaries[0].state == "Progressing"


def test_promotion_and_removal_are_events() -> None:
    body = svc([canary_adapter()])
    passes(body, [])
    body["spec"]["model"]["adapters"] = [{"name": "a", "uri": "pvc://models/a-v2"}]
    promoted = passes(body, [])
    assert promoted.status.canaries == []
    assert "CanaryPromoted" in {e[1] for e in promoted.events}
    body["spec"]["model"]["adapters"] = [canary_adapter()]
    passes(body, [])
    body["spec"]["model"]["adapters"] = [{"name": "a", "uri": "pvc://models/a-v1"}]
    assert "CanaryRemoved" in {e[1] for e in passes(body, []).events}


def test_canary_from_a_gated_job_waits_and_stable_keeps_serving() -> None:
    adapter = {
        "name": "a",
        "uri": "pvc://models/a-v1",
        "canary": {"fromFineTuneJob": "j2", "weight": 20},
    }
    plan = ms.decide(svc([adapter]), {"j2": job(passed=False, gate=True)}, None, SETTINGS, NOW)
    assert user_config(plan) == [{"name": "a", "uri": "pvc://models/a-v1"}]
    [c] = plan.status.canaries
    assert c.state == "Waiting" and c.weight == 0
    assert c.reason is not None and "evaluation gate" in c.reason


def test_canary_spec_is_checked() -> None:
    bad = canary_adapter()
    bad["canary"]["fromFineTuneJob"] = "j"
    plan = ms.decide(svc([bad]), {}, None, SETTINGS, NOW)
    assert cond(plan, "Accepted").reason == "InvalidSpec"
    assert "exactly one of uri or fromFineTuneJob" in cond(plan, "Accepted").message


def running(plan: ms.Plan) -> dict[str, Any]:
    """The plan's RayService as KubeRay reports it once the Serve app runs."""
    assert plan.rayservice is not None
    live = json.loads(json.dumps(plan.rayservice))
    live["metadata"]["generation"] = 1
    live["status"] = {
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "True"}],
        "activeServiceStatus": {"applicationStatuses": {ms.APP_NAME: {"status": "RUNNING"}}},
    }
    return live


def test_adapters_the_replicas_could_not_load_are_a_condition() -> None:
    body = svc([{"name": "a", "uri": "pvc://models/a"}, {"name": "b", "uri": "pvc://models/b"}])
    first = passes(body, [])
    live = running(first)
    assert ms.serves_adapters(live) and not ms.serves_adapters(None)
    ok = {"failedAdapters": {}}
    bad = {"failedAdapters": {"b": "failed to load; see the replica's log", "s": "name taken"}}
    failed = passes(body, [ok, bad], live)
    c = cond(failed, "AdaptersReady")
    assert (c.status, c.reason) == ("False", "AdapterLoadFailed")
    assert "adapter(s) b failed to load, in 1 of 2 replica report(s)" in c.message
    assert [e[1] for e in failed.events if e[0] == "Warning"] == ["AdapterLoadFailed"]
    assert failed.rayservice is None  # a condition only: nothing is re-rendered
    # no replica answers: the failure stands, and is not announced again
    quiet = passes(body, [], live)
    assert cond(quiet, "AdaptersReady").reason == "AdapterLoadFailed" and not quiet.events
    # the replicas load it now (a new replica, say): resolved again
    fixed = passes(body, [ok, ok], live)
    assert (cond(fixed, "AdaptersReady").status, cond(fixed, "AdaptersReady").reason) == (
        "True",
        "AllResolved",
    )


def test_a_load_failure_is_forgotten_when_the_served_config_changes() -> None:
    body = svc([{"name": "b", "uri": "pvc://models/b"}])
    live = running(passes(body, []))
    passes(body, [{"failedAdapters": {"b": "x"}}], live)
    body["spec"]["model"]["adapters"] = [{"name": "b", "uri": "pvc://models/b-fixed"}]
    changed = passes(body, [], live)
    assert changed.rayservice is not None
    assert cond(changed, "AdaptersReady").reason == "AllResolved"


@pytest.mark.parametrize(
    "report",
    [{"failedAdapters": ["b"]}, {"failedAdapters": {"zzz": "x"}}, {"failedAdapters": None}, []],
)
def test_malformed_or_foreign_load_reports_are_ignored(report: Any) -> None:
    body = svc([{"name": "b", "uri": "pvc://models/b"}])
    live = running(passes(body, []))
    assert cond(passes(body, [report], live), "AdaptersReady").reason == "AllResolved"
