"""Pure builders of a FineTuneJob's children, and the naming rules they share."""

from __future__ import annotations

import json
from typing import Any

import pytest
from builders_fixtures import (
    A100_SELECTOR,
    GPU_TOLERATION,
    FineTuneJobBuilder,
    a100_80g,
    cpu_pool,
    settings,
)

from graft.api.finetunejob import FineTuneJobSpec, Placement
from graft.builders import naming
from graft.builders.finetunejob import (
    build_config_map,
    build_gang_service,
    build_pods,
    checkpoint_uri,
    pvc_claims,
)
from graft.placement import place

SETTINGS = settings(a100_80g(), cpu_pool())


def two_by_eight() -> tuple[Any, Placement]:
    job = FineTuneJobBuilder("llama-sft", "team-a").gpus(16).pool("a100-80g").obj()
    return job, place(job.spec.resources, SETTINGS.node_pools)


def without_hash(obj: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(obj))
    out["metadata"]["annotations"].pop(naming.ANNOTATION_SPEC_HASH)
    if not out["metadata"]["annotations"]:
        del out["metadata"]["annotations"]
    return out


def labels(component: str, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "graft-trainer",
        "app.kubernetes.io/instance": "llama-sft",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "graft-operator",
        "app.kubernetes.io/part-of": "graft",
        "graft.dev/job": "llama-sft",
        **extra,
    }


def test_two_nodes_of_eight_gpus_whole_pod() -> None:
    job, placement = two_by_eight()
    assert placement == Placement(node_pool="a100-80g", nodes=2, gpus_per_node=8)
    pods = build_pods(
        job,
        placement,
        a100_80g(),
        3,
        "pvc://outputs/llama-sft/checkpoints/ckpt-s00-00000100",
        SETTINGS,
        avoid_nodes=["gpu-2", "gpu-1", "gpu-2"],
    )
    assert [p["metadata"]["name"] for p in pods] == ["llama-sft-a3-r0", "llama-sft-a3-r1"]
    assert without_hash(pods[1]) == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "llama-sft-a3-r1",
            "namespace": "team-a",
            "labels": labels("trainer", **{"graft.dev/attempt": "3", "graft.dev/rank": "1"}),
        },
        "spec": {
            "restartPolicy": "Never",
            "hostname": "llama-sft-r1",
            "subdomain": "llama-sft-gang",
            "enableServiceLinks": False,
            "serviceAccountName": "llama-sft-trainer",
            "terminationGracePeriodSeconds": 300,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65532,
                "runAsGroup": 65532,
                "fsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "nodeSelector": A100_SELECTOR,
            "tolerations": [GPU_TOLERATION],
            "affinity": {
                "nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "preference": {
                                "matchExpressions": [
                                    {
                                        "key": "kubernetes.io/hostname",
                                        "operator": "NotIn",
                                        "values": ["gpu-1", "gpu-2"],
                                    }
                                ]
                            },
                        }
                    ]
                },
                "podAntiAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "labelSelector": {
                                "matchLabels": {
                                    "graft.dev/job": "llama-sft",
                                    "graft.dev/attempt": "3",
                                }
                            },
                            "topologyKey": "kubernetes.io/hostname",
                        }
                    ]
                },
            },
            "containers": [
                {
                    "name": "trainer",
                    "image": "ghcr.io/graft-dev/graft-trainer:0.1.0",
                    "command": ["python", "-m", "graft.runtime.train"],
                    "env": [
                        {"name": "GRAFT_JOB_CONFIG", "value": "/etc/graft/job.json"},
                        {"name": "GRAFT_JOB_NAME", "value": "llama-sft"},
                        {"name": "GRAFT_ATTEMPT", "value": "3"},
                        {
                            "name": "GRAFT_RESUME_FROM",
                            "value": "pvc://outputs/llama-sft/checkpoints/ckpt-s00-00000100",
                        },
                        {"name": "GRAFT_NNODES", "value": "2"},
                        {"name": "GRAFT_NODE_RANK", "value": "1"},
                        {"name": "GRAFT_NPROC_PER_NODE", "value": "8"},
                        {"name": "MASTER_ADDR", "value": "llama-sft-r0.llama-sft-gang.team-a.svc"},
                        {"name": "MASTER_PORT", "value": "29500"},
                        {"name": "GRAFT_PVC_ROOT", "value": "/mnt/pvc"},
                        {
                            "name": "GRAFT_CHECKPOINT_URI",
                            "value": "pvc://outputs/llama-sft/checkpoints",
                        },
                        {
                            "name": "POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        },
                        {
                            "name": "POD_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                        {"name": "GRAFT_PROGRESS_LEASE", "value": "llama-sft-progress"},
                        {"name": "GRAFT_HEARTBEAT_INTERVAL_SECONDS", "value": "30"},
                        {"name": "GRAFT_TERMINATION_LOG", "value": "/dev/termination-log"},
                        {"name": "OMP_NUM_THREADS", "value": "4"},
                    ],
                    "ports": [{"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"}],
                    "resources": {
                        "requests": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "8"},
                        "limits": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "8"},
                    },
                    "volumeMounts": [
                        {"name": "config", "mountPath": "/etc/graft", "readOnly": True},
                        {"name": "dshm", "mountPath": "/dev/shm"},
                        {"name": "tmp", "mountPath": "/tmp"},
                        {"name": "pvc-data", "mountPath": "/mnt/pvc/data", "readOnly": True},
                        {"name": "pvc-models", "mountPath": "/mnt/pvc/models", "readOnly": True},
                        {"name": "pvc-outputs", "mountPath": "/mnt/pvc/outputs"},
                    ],
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                        "readOnlyRootFilesystem": True,
                        "runAsNonRoot": True,
                    },
                }
            ],
            "volumes": [
                {"name": "config", "configMap": {"name": "llama-sft-config"}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}},
                {"name": "pvc-data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models"}},
                {"name": "pvc-outputs", "persistentVolumeClaim": {"claimName": "outputs"}},
            ],
        },
    }


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<ref>") for e in pod["spec"]["containers"][0]["env"]}


def test_ranks_differ_only_in_rank_and_name() -> None:
    job, placement = two_by_eight()
    r0, r1 = build_pods(job, placement, a100_80g(), 1, None, SETTINGS, avoid_nodes=[])
    assert env_of(r0)["GRAFT_NODE_RANK"] == "0" and env_of(r1)["GRAFT_NODE_RANK"] == "1"
    assert env_of(r0)["GRAFT_RESUME_FROM"] == ""
    assert r0["spec"]["hostname"] == "llama-sft-r0"
    assert r0["metadata"]["labels"]["graft.dev/rank"] == "0"
    assert "nodeAffinity" not in r0["spec"]["affinity"]
    # ranks share one spec apart from identity, so their hashes differ
    assert (
        r0["metadata"]["annotations"]["graft.dev/spec-hash"]
        != r1["metadata"]["annotations"]["graft.dev/spec-hash"]
    )


def test_single_cpu_rank() -> None:
    job = FineTuneJobBuilder("tiny").pool("cpu").cpu("2", "4Gi").image("trainer:dev").obj()
    placement = place(job.spec.resources, SETTINGS.node_pools)
    (pod,) = build_pods(job, placement, cpu_pool(), 1, None, SETTINGS, avoid_nodes=[])
    spec = pod["spec"]
    assert env_of(pod)["GRAFT_NPROC_PER_NODE"] == "1"
    assert env_of(pod)["MASTER_ADDR"] == "tiny-r0.tiny-gang.team-a.svc"
    assert spec["containers"][0]["image"] == "trainer:dev"
    assert spec["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    # one rank: no pod anti-affinity needed, no node to avoid
    assert "affinity" not in spec
    assert spec["nodeSelector"] == {"graft.dev/pool": "cpu"}
    assert "tolerations" not in spec
    assert env_of(pod)["OMP_NUM_THREADS"] == "2"


def test_threads_follow_the_cpu_limit_not_the_node() -> None:
    """Fractions round down to at least one thread; GPUs share the rank's CPUs."""
    for cpu, threads in (("500m", "1"), ("1500m", "1"), ("3", "3")):
        job = FineTuneJobBuilder("tiny").pool("cpu").cpu(cpu, "4Gi").obj()
        placement = place(job.spec.resources, SETTINGS.node_pools)
        (pod,) = build_pods(job, placement, cpu_pool(), 1, None, SETTINGS, avoid_nodes=[])
        assert env_of(pod)["OMP_NUM_THREADS"] == threads, cpu


def test_kueue_labels() -> None:
    job = FineTuneJobBuilder().gpus(16).queue("team-a-queue").obj()
    placement = place(job.spec.resources, SETTINGS.node_pools)
    pods = build_pods(job, placement, a100_80g(), 2, None, SETTINGS, avoid_nodes=[])
    for pod in pods:
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "llama-sft-a2"
        assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "2"


def test_gpu_resource_name_from_pool() -> None:
    pool = a100_80g(gpuResource="amd.com/gpu")
    job = FineTuneJobBuilder().gpus(8).obj()
    (pod,) = build_pods(
        job, place(job.spec.resources, [pool]), pool, 1, None, SETTINGS, avoid_nodes=[]
    )
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "32",
        "memory": "256Gi",
        "amd.com/gpu": "8",
    }


def test_attempt_is_one_based() -> None:
    job, placement = two_by_eight()
    with pytest.raises(ValueError, match="1-based"):
        build_pods(job, placement, a100_80g(), 0, None, SETTINGS, avoid_nodes=[])


def test_gang_service() -> None:
    job, _ = two_by_eight()
    svc = build_gang_service(job)
    assert without_hash(svc) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "llama-sft-gang", "namespace": "team-a", "labels": labels("gang")},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"graft.dev/job": "llama-sft"},
            "ports": [
                {"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"}
            ],
        },
    }


def test_config_map() -> None:
    job = FineTuneJobBuilder().gpus(16).method("full").obj()
    placement = place(job.spec.resources, SETTINGS.node_pools)
    cm = build_config_map(job, placement, 2, "pvc://outputs/x/ckpt-s00-00000100", SETTINGS)
    assert cm["metadata"]["name"] == "llama-sft-config"
    assert cm["metadata"]["labels"] == labels("config")
    config = json.loads(cm["data"]["job.json"])
    assert {k: v for k, v in config.items() if k != "spec"} == {
        "name": "llama-sft",
        "namespace": "team-a",
        "attempt": 2,
        "resumeFrom": "pvc://outputs/x/ckpt-s00-00000100",
    }
    spec = FineTuneJobSpec.model_validate(config["spec"])  # the trainer reads it the same way
    assert spec.checkpoint.uri == "pvc://outputs/llama-sft/checkpoints"
    # llama-2-7b full fine-tune does not fit one 80G GPU: auto resolved to fsdp
    assert spec.resources.parallelism == "fsdp"
    first = build_config_map(job, placement, 1, None, SETTINGS)
    assert json.loads(first["data"]["job.json"])["resumeFrom"] is None


def test_builders_are_deterministic() -> None:
    job, placement = two_by_eight()

    def everything() -> list[dict[str, Any]]:
        return [
            build_config_map(job, placement, 1, None, SETTINGS),
            build_gang_service(job),
            *build_pods(job, placement, a100_80g(), 1, None, SETTINGS, avoid_nodes=["b", "a"]),
        ]

    assert everything() == everything()
    assert json.dumps(everything(), sort_keys=True) == json.dumps(everything(), sort_keys=True)


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        (FineTuneJobBuilder().output("pvc://out/run/"), "pvc://out/run/checkpoints"),
        (FineTuneJobBuilder().checkpoint("s3://ckpt/run"), "s3://ckpt/run"),
    ],
)
def test_checkpoint_uri(builder: FineTuneJobBuilder, expected: str) -> None:
    assert checkpoint_uri(builder.obj().spec) == expected


def test_pvc_claims_read_only_inputs() -> None:
    spec = (
        FineTuneJobBuilder()
        .base_model("pvc://shared/models/llama")
        .stage("ContinuedPretraining", "pvc://shared/corpus")
        .stage("SFT", "s3://bucket/sft.jsonl")
        .output("file:///tmp/out")
        .checkpoint("pvc://ckpt.fast/run")
        .obj()
        .spec
    )
    assert pvc_claims(spec) == {"ckpt.fast": True, "data": False, "shared": False}
    job = FineTuneJobBuilder().pool("cpu").checkpoint("pvc://ckpt.fast/run").obj()
    (pod,) = build_pods(
        job,
        place(job.spec.resources, [cpu_pool()]),
        cpu_pool(),
        1,
        None,
        SETTINGS,
        avoid_nodes=[],
    )
    names = [v["name"] for v in pod["spec"]["volumes"]]
    assert all(naming.is_dns_label(n) for n in names)
    assert len(names) == len(set(names))


# Naming ---------------------------------------------------------------------------------

LONG = "a" * 60 + "-" + "b" * 100


@pytest.mark.parametrize(
    ("name", "limit"),
    [
        (naming.child_name("short", "config"), 253),
        (naming.child_name(LONG, "config"), 253),
        (naming.child_name("x" * 250, "config"), 253),
        (naming.gang_service_name(LONG), 63),
        (naming.pod_hostname(LONG, 12), 63),
        (naming.pod_name("y" * 253, 7, 3), 253),
        (naming.label_value(LONG), 63),
        # a cut that lands right after a dash must not leave "--" or a trailing dash
        (naming.fit("a" * 54 + "-" * 20 + "b", 63), 63),
    ],
)
def test_names_stay_dns_1123(name: str, limit: int) -> None:
    assert len(name) <= limit
    assert naming.is_dns_label(name) if limit == 63 else naming.is_dns_subdomain(name)


def test_short_names_are_kept_and_long_ones_get_a_stable_hash() -> None:
    assert naming.child_name("job", "gang") == "job-gang"
    assert naming.child_name("job", "worker", 3) == "job-worker-3"
    cut = naming.gang_service_name(LONG)
    assert cut == naming.gang_service_name(LONG)
    assert cut.endswith("-" + naming.short_hash(LONG + "-gang"))
    # names that share the first 63 characters stay distinct
    assert naming.gang_service_name(LONG + "x") != naming.gang_service_name(LONG + "y")


def test_long_job_master_addr_uses_the_cut_names() -> None:
    job = FineTuneJobBuilder(LONG).gpus(16).obj()
    placement = place(job.spec.resources, SETTINGS.node_pools)
    r0, r1 = build_pods(job, placement, a100_80g(), 1, None, SETTINGS, avoid_nodes=[])
    host, sub = r0["spec"]["hostname"], r0["spec"]["subdomain"]
    assert env_of(r1)["MASTER_ADDR"] == f"{host}.{sub}.team-a.svc"
    assert build_gang_service(job)["metadata"]["name"] == sub
    for value in r0["metadata"]["labels"].values():
        assert len(value) <= 63


def test_spec_hash_is_stable_and_follows_the_spec() -> None:
    a = FineTuneJobBuilder().gpus(8).obj().spec
    b = FineTuneJobBuilder().gpus(8).obj().spec
    c = FineTuneJobBuilder().gpus(8).learning_rate(1e-5).obj().spec
    assert naming.spec_hash(a) == naming.spec_hash(b)
    assert naming.spec_hash(a) != naming.spec_hash(c)
    assert len(naming.spec_hash(a)) == naming.SPEC_HASH_LEN
    # key order does not matter, content does
    assert naming.spec_hash({"x": 1, "y": [1, 2]}) == naming.spec_hash({"y": [1, 2], "x": 1})
    assert naming.spec_hash({"y": [1, 2]}) != naming.spec_hash({"y": [2, 1]})
    # a known value, so an accidental change of the algorithm shows up
    assert naming.spec_hash({}) == "44136fa355b3678a"


def test_with_spec_hash_ignores_its_own_annotation() -> None:
    obj = {"metadata": {"name": "x"}, "spec": {"a": 1}}
    once = naming.with_spec_hash(obj)
    twice = naming.with_spec_hash(once)
    assert once == twice
    assert obj == {"metadata": {"name": "x"}, "spec": {"a": 1}}  # input untouched
    changed = naming.with_spec_hash({"metadata": {"name": "x"}, "spec": {"a": 2}})
    assert changed["metadata"]["annotations"] != once["metadata"]["annotations"]


def test_trainer_identity_may_update_only_its_lease_and_nothing_on_pods() -> None:
    from graft.builders.finetunejob import build_trainer_identity

    job, placement = two_by_eight()
    sa, role, binding = (without_hash(o) for o in build_trainer_identity(job, placement, 3))
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["name"] == "llama-sft-trainer"
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "update", "patch"],
            "resourceNames": ["llama-sft-progress"],
        }
    ]
    assert binding["roleRef"]["name"] == "llama-sft-trainer"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "llama-sft-trainer", "namespace": "team-a"}
    ]


# Names valid for every kind they name, from any valid resource name -----------------------

_DNS_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
ODD_NAMES = [
    "7b-sft",
    "llama.v2",
    "0",
    "1.2.3",
    "a.b-c.d",
    "9" * 253,
    "a" * 62 + ".b" * 95,
    "x" * 253,
    "a" * 61 + ".b",
]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_every_child_name_is_valid_for_its_kind(name: str) -> None:
    import re

    from graft.builders.finetunejob import build_trainer_identity

    assert naming.is_dns_subdomain(name)
    job = FineTuneJobBuilder(name).nodes(2, 8).queue("q").obj()
    placement = place(job.spec.resources, SETTINGS.node_pools)
    pods = build_pods(job, placement, a100_80g(), 1, None, SETTINGS, avoid_nodes=[])
    svc = build_gang_service(job)
    assert re.match(_DNS_1035, svc["metadata"]["name"]) and len(svc["metadata"]["name"]) <= 63
    hosts = set()
    for pod in pods:
        spec = pod["spec"]
        assert naming.is_dns_subdomain(pod["metadata"]["name"])
        assert naming.is_dns_label(spec["hostname"])
        assert spec["subdomain"] == svc["metadata"]["name"]
        assert all(naming.is_dns_label(v["name"]) for v in spec["volumes"])
        hosts.add(spec["hostname"])
        for value in pod["metadata"]["labels"].values():
            assert len(value) <= 63 and re.match(_LABEL_VALUE, value), value
    assert len(hosts) == len(pods)
    cm = build_config_map(job, placement, 1, None, SETTINGS)
    others = [cm, *build_trainer_identity(job, placement, 1)]
    assert all(naming.is_dns_subdomain(o["metadata"]["name"]) for o in others)
    assert naming.is_dns_subdomain(naming.progress_lease_name(name))


def test_names_that_needed_rewriting_stay_distinct() -> None:
    # "a.b" and "a-b" both become "a-b..." in a DNS label; the hash keeps them apart
    assert naming.gang_service_name("a.b") != naming.gang_service_name("a-b")
    assert naming.pod_hostname("a.b", 0) != naming.pod_hostname("a-b", 0)
    assert naming.gang_service_name("7b") != naming.gang_service_name("x7b")
    # names that were valid already are kept as they were
    assert naming.gang_service_name("llama-sft") == "llama-sft-gang"
    assert naming.pod_hostname("7b-sft", 1) == "7b-sft-r1"
    assert naming.gang_service_name("7b-sft").startswith("x7b-sft-gang-")
    assert naming.progress_lease_name("llama.v2") == "llama.v2-progress"


def test_claims_with_dots_and_long_names_get_distinct_volume_names() -> None:
    job = (
        FineTuneJobBuilder()
        .base_model("pvc://a.b/m")
        .stage("SFT", "pvc://a-b/d.jsonl")
        .output("pvc://" + "c" * 253 + "/o")
        .gpus(8)
        .obj()
    )
    placement = place(job.spec.resources, SETTINGS.node_pools)
    (pod,) = build_pods(job, placement, a100_80g(), 1, None, SETTINGS, avoid_nodes=[])
    names = [v["name"] for v in pod["spec"]["volumes"]]
    assert all(naming.is_dns_label(n) for n in names)
    assert len(names) == len(set(names))


def test_s3_credentials_come_from_a_secret_and_identity_from_an_account() -> None:
    from graft.builders.finetunejob import build_trainer_identity

    raw = FineTuneJobBuilder().gpus(8).output("s3://bucket/out").dict()
    raw["spec"]["s3"] = {
        "credentialsSecret": "team-s3",
        "endpointUrl": "http://minio.storage:9000",
        "region": "us-east-1",
        "serviceAccountName": "s3-reader",
    }
    from graft.api.finetunejob import FineTuneJob

    job = FineTuneJob.model_validate(raw)
    placement = place(job.spec.resources, SETTINGS.node_pools)
    (pod,) = build_pods(job, placement, a100_80g(), 1, None, SETTINGS, avoid_nodes=[])
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "team-s3",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert env["AWS_REGION"]["value"] == "us-east-1"
    assert pod["spec"]["serviceAccountName"] == "s3-reader"
    binding = build_trainer_identity(job, placement, 1)[2]
    assert [s["name"] for s in binding["subjects"]] == ["llama-sft-trainer", "s3-reader"]
    # nothing secret is written into the pod spec itself
    assert "secretKeyRef" not in json.dumps(pod["spec"]["volumes"])


def test_progress_lease_and_network_policy() -> None:
    from graft.builders.trainer_children import (
        build_network_policy,
        build_progress_lease,
        heartbeat_interval,
    )

    job, _ = two_by_eight()
    lease = without_hash(build_progress_lease(job, SETTINGS))
    assert lease["apiVersion"] == "coordination.k8s.io/v1" and lease["kind"] == "Lease"
    assert lease["metadata"]["name"] == "llama-sft-progress"
    assert lease["metadata"]["labels"]["graft.dev/job"] == "llama-sft"
    # the operator never sets what the trainer writes
    assert lease["spec"] == {"leaseDurationSeconds": 600}
    assert "annotations" not in lease["metadata"]
    assert (heartbeat_interval(600), heartbeat_interval(20), heartbeat_interval(5)) == (30, 4, 1)
    policy = without_hash(build_network_policy(job))
    peers = {"matchLabels": {"graft.dev/job": "llama-sft"}}
    assert policy["spec"] == {
        "podSelector": peers,
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": peers}]}],
    }
