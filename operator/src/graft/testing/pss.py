"""The Pod Security Standard "restricted" as a checker for rendered pods, for tests.

``restricted_violations`` follows the profile's rules (baseline included) as the Kubernetes
docs state them (https://kubernetes.io/docs/concepts/security/pod-security-standards/);
``hardening_violations`` adds what Graft asks of every pod beyond the profile: a set UID, a
read-only root filesystem, requests and limits on every container, a size limit on every
memory-backed emptyDir. Both take a Pod, a pod template or a bare pod spec and return one
line per violation (empty: compliant), so a test prints exactly what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

#: Volume types the restricted profile allows.
ALLOWED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
#: Sysctls the baseline profile allows.
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
    }
)


def pod_spec_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The pod spec of a Pod, of a template (``{metadata, spec}``) or the spec itself."""
    if "containers" in obj:
        return obj
    spec = obj.get("spec") or {}
    if "containers" in spec:
        return spec
    template = spec.get("template") or {}
    return template.get("spec") or {}


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            yield f"{key}[{c.get('name')}]", c


def restricted_violations(obj: Mapping[str, Any]) -> list[str]:
    """What keeps the pod from the "restricted" profile (baseline rules included)."""
    spec = pod_spec_of(obj)
    out: list[str] = []
    psc = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"spec.{key} must be false")
    for v in spec.get("volumes") or []:
        kinds = [k for k in v if k != "name"]
        if any(k not in ALLOWED_VOLUMES for k in kinds):
            out.append(f"volume {v.get('name')}: type {kinds} is not allowed")
    for s in psc.get("sysctls") or []:
        if s.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctl {s.get('name')} is not allowed")
    pod_nonroot = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if psc.get("runAsUser") == 0:
        out.append("spec.securityContext.runAsUser must not be 0")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"spec.securityContext.seccompProfile.type {pod_seccomp} is not allowed")
    out += _selinux("spec.securityContext", psc)
    for where, c in _containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{where}: privileged must be false")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation must be false")
        if not (sc.get("runAsNonRoot") is True or (pod_nonroot and "runAsNonRoot" not in sc)):
            out.append(f"{where}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}: capabilities must drop ALL")
        extra = [a for a in caps.get("add") or [] if a != "NET_BIND_SERVICE"]
        if extra:
            out.append(f"{where}: capabilities may add only NET_BIND_SERVICE, not {extra}")
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{where}: procMount must be Default")
        out += _selinux(f"{where}.securityContext", sc)
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                out.append(f"{where}: hostPort {p['hostPort']} is not allowed")
    return out


def _selinux(where: str, sc: Mapping[str, Any]) -> list[str]:
    opts = sc.get("seLinuxOptions") or {}
    out = []
    if opts.get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t"):
        out.append(f"{where}.seLinuxOptions.type {opts['type']} is not allowed")
    if opts.get("user") or opts.get("role"):
        out.append(f"{where}.seLinuxOptions user and role must be unset")
    return out


def hardening_violations(obj: Mapping[str, Any]) -> list[str]:
    """Graft's rules beyond the profile (docs/security.md)."""
    spec = pod_spec_of(obj)
    out: list[str] = []
    psc = spec.get("securityContext") or {}
    for where, c in _containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("runAsUser", psc.get("runAsUser")) is None:
            out.append(f"{where}: runAsUser must be set (pod or container)")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{where}: readOnlyRootFilesystem must be true")
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            missing = [r for r in ("cpu", "memory") if r not in (res.get(kind) or {})]
            if missing:
                out.append(f"{where}: resources.{kind} lacks {missing}")
    for v in spec.get("volumes") or []:
        ed = v.get("emptyDir")
        if ed is not None and ed.get("medium") == "Memory" and not ed.get("sizeLimit"):
            out.append(f"volume {v.get('name')}: a memory emptyDir needs a sizeLimit")
    return out


def all_violations(obj: Mapping[str, Any]) -> list[str]:
    """``restricted_violations`` and ``hardening_violations`` together."""
    return restricted_violations(obj) + hardening_violations(obj)
