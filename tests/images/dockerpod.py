"""Run one container of a rendered Pod with `docker run`, the way the kubelet would.

Not a kubelet: no scheduling, probes or restarts. It takes what the operator's builders
or the chart render and turns the parts that change how a process sees its container into
`docker run` flags, so an image is tested under the same conditions as in a pod:

- the user: `runAsUser`/`runAsGroup`, or the image's USER, refused like the kubelet
  refuses it under `runAsNonRoot` when it is root or not numeric;
- `readOnlyRootFilesystem`, `capabilities`, `allowPrivilegeEscalation: false`
  (no_new_privs); seccomp stays Docker's default profile, i.e. RuntimeDefault;
- env, with `fieldRef` values filled in from the pod;
- volume mounts: configMaps as read-only files, emptyDirs (tmpfs for `medium: Memory`),
  PVCs as host directories the test provides, and the ServiceAccount token files;
- the termination message file the kubelet bind-mounts at `terminationMessagePath`;
- command and args, hostname.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
RESTRICTED: dict[str, Any] = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def docker_cli() -> str | None:
    return shutil.which("docker")


def docker(
    *args: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    cli = docker_cli()
    assert cli, "no docker client"
    proc = subprocess.run([cli, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def image_user(image: str) -> str:
    return docker("image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip()


class PodRefused(RuntimeError):
    """The kubelet would not start this container (CreateContainerConfigError)."""


@dataclass
class DockerPod:
    """One container of ``pod`` run by docker; host directories live under ``workdir``."""

    pod: dict[str, Any]
    workdir: Path
    container: str | None = None
    #: PVC claim name -> host directory mounted for it.
    claims: Mapping[str, Path] = field(default_factory=dict)
    #: configMap name -> {key: content}.
    config_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: The apiserver URL: the in-cluster env is set and ``workdir/serviceaccount``
    #: (write_service_account) is mounted where a pod finds its token.
    api_server: str | None = None
    network: str = "host"
    image: str | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    #: host port on 127.0.0.1 -> container port (a Service's job in a cluster).
    publish: Mapping[int, int] = field(default_factory=dict)
    #: Run as the restricted Pod Security Standard plus a read-only root filesystem asks,
    #: whatever the template says: what the image must cope with.
    restricted: bool = False
    name: str = field(default_factory=lambda: f"graft-test-{uuid.uuid4().hex[:10]}")

    def __post_init__(self) -> None:
        spec = self.pod["spec"]
        containers = spec["containers"]
        self.spec = spec
        self.c = next(
            (c for c in containers if c["name"] == self.container)
            if self.container
            else iter(containers)
        )
        if self.restricted:
            self.c["securityContext"] = {
                **(self.c.get("securityContext") or {}),
                **RESTRICTED,
            }
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.termination_log = self.workdir / f"{self.name}.termination-log"

    # -- what the kubelet derives from the pod

    def _security(self) -> dict[str, Any]:
        pod_sc = {k: v for k, v in (self.spec.get("securityContext") or {}).items()}
        return {**pod_sc, **(self.c.get("securityContext") or {})}

    def user_flags(self, image: str) -> list[str]:
        sc = self._security()
        uid = sc.get("runAsUser")
        gid = sc.get("runAsGroup")
        if uid is None:
            user = image_user(image)
            name = user.split(":", 1)[0]
            if sc.get("runAsNonRoot"):
                if not name.isdigit():
                    raise PodRefused(
                        f"image has non-numeric user ({name}), cannot verify user is non-root"
                    )
                if int(name) == 0:
                    raise PodRefused("container's runAsUser breaks non-root policy")
            if gid is not None:
                return ["--user", f"{name}:{gid}"]
            return []
        if sc.get("runAsNonRoot") and int(uid) == 0:
            raise PodRefused("container's runAsUser breaks non-root policy")
        return ["--user", f"{uid}:{gid if gid is not None else 0}"]

    def security_flags(self) -> list[str]:
        sc = self._security()
        flags: list[str] = []
        if sc.get("readOnlyRootFilesystem"):
            flags.append("--read-only")
        caps = sc.get("capabilities") or {}
        flags += [f"--cap-drop={c}" for c in caps.get("drop") or []]
        flags += [f"--cap-add={c}" for c in caps.get("add") or []]
        if sc.get("allowPrivilegeEscalation") is False:
            flags += ["--security-opt", "no-new-privileges"]
        fs_group = (self.spec.get("securityContext") or {}).get("fsGroup")
        if fs_group is not None:
            flags += ["--group-add", str(fs_group)]
        return flags

    def env(self) -> dict[str, str]:
        fields = {
            "metadata.name": self.pod["metadata"]["name"],
            "metadata.namespace": self.pod["metadata"].get("namespace", "default"),
            "spec.nodeName": self.spec.get("nodeName", "docker"),
            "status.podIP": "127.0.0.1",
            "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
        }
        out: dict[str, str] = {}
        if self.api_server:
            # what the kubelet injects for the `kubernetes` Service
            host, port = _host_port(self.api_server)
            out["KUBERNETES_SERVICE_HOST"] = host
            out["KUBERNETES_SERVICE_PORT"] = port
        for e in self.c.get("env") or []:
            if "value" in e:
                out[e["name"]] = str(e["value"])
            elif "fieldRef" in (e.get("valueFrom") or {}):
                out[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                raise AssertionError(f"env {e['name']}: only value and fieldRef are supported")
        out.update(self.extra_env)
        return out

    def mount_flags(self) -> list[str]:
        volumes = {v["name"]: v for v in self.spec.get("volumes") or []}
        flags: list[str] = []
        for m in self.c.get("volumeMounts") or []:
            vol = volumes[m["name"]]
            target = m["mountPath"]
            ro = bool(m.get("readOnly"))
            if "emptyDir" in vol:
                if (vol["emptyDir"] or {}).get("medium") == "Memory":
                    flags += ["--tmpfs", f"{target}:rw,exec,mode=1777"]
                    continue
                src = self.workdir / "emptydir" / m["name"]
                src.mkdir(parents=True, exist_ok=True)
                src.chmod(0o777)
            elif "configMap" in vol:
                cm = vol["configMap"]["name"]
                src = self.workdir / "configmap" / cm
                src.mkdir(parents=True, exist_ok=True)
                for key, content in self.config_maps[cm].items():
                    (src / key).write_text(content)
                    (src / key).chmod(0o644)
                ro = True
            elif "persistentVolumeClaim" in vol:
                src = self.claims[vol["persistentVolumeClaim"]["claimName"]]
                ro = ro or bool(vol["persistentVolumeClaim"].get("readOnly"))
            else:
                raise AssertionError(f"volume {m['name']}: unsupported source {sorted(vol)}")
            if m.get("subPath"):
                src = src / m["subPath"]
            flags += ["-v", f"{src}:{target}{':ro' if ro else ''}"]
        if self.api_server:
            flags += ["-v", f"{self.workdir / 'serviceaccount'}:{SA_DIR}:ro"]
        # The kubelet creates the file and bind-mounts it, writable, whatever the root fs.
        self.termination_log.write_text("")
        self.termination_log.chmod(0o666)
        path = self.c.get("terminationMessagePath", "/dev/termination-log")
        flags += ["-v", f"{self.termination_log}:{path}"]
        return flags

    # -- running

    def argv(self) -> list[str]:
        image = self.image or self.c["image"]
        flags = ["run", "-d", "--name", self.name, "--network", self.network]
        if self.network != "host" and self.spec.get("hostname"):
            flags += ["--hostname", self.spec["hostname"]]
        flags += self.user_flags(image) + self.security_flags() + self.mount_flags()
        for host_port, port in self.publish.items():
            flags += ["-p", f"127.0.0.1:{host_port}:{port}"]
        for k, v in self.env().items():
            flags += ["-e", f"{k}={v}"]
        grace = self.spec.get("terminationGracePeriodSeconds")
        if grace is not None:
            flags += ["--stop-timeout", str(grace)]
        cmd = self.c.get("command")
        if cmd:
            flags += ["--entrypoint", cmd[0], image, *cmd[1:], *(self.c.get("args") or [])]
        else:
            flags += [image, *(self.c.get("args") or [])]
        return flags

    def start(self) -> DockerPod:
        docker(*self.argv())
        return self

    def state(self) -> dict[str, Any]:
        out = docker("inspect", "-f", "{{json .State}}", self.name).stdout
        state: dict[str, Any] = json.loads(out)
        return state

    def running(self) -> bool:
        return bool(self.state().get("Running"))

    def wait(self, timeout: float) -> int:
        proc = docker("wait", self.name, timeout=timeout)
        return int(proc.stdout.strip())

    def stop(self, timeout: int) -> None:
        """SIGTERM to PID 1, SIGKILL after ``timeout`` seconds: the kubelet's pod deletion."""
        docker("stop", "-t", str(timeout), self.name, timeout=timeout + 60)

    def exec(self, *cmd: str) -> str:
        return docker("exec", self.name, *cmd).stdout

    def logs(self) -> str:
        proc = docker("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def termination_message(self) -> str:
        return self.termination_log.read_text() if self.termination_log.exists() else ""

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


def _host_port(server: str) -> tuple[str, str]:
    hostport = server.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    return host, port


def write_service_account(workdir: Path, token: str, ca: Path, namespace: str) -> None:
    sa = workdir / "serviceaccount"
    sa.mkdir(parents=True, exist_ok=True)
    (sa / "token").write_text(token)
    shutil.copy(ca, sa / "ca.crt")
    (sa / "namespace").write_text(namespace)
    for f in sa.iterdir():
        f.chmod(0o644)
    os.chmod(sa, 0o755)
