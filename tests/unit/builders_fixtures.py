"""Fluent builders of test inputs (kueue's ``MakeJob(...).Queue(q).Obj()`` style)."""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any

from graft.api.finetunejob import FineTuneJob
from graft.config import NodePool, Settings

T0 = dt.datetime(2026, 11, 25, 21, 0, 0, tzinfo=dt.UTC)


def ts(seconds: float = 0) -> str:
    """T0 + seconds in RFC 3339, as the apiserver writes timestamps."""
    return (T0 + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


A100_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def a100_80g(**over: Any) -> NodePool:
    raw: dict[str, Any] = {
        "name": "a100-80g",
        "nodeSelector": A100_SELECTOR,
        "tolerations": [GPU_TOLERATION],
        "gpusPerNode": 8,
        "gpuMemoryGiB": 80,
        "pricePerGpuHour": 2.5,
        "maxNodes": 4,
    }
    raw.update(over)
    return NodePool.model_validate(raw)


def a100_40g(**over: Any) -> NodePool:
    raw: dict[str, Any] = {
        "name": "a100-40g",
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"},
        "tolerations": [GPU_TOLERATION],
        "gpusPerNode": 8,
        "gpuMemoryGiB": 40,
        "pricePerGpuHour": 1.5,
        "maxNodes": 2,
    }
    raw.update(over)
    return NodePool.model_validate(raw)


def single_gpu(**over: Any) -> NodePool:
    raw: dict[str, Any] = {
        "name": "l4",
        "gpusPerNode": 1,
        "maxNodes": 4,
        "gpuMemoryGiB": 24,
        "pricePerGpuHour": 0.8,
    }
    raw.update(over)
    return NodePool.model_validate(raw)


def cpu_pool(**over: Any) -> NodePool:
    raw: dict[str, Any] = {"name": "cpu", "nodeSelector": {"graft.dev/pool": "cpu"}}
    raw.update(over)
    return NodePool.model_validate(raw)


def settings(*pools: NodePool, **over: Any) -> Settings:
    return Settings(node_pools=list(pools) or [a100_80g(), cpu_pool()], **over)


class FineTuneJobBuilder:
    """``FineTuneJobBuilder("j").gpus(16).pool("a100-80g").obj()``."""

    def __init__(self, name: str = "llama-sft", namespace: str = "team-a") -> None:
        self._meta: dict[str, Any] = {"name": name, "namespace": namespace, "generation": 1}
        self._spec: dict[str, Any] = {
            "baseModel": {"uri": "pvc://models/llama-2-7b"},
            "stages": [
                {"type": "SFT", "dataset": {"uri": "pvc://data/sft.jsonl", "format": "alpaca"}}
            ],
            "output": {"uri": "pvc://outputs/llama-sft"},
        }

    def _res(self) -> dict[str, Any]:
        res: dict[str, Any] = self._spec.setdefault("resources", {})
        return res

    def gpus(self, n: int) -> FineTuneJobBuilder:
        self._res()["gpus"] = n
        return self

    def nodes(self, n: int, gpus_per_node: int | None = None) -> FineTuneJobBuilder:
        self._res()["nodes"] = n
        if gpus_per_node is not None:
            self._res()["gpusPerNode"] = gpus_per_node
        return self

    def gpus_per_node(self, n: int) -> FineTuneJobBuilder:
        self._res()["gpusPerNode"] = n
        return self

    def pool(self, name: str) -> FineTuneJobBuilder:
        self._res()["nodePool"] = name
        return self

    def cpu(self, cpu: str, memory: str) -> FineTuneJobBuilder:
        self._res().update({"cpu": cpu, "memory": memory})
        return self

    def parallelism(self, p: str) -> FineTuneJobBuilder:
        self._res()["parallelism"] = p
        return self

    def method(self, m: str) -> FineTuneJobBuilder:
        self._spec["method"] = m
        return self

    def base_model(self, uri: str) -> FineTuneJobBuilder:
        self._spec["baseModel"] = {"uri": uri}
        return self

    def stage(self, type_: str, uri: str, fmt: str = "jsonl") -> FineTuneJobBuilder:
        self._spec["stages"].append({"type": type_, "dataset": {"uri": uri, "format": fmt}})
        return self

    def output(self, uri: str) -> FineTuneJobBuilder:
        self._spec["output"] = {"uri": uri}
        return self

    def checkpoint(self, uri: str) -> FineTuneJobBuilder:
        self._spec["checkpoint"] = {"uri": uri}
        return self

    def queue(self, name: str) -> FineTuneJobBuilder:
        self._spec["queueName"] = name
        return self

    def image(self, image: str) -> FineTuneJobBuilder:
        self._spec["image"] = image
        return self

    def annotate(self, key: str, value: str) -> FineTuneJobBuilder:
        self._meta.setdefault("annotations", {})[key] = value
        return self

    def learning_rate(self, lr: float) -> FineTuneJobBuilder:
        self._spec.setdefault("hyperparameters", {})["learningRate"] = lr
        return self

    def dict(self) -> dict[str, Any]:
        return {
            "apiVersion": "graft.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": copy.deepcopy(self._meta),
            "spec": copy.deepcopy(self._spec),
        }

    def obj(self) -> FineTuneJob:
        return FineTuneJob.model_validate(self.dict())


class PodBuilder:
    """A trainer Pod as the apiserver returns it, in some state."""

    def __init__(self, job: str = "llama-sft", rank: int = 0, attempt: int = 1) -> None:
        self._pod: dict[str, Any] = {
            "metadata": {
                "name": f"{job}-a{attempt}-r{rank}",
                "namespace": "team-a",
                "creationTimestamp": ts(0),
                "labels": {
                    "graft.dev/job": job,
                    "graft.dev/attempt": str(attempt),
                    "graft.dev/rank": str(rank),
                },
            },
            "spec": {},
            "status": {"phase": "Pending"},
        }

    @property
    def _status(self) -> dict[str, Any]:
        st: dict[str, Any] = self._pod["status"]
        return st

    def created(self, at: float) -> PodBuilder:
        self._pod["metadata"]["creationTimestamp"] = ts(at)
        return self

    def on(self, node: str) -> PodBuilder:
        self._pod["spec"]["nodeName"] = node
        return self

    def unschedulable(self, message: str = "0/4 nodes are available") -> PodBuilder:
        self._status["conditions"] = [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
            }
        ]
        return self

    def running(self, since: float = 0) -> PodBuilder:
        self._status.update(
            phase="Running",
            startTime=ts(since),
            containerStatuses=[{"name": "trainer", "state": {"running": {"startedAt": ts(since)}}}],
        )
        return self

    def exited(
        self,
        code: int,
        *,
        message: str | dict[str, Any] | None = None,
        reason: str | None = None,
        started: float = 0,
        finished: float = 60,
    ) -> PodBuilder:
        term: dict[str, Any] = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": ts(started),
            "finishedAt": ts(finished),
        }
        if message is not None:
            term["message"] = json.dumps(message) if isinstance(message, dict) else message
        self._status.update(
            phase="Succeeded" if code == 0 else "Failed",
            startTime=ts(started),
            containerStatuses=[{"name": "trainer", "state": {"terminated": term}}],
        )
        return self

    def evicted(self, message: str = "The node was low on resource: memory.") -> PodBuilder:
        self._status.update(phase="Failed", reason="Evicted", message=message)
        return self

    def preempted(self) -> PodBuilder:
        self._status.setdefault("conditions", []).append(
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "PreemptionByScheduler",
                "message": "Preempted in order to admit critical pod",
            }
        )
        return self

    def deleting(self, at: float = 30) -> PodBuilder:
        self._pod["metadata"]["deletionTimestamp"] = ts(at)
        return self

    def with_status(self, **fields: Any) -> PodBuilder:
        self._status.update(fields)
        return self

    def obj(self) -> dict[str, Any]:
        return copy.deepcopy(self._pod)


def node(name: str, ready: str = "True") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": dict(A100_SELECTOR)},
        "status": {"conditions": [{"type": "Ready", "status": ready}]},
    }


def nodes(*items: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["metadata"]["name"]: n for n in items}
