#!/usr/bin/env python3
"""Build graft-operator, graft-trainer and graft-server (`make images`).

Tags are the chart's: `<repository>:<appVersion>` from charts/graft, so `helm install` finds
them with its defaults. Standard library only: it runs before any virtualenv exists.

Base images: the Dockerfiles' defaults (python:3.11-slim, rayproject/ray) when they are
present or can be pulled. Where no registry is reachable (air-gapped networks, these CI
VMs), local equivalents are built instead: a Debian root filesystem from debootstrap
(hack/build-debian-base.sh), Debian's Python on it (images/base/Dockerfile) and Ray on that
(images/base/ray.Dockerfile).

Package settings: builds see this machine's pip settings (index, extra indexes, find-links,
CA bundle, constraints) and apt sources, and nothing of them stays in an image:
- they are handed to BuildKit as secrets, mounted only for the RUN steps that install;
- local directories (file:// indexes, find-links wheelhouses) are served read-only on
  127.0.0.1 for the duration of the build (the build runs with --network host), so their
  paths never appear in a Dockerfile, a build argument or a layer.
tests/images/test_no_build_secrets.py checks the history and the filesystem of each image.

Usage: hack/build-images.py [--flavour cpu|cuda] [--only operator,trainer,server]
Env:   PYTHON_IMAGE, RAY_IMAGE (bases), TORCH_INDEX (where torch comes from; empty: from the
       configured index), DOCKER (client).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HACK = ROOT / "hack"
IMAGES = ("operator", "trainer", "server")
DEFAULT_PYTHON_IMAGE = "python:3.11-slim"
LOCAL_DEBIAN = "graft-local/debian:bookworm"
LOCAL_PYTHON = "graft-local/python:3.11-bookworm"
TORCH_INDEXES = {
    "cpu": "https://download.pytorch.org/whl/cpu",
    "cuda": "https://download.pytorch.org/whl/cu126",
}


def log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def chart_value(pattern: str, path: Path) -> str:
    m = re.search(pattern, path.read_text(), re.MULTILINE)
    if not m:
        raise SystemExit(f"build-images: {pattern!r} not found in {path}")
    return m.group(1)


def image_tags() -> dict[str, str]:
    """The chart's image names, so that the chart's defaults run what was built here."""
    app_version = chart_value(r'^appVersion:\s*"?([^"\s]+)"?', ROOT / "charts/graft/Chart.yaml")
    values = ROOT / "charts/graft/values.yaml"
    operator_repo = chart_value(r"^image:\n(?:\s+#.*\n)*\s+repository:\s*(\S+)", values)
    trainer = chart_value(r"^\s+trainerImage:\s*(\S+)", values)
    server = chart_value(r"^\s+serverImage:\s*(\S+)", values)
    return {
        "operator": f"{operator_repo}:{app_version}",
        "trainer": f"{trainer.rsplit(':', 1)[0]}:{app_version}",
        "server": f"{server.rsplit(':', 1)[0]}:{app_version}",
    }


def ray_version() -> str:
    """The Ray version the operator renders into RayServices; the server image must match."""
    return chart_value(
        r'^RAY_VERSION\s*=\s*"([^"]+)"', ROOT / "operator/src/graft/builders/rayservice.py"
    )


# ---------------------------------------------------------------------------------------
# The build machine's settings, as secrets


def pip_settings() -> dict[str, str]:
    """pip's effective settings on this machine: files, then PIP_* variables on top."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"^([^.]*)\.([A-Za-z0-9_-]+)='(.*)'$", line)
        if not m:
            continue
        scope, key, value = m.groups()
        if scope == ":env:":
            env[key] = value
        elif scope in ("global", "install", "download"):
            files[key] = value
    return {**files, **env}


class LocalDirs:
    """Serves local package directories read-only on 127.0.0.1 while the builds run."""

    def __init__(self) -> None:
        self.roots: dict[str, Path] = {}
        roots = self.roots

        class Handler(http.server.SimpleHTTPRequestHandler):
            def translate_path(self, path: str) -> str:
                parts = urllib.parse.unquote(urllib.parse.urlsplit(path).path).split("/")
                if len(parts) < 2 or parts[1] not in roots:
                    return "/nonexistent"
                base = roots[parts[1]]
                target = (base / "/".join(parts[2:])).resolve()
                if target != base and base not in target.parents:
                    return "/nonexistent"
                return str(target)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, directory: Path, sub: str = "") -> str:
        name = f"d{len(self.roots)}"
        self.roots[name] = directory.resolve()
        return f"http://127.0.0.1:{self.port}/{name}/{sub}"

    def close(self) -> None:
        self.server.shutdown()


def translate_location(loc: str, dirs: LocalDirs, *, index: bool) -> str | None:
    """A URL usable inside the build for a pip index or find-links location."""
    if loc.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(loc).path))
    elif loc.startswith("/"):
        path = Path(loc)
    else:
        return loc
    if not path.exists():
        return None
    if index:
        # A simple index links to its files relatively (../../files/x.whl): serve its parent.
        return dirs.url(path.parent, path.name.rstrip("/") + "/")
    if path.is_dir():
        return dirs.url(path)
    return dirs.url(path.parent, path.name)


def build_secrets(workdir: Path, dirs: LocalDirs) -> dict[str, Path]:
    """Writes the secret files; returns BuildKit secret id -> file."""
    settings = pip_settings()
    secrets: dict[str, Path] = {}
    conf = ["[global]"]
    split = lambda v: [x for x in re.split(r"\s+", v) if x]  # noqa: E731
    if "index-url" in settings:
        url = translate_location(settings["index-url"], dirs, index=True)
        if url:
            conf.append(f"index-url = {url}")
    if "no-index" in settings:
        conf.append(f"no-index = {settings['no-index']}")
    extra = [
        translate_location(x, dirs, index=True) for x in split(settings.get("extra-index-url", ""))
    ]
    if any(extra):
        conf.append("extra-index-url = " + " ".join(x for x in extra if x))
    links = [
        translate_location(x, dirs, index=False) for x in split(settings.get("find-links", ""))
    ]
    if any(links):
        conf.append("find-links = " + " ".join(x for x in links if x))
    trusted = [*split(settings.get("trusted-host", "")), "127.0.0.1"]
    conf.append("trusted-host = " + " ".join(trusted))
    for key in ("timeout", "default-timeout", "retries", "proxy"):
        if key in settings:
            conf.append(f"{key.replace('default-', '')} = {settings[key]}")
    cert = (
        settings.get("cert")
        or os.environ.get("REQUESTS_CA_BUNDLE")
        or os.environ.get("SSL_CERT_FILE")
    )
    if cert and Path(cert).is_file():
        secrets["pip-ca"] = Path(cert)
        conf.append("cert = /run/secrets/pip-ca")
    constraint = settings.get("constraint")
    if constraint and Path(constraint).is_file():
        secrets["pip-constraints"] = Path(constraint)
        conf.append("constraint = /run/secrets/pip-constraints")
    pip_conf = workdir / "pip.conf"
    pip_conf.write_text("\n".join(conf) + "\n")
    secrets["pip.conf"] = pip_conf

    sources = workdir / "apt-sources"
    sources.write_text("".join(f"deb {uri} {suite} {comps}\n" for uri, suite, comps in apt_repos()))
    secrets["apt-sources"] = sources
    apt_conf = workdir / "apt-conf"
    apt_conf.write_text(apt_acquire_settings())
    secrets["apt-conf"] = apt_conf
    return secrets


def apt_repos() -> list[tuple[str, str, str]]:
    """This machine's Debian bookworm repositories (uri, suite, components)."""
    repos: list[tuple[str, str, str]] = []
    d822 = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for f in d822:
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            fields = dict(
                (k.strip(), v.strip())
                for k, v in (
                    ln.split(":", 1)
                    for ln in stanza.splitlines()
                    if ":" in ln and not ln.startswith("#")
                )
            )
            if "deb" not in fields.get("Types", "").split():
                continue
            for uri in fields.get("URIs", "").split():
                for suite in fields.get("Suites", "").split():
                    if suite.startswith("bookworm"):
                        repos.append((uri, suite, fields.get("Components", "main")))
    lists = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for f in lists:
        if not f.is_file():
            continue
        for ln in f.read_text().splitlines():
            m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(bookworm\S*)\s+(.+)$", ln.strip())
            if m:
                repos.append((m.group(1), m.group(2), m.group(3)))
    return repos or [("http://deb.debian.org/debian", "bookworm", "main")]


def apt_acquire_settings() -> str:
    """apt's Acquire:: settings (proxies, validity checks) from this machine, one per line."""
    out = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, check=False).stdout
    keep = [
        ln
        for ln in out.splitlines()
        if re.match(r"^Acquire::(http|https|Check-Valid-Until|Check-Date|Retries)\S*\s", ln)
    ]
    return "\n".join(keep) + ("\n" if keep else "")


# ---------------------------------------------------------------------------------------
# Docker


@functools.cache
def docker() -> str:
    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    return subprocess.run(
        ["bash", str(HACK / "start-docker.sh")], capture_output=True, text=True, check=True
    ).stdout.strip()


def have_image(ref: str) -> bool:
    r = subprocess.run([docker(), "image", "inspect", ref], capture_output=True, check=False)
    return r.returncode == 0


def pullable(ref: str) -> bool:
    if have_image(ref):
        return True
    log(f"trying to pull {ref}")
    try:
        r = subprocess.run(
            [docker(), "pull", "-q", ref], capture_output=True, text=True, timeout=300, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    if r.returncode != 0:
        why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"
        log(f"cannot pull {ref}: {why}")
    return r.returncode == 0


def build(
    dockerfile: str,
    tag: str,
    secrets: dict[str, Path],
    args: dict[str, str],
    extra_tags: tuple[str, ...] = (),
) -> float:
    cmd = [docker(), "build", "--network", "host", "-f", str(ROOT / dockerfile), "-t", tag]
    for t in extra_tags:
        cmd += ["-t", t]
    for sid, path in secrets.items():
        cmd += ["--secret", f"id={sid},src={path}"]
    for k, v in args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    cmd.append(str(ROOT))
    log(f"building {tag} ({dockerfile})")
    t0 = time.monotonic()
    env = {**os.environ, "DOCKER_BUILDKIT": "1", "BUILDKIT_PROGRESS": "plain"}
    r = subprocess.run(cmd, env=env, check=False)
    if r.returncode != 0:
        raise SystemExit(f"build-images: {tag} failed: {shlex.join(cmd)}")
    took = time.monotonic() - t0
    log(f"built {tag} in {took:.0f}s")
    return took


def resolvable(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def size_mb(ref: str) -> float:
    out = subprocess.run(
        [docker(), "image", "inspect", "-f", "{{.Size}}", ref],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.strip()) / 1e6


@contextlib.contextmanager
def build_context() -> Iterator[dict[str, Path]]:
    dirs = LocalDirs()
    with tempfile.TemporaryDirectory(prefix="graft-build-settings.") as tmp:
        try:
            yield build_secrets(Path(tmp), dirs)
        finally:
            dirs.close()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--flavour", choices=sorted(TORCH_INDEXES), default=os.environ.get("FLAVOUR", "cpu")
    )
    ap.add_argument(
        "--only", default=",".join(IMAGES), help="comma-separated subset of " + ",".join(IMAGES)
    )
    ap.add_argument(
        "--report", default=str(ROOT / "build/images.json"), help="sizes and times as JSON"
    )
    opts = ap.parse_args()
    only = [x for x in opts.only.split(",") if x]
    unknown = set(only) - set(IMAGES)
    if unknown:
        raise SystemExit(f"build-images: unknown image(s) {sorted(unknown)}; choose from {IMAGES}")
    tags = image_tags()
    ray = ray_version()
    times: dict[str, float] = {}

    torch_index = os.environ.get("TORCH_INDEX")
    if torch_index is None:
        torch_index = TORCH_INDEXES[opts.flavour]
        if not resolvable(torch_index):
            log(f"{torch_index} is not reachable: torch comes from this machine's pip settings")
            torch_index = ""

    with build_context() as secrets:
        python_image = os.environ.get("PYTHON_IMAGE") or DEFAULT_PYTHON_IMAGE
        if not os.environ.get("PYTHON_IMAGE") and not pullable(python_image):
            log(f"building a local Python base ({LOCAL_PYTHON}) from Debian")
            env = {**os.environ, "DOCKER": docker()}
            subprocess.run(
                ["bash", str(HACK / "build-debian-base.sh"), LOCAL_DEBIAN], env=env, check=True
            )
            times["base-python"] = build(
                "images/base/Dockerfile", LOCAL_PYTHON, secrets, {"DEBIAN_IMAGE": LOCAL_DEBIAN}
            )
            python_image = LOCAL_PYTHON
        if "operator" in only:
            times["operator"] = build(
                "images/operator/Dockerfile",
                tags["operator"],
                secrets,
                {"PYTHON_IMAGE": python_image},
            )
        if "trainer" in only:
            times["trainer"] = build(
                "images/trainer/Dockerfile",
                tags["trainer"],
                secrets,
                {"PYTHON_IMAGE": python_image, "FLAVOUR": opts.flavour, "TORCH_INDEX": torch_index},
                extra_tags=(f"{tags['trainer']}-{opts.flavour}",),
            )
        if "server" in only:
            ray_image = os.environ.get("RAY_IMAGE") or f"rayproject/ray:{ray}-py311" + (
                "-gpu" if opts.flavour == "cuda" else ""
            )
            if not os.environ.get("RAY_IMAGE") and not pullable(ray_image):
                ray_image = f"graft-local/ray:{ray}-py311"
                log(f"building a local Ray base ({ray_image})")
                times["base-ray"] = build(
                    "images/base/ray.Dockerfile",
                    ray_image,
                    secrets,
                    {"PYTHON_IMAGE": python_image, "RAY_VERSION": ray},
                )
            times["server"] = build(
                "images/server/Dockerfile",
                tags["server"],
                secrets,
                {"RAY_IMAGE": ray_image, "TORCH_INDEX": torch_index},
                extra_tags=(f"{tags['server']}-{opts.flavour}",),
            )

    report = {
        name: {
            "image": tags[name],
            "sizeMB": round(size_mb(tags[name]), 1),
            "buildSeconds": round(times.get(name, 0.0), 1),
        }
        for name in only
    }
    report["bases"] = {k: round(v, 1) for k, v in times.items() if k.startswith("base-")}  # type: ignore[assignment]
    print(f"{'image':<48} {'size MB':>9} {'build s':>8}")
    for name in only:
        r = report[name]
        print(f"{r['image']:<48} {r['sizeMB']:>9.1f} {r['buildSeconds']:>8.1f}")
    out = Path(opts.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
