"""What the real-kubelet tier's conftest and tests share (a module of its own, so that tests
import it by a unique name)."""

from __future__ import annotations

from typing import Any

from graft.testing.cluster import A100_LABELS

GROUP, VERSION = "graft.dev", "v1alpha1"
TAG = "0.1.0"
IMAGES = {
    "operator": f"ghcr.io/graft-dev/graft-operator:{TAG}",
    "trainer": f"ghcr.io/graft-dev/graft-trainer:{TAG}",
    "server": f"ghcr.io/graft-dev/graft-server:{TAG}",
}
#: What the gang test leaves for the serving test: its namespace, job and base model.
SCENARIO: dict[str, str] = {}
#: The claims of the scenario's namespace (hostPath PersistentVolumes under one directory).
CLAIMS = ("models", "data", "out")
NODES = ("a100-c0", "a100-c1", "a100-c2")
RELEASE, RELEASE_NS = "graft", "graft-system"
POOL: dict[str, Any] = {
    "name": "a100-c",
    "nodeSelector": {"nvidia.com/gpu.product": A100_LABELS["nvidia.com/gpu.product"]},
    "gpuResource": "nvidia.com/gpu",
    "gpusPerNode": 1,
    "gpuMemoryGiB": 80,
    "pricePerGpuHour": 1.8,
    "maxNodes": 3,
}
