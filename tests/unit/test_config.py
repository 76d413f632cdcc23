"""Operator settings from GRAFT_* variables and the GRAFT_CONFIG file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graft.config import ConfigError, load_settings
from graft.testing.cluster import TEST_NODE_POOLS


def test_defaults() -> None:
    s = load_settings({})
    assert s.watch_namespaces == [] and s.node_pools == []
    assert s.metrics_port == 8080


def test_pools_from_json_and_yaml() -> None:
    s = load_settings({"GRAFT_NODE_POOLS": json.dumps(TEST_NODE_POOLS)})
    a100 = s.pool("a100-80g")
    assert a100 is not None and a100.gpus_per_node == 8 and a100.gpu_memory_gi_b == 80
    s = load_settings({"GRAFT_NODE_POOLS": "- name: small\n  gpusPerNode: 1\n"})
    assert s.node_pools[0].name == "small"


def test_file_then_env(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    f.write_text("nodePools:\n- name: a\n  gpusPerNode: 4\ntrainerImage: reg/t:1\n")
    s = load_settings(
        {
            "GRAFT_CONFIG": str(f),
            "GRAFT_TRAINER_IMAGE": "reg/t:2",
            "GRAFT_WATCH_NAMESPACES": "ml, team-b",
        }
    )
    assert s.trainer_image == "reg/t:2"
    assert s.watch_namespaces == ["ml", "team-b"]
    assert s.node_pools[0].gpus_per_node == 4


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"GRAFT_NODE_POOLS": "[{name: a}, {name: a}]"}, "unique"),
        ({"GRAFT_NODE_POOLS": "[{name: A100}]"}, "name"),
        ({"GRAFT_NODE_POOLS": "[{name: a, gpusPerNod: 8}]"}, "gpusPerNod"),
        ({"GRAFT_METRICS_PORT": "http"}, "metrics_port"),
        ({"GRAFT_CONFIG": "/nonexistent/graft.yaml"}, "cannot read"),
    ],
)
def test_bad_config_says_what(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_settings(env)
