"""A checker for the Pod Security Standard "restricted" (Kubernetes v1.30 rules), plus the
house rules Graft adds: a set UID, a read-only root, requests and limits on every container,
a sizeLimit on memory-backed emptyDirs. A module of its own so any test can import it.

https://kubernetes.io/docs/concepts/security/pod-security-standards/
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Volume types "restricted" allows.
ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def _containers(spec: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    out = []
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            out.append((f"{key}[{c.get('name')}]", c))
    return out


def restricted_violations(spec: Mapping[str, Any]) -> list[str]:
    """What in a PodSpec breaks the "restricted" profile (baseline included)."""
    bad: list[str] = []
    psc = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            bad.append(f"spec.{field} is set")
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            bad.append(f"volume {v.get('name')}: {sorted(kinds - ALLOWED_VOLUMES)} not allowed")
    for s in psc.get("sysctls") or []:
        if s.get("name") not in _SAFE_SYSCTLS:
            bad.append(f"sysctl {s.get('name')} is not safe")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        bad.append(f"pod seccompProfile {pod_seccomp}")
    if psc.get("runAsUser") == 0:
        bad.append("pod runAsUser is 0")
    for where, c in _containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{where}: capabilities.drop lacks ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: capabilities.add {caps.get('add')}")
        if not (sc.get("runAsNonRoot") is True or psc.get("runAsNonRoot") is True) or (
            sc.get("runAsNonRoot") is False
        ):
            bad.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            bad.append(f"{where}: runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile is {seccomp}")
        if sc.get("procMount") not in (None, "Default"):
            bad.append(f"{where}: procMount {sc.get('procMount')}")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                bad.append(f"{where}: hostPort {p['hostPort']}")
    return bad


def graft_violations(spec: Mapping[str, Any]) -> list[str]:
    """Graft's rules beyond "restricted": a set UID, read-only root, requests and limits
    of cpu and memory on every container, and a sizeLimit on memory-backed emptyDirs."""
    bad: list[str] = []
    psc = spec.get("securityContext") or {}
    for where, c in _containers(spec):
        sc = c.get("securityContext") or {}
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        if not isinstance(uid, int) or uid == 0:
            bad.append(f"{where}: no non-zero runAsUser")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{where}: readOnlyRootFilesystem is not true")
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(res.get(kind) or {})
            if missing:
                bad.append(f"{where}: no {kind} for {sorted(missing)}")
    for v in spec.get("volumes") or []:
        ed = v.get("emptyDir")
        if ed is not None and ed.get("medium") == "Memory" and not ed.get("sizeLimit"):
            bad.append(f"volume {v.get('name')}: memory emptyDir without sizeLimit")
    return bad


def all_violations(spec: Mapping[str, Any]) -> list[str]:
    return restricted_violations(spec) + graft_violations(spec)
