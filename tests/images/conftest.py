"""Fixtures of the image tests: a Docker daemon and the images `make images` built.

Without a Docker daemon the tests skip and say why. With one, an image that was not built
skips too, unless GRAFT_REQUIRE_IMAGES names it (`1` for all, else a comma list; `make
test-images` sets it to the IMAGES that `make images` built): then it fails the run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chart"))

from dockerpod import docker_cli

REPO_ROOT = Path(__file__).resolve().parents[2]


def _chart(pattern: str, path: str) -> str:
    m = re.search(pattern, (REPO_ROOT / path).read_text(), re.MULTILINE)
    assert m, f"{pattern} not in {path}"
    return m.group(1)


def built_tags() -> dict[str, str]:
    """What `make images` tags: the chart's repositories at the chart's appVersion."""
    version = _chart(r'^appVersion:\s*"?([^"\s]+)"?', "charts/graft/Chart.yaml")
    values = "charts/graft/values.yaml"
    return {
        "operator": _chart(r"^image:\n(?:\s+#.*\n)*\s+repository:\s*(\S+)", values) + f":{version}",
        "trainer": _chart(r"^\s+trainerImage:\s*(\S+?):", values) + f":{version}",
        "server": _chart(r"^\s+serverImage:\s*(\S+?):", values) + f":{version}",
    }


@pytest.fixture(scope="session")
def docker_daemon() -> str:
    cli = docker_cli()
    if not cli:
        pytest.skip(
            "no docker client on PATH: run `bash hack/start-docker.sh` (installs docker.io)"
        )
    proc = subprocess.run([cli, "info"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(
            "no Docker daemon answers: start one with `bash hack/start-docker.sh`, "
            "then `make images` and `make test-images`"
        )
    return cli


def _image(docker_daemon: str, which: str) -> str:
    tag = built_tags()[which]
    proc = subprocess.run([docker_daemon, "image", "inspect", tag], capture_output=True)
    if proc.returncode != 0:
        msg = f"image {tag} is not built: run `make images`"
        required = os.environ.get("GRAFT_REQUIRE_IMAGES", "")
        if required == "1" or which in required.split(","):
            pytest.fail(msg)
        pytest.skip(msg)
    return tag


@pytest.fixture(scope="session")
def operator_image(docker_daemon: str) -> str:
    return _image(docker_daemon, "operator")


@pytest.fixture(scope="session")
def trainer_image(docker_daemon: str) -> str:
    return _image(docker_daemon, "trainer")


@pytest.fixture(scope="session")
def server_image(docker_daemon: str) -> str:
    return _image(docker_daemon, "server")
