"""Fixtures for chart tests: the helm binary (skips the tests when it cannot be had)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helm import HelmUnavailable, helm_bin


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary from hack/install-helm.sh (cached after the first run)."""
    try:
        return helm_bin()
    except HelmUnavailable as e:
        pytest.skip(f"no helm binary: {e}")
