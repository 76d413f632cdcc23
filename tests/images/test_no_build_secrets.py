"""No layer of an image carries the build machine's package settings.

`make images` hands pip and apt settings to BuildKit as secrets and serves local
wheelhouses on 127.0.0.1 during the build (hack/build-images.py). What must never end up
in an image: the machine's local index and wheelhouse paths, its constraint file path,
private index or mirror hosts, proxy settings, the local server's URLs, and CA
certificates that the machine trusts but Debian does not ship. Checked in every layer
(not only the final filesystem: a file deleted later still ships in its layer) and in the
image history and configuration.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from dockerpod import docker, docker_cli

PUBLIC_HOSTS = {"pypi.org", "files.pythonhosted.org", "deb.debian.org", "download.pytorch.org"}
LOCAL_SERVER = re.compile(rb"127\.0\.0\.1:\d+/d\d+/")
CHUNK = 32 << 20
REPO_ROOT = Path(__file__).resolve().parents[2]


def _build_images_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "build_images", REPO_ROOT / "hack/build-images.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pem_blocks(text: str) -> list[str]:
    return re.findall(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END CERTIFICATE-----", text, re.S)


def _debian_shipped_certs() -> set[str]:
    """Certificates of Debian's ca-certificates package: public, fine in any image."""
    shipped: set[str] = set()
    for f in Path("/usr/share/ca-certificates").rglob("*.crt"):
        shipped |= {b.replace("\n", "") for b in _pem_blocks(f.read_text(errors="replace"))}
    return shipped


def machine_needles() -> dict[str, bytes]:
    """Strings that identify this machine's build settings, by what they are."""
    build = _build_images_module()
    settings = build.pip_settings()
    needles: dict[str, bytes] = {}
    for key in ("index-url", "extra-index-url", "find-links", "constraint"):
        for loc in (settings.get(key) or "").split():
            if loc.startswith("file://"):
                path = loc[len("file://") :].rstrip("/")
                needles[f"pip {key} path {path}"] = path.encode()
            elif loc.startswith("/"):
                needles[f"pip {key} path {loc}"] = loc.rstrip("/").encode()
            else:
                host = re.sub(r"^[a-z+]+://([^/@]*@)?([^/:]+).*$", r"\2", loc)
                if host and host not in PUBLIC_HOSTS:
                    needles[f"pip {key} host {host}"] = host.encode()
    if settings.get("proxy"):
        needles["pip proxy"] = settings["proxy"].encode()
    for uri, _suite, _comps in build.apt_repos():
        host = re.sub(r"^[a-z+]+://([^/@]*@)?([^/:]+).*$", r"\2", uri)
        if host not in PUBLIC_HOSTS:
            needles[f"apt mirror host {host}"] = host.encode()
    for line in build.apt_acquire_settings().splitlines():
        m = re.match(r'^Acquire::\S*[Pp]roxy\S*\s+"([^"]+)"', line)
        if m and m.group(1) not in ("DIRECT", "false"):
            needles["apt proxy"] = m.group(1).encode()
    cert = settings.get("cert")
    if cert and Path(cert).is_file():
        # The machine's own CAs (e.g. a corporate or egress proxy CA in
        # /usr/local/share/ca-certificates): in its bundle, not shipped by Debian.
        shipped = _debian_shipped_certs()
        for i, block in enumerate(_pem_blocks(Path(cert).read_text())):
            if block.replace("\n", "") not in shipped:
                lines = block.splitlines()
                needles[f"machine-only CA certificate #{i}"] = lines[len(lines) // 2].encode()
    return needles


def _scan_stream(stream: IO[bytes], needles: dict[str, bytes], where: str) -> Iterator[str]:
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            for what, needle in needles.items():
                if needle in member.name.encode():
                    yield f"{what} in a file name: {where}:{member.name}"
            if not member.isfile():
                continue
            f = tar.extractfile(member)
            assert f is not None
            tail = b""
            while chunk := f.read(CHUNK):
                data = tail + chunk
                for what, needle in needles.items():
                    if needle in data:
                        yield f"{what} in {where}:{member.name}"
                if b"127.0.0.1:" in data and LOCAL_SERVER.search(data):
                    yield f"the build's package server URL in {where}:{member.name}"
                tail = data[-256:]


def leaks(image: str, needles: dict[str, bytes]) -> list[str]:
    """Every needle found in the history, configuration or any layer of ``image``."""
    found: list[str] = []
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    config = docker("image", "inspect", image).stdout
    for where, text in (("history", history), ("config", config)):
        for what, needle in needles.items():
            if needle.decode() in text:
                found.append(f"{what} in the image {where}")
        if LOCAL_SERVER.search(text.encode()):
            found.append(f"the build's package server URL in the image {where}")
    cli = docker_cli()
    assert cli
    with subprocess.Popen([cli, "save", image], stdout=subprocess.PIPE) as save:
        assert save.stdout is not None
        with tarfile.open(fileobj=save.stdout, mode="r|") as outer:
            for member in outer:
                if member.name.endswith("layer.tar") and member.isfile():
                    layer = outer.extractfile(member)
                    assert layer is not None
                    found += sorted(set(_scan_stream(layer, needles, member.name)))
    assert save.returncode == 0
    return found


@pytest.fixture(scope="session")
def needles() -> dict[str, bytes]:
    found = machine_needles()
    print("checked for:", json.dumps({k: v.decode() for k, v in found.items()}, indent=1))
    return found


def test_scanner_finds_a_planted_secret(operator_image: str, needles: dict[str, bytes]) -> None:
    """The check can fail: a file with a machine setting, deleted in a later layer, is found."""
    if not needles:
        pytest.skip("this machine has no package settings of its own to look for")
    what, needle = next(iter(needles.items()))
    tag = "graft-test/leaky:latest"
    dockerfile = (
        f"FROM {operator_image}\nUSER 0\n"
        f"RUN printf '%s' '{needle.decode()}' > /etc/leak && echo ok\n"
        "RUN rm /etc/leak\n"
    )
    cli = docker_cli()
    assert cli
    subprocess.run(
        [cli, "build", "-t", tag, "-"], input=dockerfile.encode(), check=True, capture_output=True
    )
    try:
        found = leaks(tag, {what: needle})
        assert any("etc/leak" in f for f in found), found
        assert any("history" in f for f in found), found
    finally:
        docker("rmi", "-f", tag, check=False)


@pytest.mark.parametrize("which", ["operator", "trainer", "server"])
def test_image_carries_no_build_settings(
    which: str, request: pytest.FixtureRequest, needles: dict[str, bytes]
) -> None:
    image = request.getfixturevalue(f"{which}_image")
    assert leaks(image, needles) == []
