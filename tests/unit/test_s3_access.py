"""S3 credentials from a Secret reference, and a ServiceAccount for workload identity, on
the ModelService's Ray pods (the FineTuneJob side is in test_finetunejob_builders)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from graft.api.common import S3Access
from graft.api.modelservice import ModelService
from graft.builders.rayservice import build_rayservice
from graft.config import Settings


def service(s3: dict[str, Any] | None) -> ModelService:
    spec: dict[str, Any] = {
        "model": {"baseModel": {"uri": "s3://models/llama-3-8b"}},
        "resources": {"gpusPerReplica": 0, "cpu": "2"},
    }
    if s3 is not None:
        spec["s3"] = s3
    return ModelService.model_validate(
        {"metadata": {"name": "chat", "namespace": "team-a"}, "spec": spec}
    )


def pods(msvc: ModelService) -> list[dict[str, Any]]:
    rs = build_rayservice(msvc, [], Settings(), pool=None)
    cluster = rs["spec"]["rayClusterConfig"]
    heads = [cluster["headGroupSpec"]["template"]["spec"]]
    return heads + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def test_ray_pods_get_the_secret_keys_endpoint_and_account() -> None:
    msvc = service(
        {
            "credentialsSecret": "team-s3",
            "endpointUrl": "https://rgw.storage.svc:8443",
            "serviceAccountName": "s3-reader",
        }
    )
    for spec in pods(msvc):
        assert spec["serviceAccountName"] == "s3-reader"
        for c in spec["containers"]:
            env = {e["name"]: e for e in c["env"]}
            ref = env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "team-s3", "key": "AWS_SECRET_ACCESS_KEY"}
            assert env["AWS_ENDPOINT_URL"]["value"] == "https://rgw.storage.svc:8443"


def test_without_s3_nothing_is_added() -> None:
    for spec in pods(service(None)):
        assert "serviceAccountName" not in spec
        assert not any(e["name"].startswith("AWS_") for c in spec["containers"] for e in c["env"])


@pytest.mark.parametrize(
    "bad",
    [
        {"credentialsSecret": "Team_S3"},
        {"endpointUrl": "minio:9000"},
        {"serviceAccountName": "a" * 254},
    ],
)
def test_bad_s3_settings_are_refused_by_the_schema(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        S3Access.model_validate(bad)
