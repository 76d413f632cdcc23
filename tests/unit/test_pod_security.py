"""Every pod the FineTuneJob builders render meets the "restricted" Pod Security Standard
and Graft's hardening rules (graft.testing.pss, shared with the Ray pod tests)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from builders_fixtures import FineTuneJobBuilder, a100_80g, cpu_pool, settings

from graft.builders.finetunejob import build_pods
from graft.placement import place
from graft.testing.pss import all_violations, hardening_violations, restricted_violations

SETTINGS = settings(a100_80g(), cpu_pool())

JOBS = {
    "two-nodes": FineTuneJobBuilder().nodes(2, 8),
    "one-gpu-node": FineTuneJobBuilder().gpus(8),
    "cpu": FineTuneJobBuilder("tiny").pool("cpu").cpu("2", "4Gi"),
    "queued": FineTuneJobBuilder("7b-sft").nodes(2, 8).queue("team-q").image("t:1"),
    "s3-and-dots": FineTuneJobBuilder("llama.v2").gpus(8).output("s3://bucket/out"),
}


def rendered(builder: FineTuneJobBuilder, attempt: int = 1) -> list[dict[str, Any]]:
    job = builder.obj()
    placement = place(job.spec.resources, SETTINGS.node_pools)
    pool = SETTINGS.pool(placement.node_pool)
    assert pool is not None
    return build_pods(job, placement, pool, attempt, "pvc://x/c", SETTINGS, avoid_nodes=["n1"])


@pytest.mark.parametrize("case", sorted(JOBS))
def test_every_trainer_pod_is_restricted(case: str) -> None:
    for pod in rendered(JOBS[case]):
        assert all_violations(pod) == [], pod["metadata"]["name"]


def test_the_checker_finds_what_the_profile_forbids() -> None:
    (pod,) = rendered(JOBS["one-gpu-node"])
    bad = copy.deepcopy(pod)
    spec = bad["spec"]
    del spec["securityContext"]["runAsNonRoot"]
    del spec["securityContext"]["seccompProfile"]
    c = spec["containers"][0]
    c["securityContext"] = {"capabilities": {"add": ["SYS_ADMIN"]}, "privileged": True}
    spec["hostNetwork"] = True
    spec["volumes"].append({"name": "h", "hostPath": {"path": "/"}})
    c["ports"][0]["hostPort"] = 29500
    found = "\n".join(restricted_violations(bad))
    for words in (
        "hostNetwork",
        "hostPath",
        "privileged",
        "allowPrivilegeEscalation",
        "runAsNonRoot",
        "seccompProfile",
        "drop ALL",
        "NET_BIND_SERVICE",
        "hostPort",
    ):
        assert words in found, words
    del c["resources"]["limits"]
    spec["volumes"][1]["emptyDir"].pop("sizeLimit")
    harden = "\n".join(hardening_violations(bad))
    assert "readOnlyRootFilesystem" in harden
    assert "resources.limits" in harden
    assert "sizeLimit" in harden
