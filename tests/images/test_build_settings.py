"""hack/build-images.py hands builds the machine's package settings without its paths.

No Docker needed: these check the secret files and the local package server that the
builds get, with a made-up pip configuration.
"""

from __future__ import annotations

import importlib.util
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def build() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_images", REPO_ROOT / "hack/build-images.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_local_indexes_and_wheelhouses_become_urls_of_the_build_server(
    build: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl").write_bytes(b"wheel")
    index = tmp_path / "pypi" / "simple" / "ray"
    index.mkdir(parents=True)
    (tmp_path / "pypi" / "files").mkdir()
    (tmp_path / "pypi" / "files" / "ray-2.60.0.whl").write_bytes(b"ray")
    (index / "index.html").write_text('<a href="../../files/ray-2.60.0.whl">ray</a>')
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    monkeypatch.setattr(
        build,
        "pip_settings",
        lambda: {
            "index-url": "https://mirror.internal/simple",
            "extra-index-url": f"file://{tmp_path}/pypi/simple {tmp_path}/missing",
            "find-links": str(wheels),
            "cert": str(ca),
            "constraint": str(constraints),
            "trusted-host": "mirror.internal",
        },
    )
    dirs = build.LocalDirs()
    try:
        (tmp_path / "out").mkdir()
        secrets = build.build_secrets(tmp_path / "out", dirs)
        conf = secrets["pip.conf"].read_text()
        assert str(tmp_path) not in conf, "no machine path in the pip.conf the build sees"
        assert "index-url = https://mirror.internal/simple" in conf
        assert "cert = /run/secrets/pip-ca" in conf
        assert "constraint = /run/secrets/pip-constraints" in conf
        assert "trusted-host = mirror.internal 127.0.0.1" in conf
        assert secrets["pip-ca"] == ca and secrets["pip-constraints"] == constraints
        extra = next(ln for ln in conf.splitlines() if ln.startswith("extra-index-url"))
        (extra_url,) = extra.split(" = ", 1)[1].split()  # the missing directory is dropped
        links = next(ln for ln in conf.splitlines() if ln.startswith("find-links"))
        links_url = links.split(" = ", 1)[1]
        # the index's relative links resolve on the server, as pip follows them
        with urllib.request.urlopen(extra_url + "ray/") as r:
            assert b"../../files/ray-2.60.0.whl" in r.read()
        with urllib.request.urlopen(extra_url + "ray/../../files/ray-2.60.0.whl") as r:
            assert r.read() == b"ray"
        with urllib.request.urlopen(links_url) as r:
            listing = r.read()
        assert b"torch-2.13.0%2Bcpu" in listing or b"torch-2.13.0+cpu" in listing
        # nothing outside the served directories
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(links_url + "../../ca.pem")
    finally:
        dirs.close()


def test_apt_sources_secret_lists_only_bookworm_debian_repositories(build: ModuleType) -> None:
    repos = build.apt_repos()
    assert repos, "at least the public default"
    assert all(suite.startswith("bookworm") for _uri, suite, _c in repos)
