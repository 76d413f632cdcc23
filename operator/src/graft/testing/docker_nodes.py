"""Real Kubernetes nodes on one host, for the real-kubelet e2e tier (``make e2e-containers``).

Each node is a v1.20.2 kubelet (``hack/build-node.sh``) on dockershim, with a Docker daemon
of its own: one daemon cannot serve two kubelets, since each kubelet kills the pod
containers it does not own. What one host needs for several nodes, and what stands in for
the cluster add-ons, all named for what they are:

- ``BridgeNetwork``: Linux bridges the test creates, one per node (its pods' subnet) and one
  for the control plane and DNS. Nothing listens outside them or loopback.
- ``DockerNode``: a ``dockerd`` on the node's bridge, its images loaded from the host
  daemon (``imagePullPolicy: Never``), and the kubelet with a ``system:node:<name>`` client
  certificate. ``kill()`` is a node loss: the kubelet and every container stop at once.
- ``HostKubeProxy``: one kube-proxy (iptables) for the host: the nodes share its network
  namespace, so one set of rules serves them all.
- ``ApiDnsmasq``: Debian's dnsmasq as cluster DNS, fed from the API by this harness
  (Services and the Endpoints of headless Services, pod hostnames included), instead of
  CoreDNS, which would need an image from a registry.

Root is required (bridges, iptables, dockerd); callers skip when it is missing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from graft.testing.controlplane import REPO_ROOT, ControlPlane, free_port

NODE_CACHE = Path(
    os.environ.get("GRAFT_K8S_NODE_CACHE", Path.home() / ".cache" / "graft" / "k8s-v1.20.2-node")
)
PAUSE_IMAGE = "graft-local/pause:3.2"
CLUSTER_DOMAIN = "cluster.local"
SERVICE_CIDR = "10.0.0.0/24"
#: The bridges' supernet: 10.244.0.0/24 for the control plane, 10.244.<n>.0/24 for node n.
SUPERNET = ipaddress.ip_network("10.244.0.0/16")


class NodeSetupError(RuntimeError):
    """A piece of the real-node tier cannot run on this machine; the message says what to do."""


def node_binaries() -> Path:
    """The cached kubelet, kube-proxy and pause binaries; builds them once if missing."""
    if all((NODE_CACHE / b).exists() for b in ("kubelet", "kube-proxy", "pause")):
        return NODE_CACHE
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "build-node.sh"), str(NODE_CACHE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise NodeSetupError(f"hack/build-node.sh failed:\n{out.stderr[-3000:]}")
    return NODE_CACHE


def _run(*argv: str, check: bool = True, input: bytes | None = None) -> str:
    r = subprocess.run(list(argv), capture_output=True, input=input, check=False)
    if check and r.returncode != 0:
        raise NodeSetupError(
            f"{' '.join(argv)} exited {r.returncode}: {r.stderr.decode(errors='replace')[-2000:]}"
        )
    return r.stdout.decode(errors="replace")


def _spawn(
    argv: Sequence[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        list(argv),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )


def _stop(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 15
) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class BridgeNetwork:
    """Bridges ``graft-br0`` (control plane, DNS) and ``graft-br<n>`` (node n's pods), routed
    to each other through the host and to nothing else."""

    nodes: int
    prefix: str = "graft-br"
    _rules: list[list[str]] = field(default_factory=list)

    def bridge(self, n: int) -> str:
        return f"{self.prefix}{n}"

    def gateway(self, n: int) -> str:
        """The host's address on bridge n (the node's IP for node n >= 1)."""
        return str(SUPERNET.network_address + (n << 8) + 1)

    def subnet(self, n: int) -> str:
        return f"{SUPERNET.network_address + (n << 8)}/24"

    @property
    def host(self) -> str:
        return self.gateway(0)

    def up(self) -> None:
        for n in range(self.nodes + 1):
            br = self.bridge(n)
            _run("ip", "link", "del", br, check=False)
            _run("ip", "link", "add", br, "type", "bridge")
            _run("ip", "addr", "add", f"{self.gateway(n)}/24", "dev", br)
            _run("ip", "link", "set", br, "up")
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        # Docker's own daemon sets the FORWARD policy to DROP; let the test bridges talk.
        for rule in (
            ["FORWARD", "-i", f"{self.prefix}+", "-o", f"{self.prefix}+", "-j", "ACCEPT"],
        ):
            _run("iptables", "-I", *rule)
            self._rules.append(rule)

    def partition(self, n: int) -> None:
        """Cut node n off: nothing in or out of its bridge, as when a machine loses power
        (its peers then see silence, not the FIN or RST of processes that exit)."""
        br = self.bridge(n)
        for rule in (
            ["FORWARD", "-i", br, "-j", "DROP"],
            ["FORWARD", "-o", br, "-j", "DROP"],
            ["INPUT", "-i", br, "-j", "DROP"],
        ):
            _run("iptables", "-I", *rule)
            self._rules.append(rule)

    def down(self) -> None:
        for rule in self._rules:
            _run("iptables", "-D", *rule, check=False)
        self._rules.clear()
        for n in range(self.nodes + 1):
            _run("ip", "link", "del", self.bridge(n), check=False)


def save_images(images: Sequence[str], dest: Path) -> Path:
    """The host daemon's images in one archive, for every node's daemon to load."""
    r = subprocess.run(["docker", "save", "-o", str(dest), *images], capture_output=True)
    if r.returncode != 0:
        raise NodeSetupError(
            f"docker save {' '.join(images)} failed: {r.stderr.decode(errors='replace')[-500:]}"
            "; build the images with `make images`"
        )
    return dest


def pause_image_tar(binaries: Path, dest: Path) -> Path:
    """A one-file image of the static pause binary, for ``docker import``."""
    with tarfile.open(dest, "w") as tar:
        tar.add(binaries / "pause", arcname="pause")
    return dest


@dataclass
class DockerNode:
    """One node: its own dockerd on its bridge and a kubelet on dockershim."""

    name: str
    index: int
    network: BridgeNetwork
    control_plane: ControlPlane
    root: Path
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[str] = field(default_factory=list)
    extended: dict[str, str] = field(default_factory=dict)
    dockerd: subprocess.Popen[bytes] | None = None
    kubelet: subprocess.Popen[bytes] | None = None

    @property
    def ip(self) -> str:
        return self.network.gateway(self.index)

    @property
    def docker_host(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def docker(self, *args: str, check: bool = True, input: bytes | None = None) -> str:
        return _run("docker", "-H", self.docker_host, *args, check=check, input=input)

    def start_docker(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.dockerd = _spawn(
            [
                "dockerd",
                f"--data-root={self.root}/docker",
                f"--exec-root={self.root}/exec",
                f"--host={self.docker_host}",
                f"--pidfile={self.root}/docker.pid",
                f"--bridge={self.network.bridge(self.index)}",
                "--iptables=false",
                "--ip-masq=false",
                "--exec-opt=native.cgroupdriver=cgroupfs",
            ],
            self.root / "dockerd.log",
        )
        deadline = time.monotonic() + 60
        while not self._docker_up():
            if self.dockerd.poll() is not None or time.monotonic() > deadline:
                raise NodeSetupError(
                    f"dockerd for {self.name} did not start; see {self.root}/dockerd.log"
                )
            time.sleep(0.5)

    def _docker_up(self) -> bool:
        r = subprocess.run(
            ["docker", "-H", self.docker_host, "info"], capture_output=True, check=False
        )
        return r.returncode == 0

    def load_images(self, images_tar: Path, pause_tar: Path) -> None:
        """Images from ``save_images``' archive (no registry here), and the pause image."""
        self.docker("import", str(pause_tar), PAUSE_IMAGE, "--change", 'ENTRYPOINT ["/pause"]')
        self.docker("load", "-q", "-i", str(images_tar))

    def start_kubelet(self, binaries: Path, dns: str) -> None:
        kubeconfig = self.control_plane.client_kubeconfig(
            f"system:node:{self.name}", ["system:nodes"]
        )
        kroot = self.root / "kubelet"
        kroot.mkdir(parents=True, exist_ok=True)
        resolv = self.root / "resolv.conf"
        resolv.write_text(f"nameserver {dns}\n")
        config = self.root / "kubelet-config.yaml"
        # KubeletConfiguration, v1beta1 as v1.20 reads it.
        config.write_text(
            "apiVersion: kubelet.config.k8s.io/v1beta1\n"
            "kind: KubeletConfiguration\n"
            f"address: {self.ip}\n"
            f"port: {free_port()}\n"
            "readOnlyPort: 0\n"
            f"healthzPort: {free_port()}\n"
            "healthzBindAddress: 127.0.0.1\n"
            "authentication: {anonymous: {enabled: false}, webhook: {enabled: false},"
            f" x509: {{clientCAFile: '{self.control_plane.ca_file}'}}}}\n"
            "authorization: {mode: AlwaysAllow}\n"
            "cgroupDriver: cgroupfs\n"
            # several kubelets share the host's cgroups: none of them may own the QoS tree
            "cgroupsPerQOS: false\n"
            "enforceNodeAllocatable: []\n"
            "failSwapOn: false\n"
            f"clusterDNS: [{dns}]\n"
            f"clusterDomain: {CLUSTER_DOMAIN}\n"
            f"resolvConf: {resolv}\n"
            "nodeStatusUpdateFrequency: 2s\n"
            "syncFrequency: 5s\n"
            "fileCheckFrequency: 5s\n"
            "evictionHard: {}\n"
            "imageGCHighThresholdPercent: 100\n"
            "serializeImagePulls: false\n"
        )
        argv = [
            str(binaries / "kubelet"),
            f"--config={config}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={kroot}",
            f"--cert-dir={kroot}/pki",
            f"--hostname-override={self.name}",
            f"--node-ip={self.ip}",
            "--container-runtime=docker",
            f"--docker-endpoint={self.docker_host}",
            f"--container-runtime-endpoint=unix://{self.root}/dockershim.sock",
            f"--image-service-endpoint=unix://{self.root}/dockershim.sock",
            f"--experimental-dockershim-root-directory={self.root}/dockershim",
            f"--pod-infra-container-image={PAUSE_IMAGE}",
            "--network-plugin=",
            "--v=1",
        ]
        if self.labels:
            argv.append("--node-labels=" + ",".join(f"{k}={v}" for k, v in self.labels.items()))
        if self.taints:
            argv.append("--register-with-taints=" + ",".join(self.taints))
        self.kubelet = _spawn(argv, self.root / "kubelet.log")

    def advertise(self, core: client.CoreV1Api) -> None:
        """Extended resources (a "GPU" per node) the way a device plugin's absence requires:
        a PATCH of the node's status capacity, which the kubelet keeps."""
        if not self.extended:
            return
        body = [
            {"op": "add", "path": f"/status/capacity/{k.replace('/', '~1')}", "value": v}
            for k, v in self.extended.items()
        ]
        core.patch_node_status(self.name, body)

    def kill(self) -> None:
        """Node loss: the node drops off the network, then its kubelet and containers stop
        at once; nothing reports, and no peer hears its connections close."""
        self.network.partition(self.index)
        _stop(self.kubelet, signal.SIGKILL)
        with contextlib.suppress(NodeSetupError):
            ids = self.docker("ps", "-q").split()
            if ids:
                self.docker("kill", *ids, check=False)
        _stop(self.dockerd, signal.SIGKILL)
        _run("pkill", "-KILL", "-f", f"{self.root}/exec", check=False)

    def stop(self) -> None:
        _stop(self.kubelet)
        if self.dockerd is not None and self.dockerd.poll() is None:
            ids = self.docker("ps", "-aq", check=False).split()
            if ids:
                self.docker("rm", "-f", *ids, check=False)
        _stop(self.dockerd)
        # kubelet bind mounts (projected tokens, emptyDirs) outlive it; unmount before rm
        mounts = [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(self.root))
        ]
        for m in sorted(mounts, key=len, reverse=True):
            _run("umount", "-l", m, check=False)


@dataclass
class HostKubeProxy:
    """kube-proxy in iptables mode for the whole host (all nodes share its netns)."""

    control_plane: ControlPlane
    root: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, binaries: Path, node: str) -> None:
        kubeconfig = self.control_plane.client_kubeconfig("system:kube-proxy")
        config = self.root / "kube-proxy.yaml"
        self.root.mkdir(parents=True, exist_ok=True)
        config.write_text(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
            "kind: KubeProxyConfiguration\n"
            "mode: iptables\n"
            f"clientConnection: {{kubeconfig: '{kubeconfig}'}}\n"
            f"clusterCIDR: {SUPERNET}\n"
            "bindAddress: 127.0.0.1\n"
            f"healthzBindAddress: 127.0.0.1:{free_port()}\n"
            f"metricsBindAddress: 127.0.0.1:{free_port()}\n"
            "conntrack: {maxPerCore: 0}\n"
            "iptables: {syncPeriod: 2s, minSyncPeriod: 0s}\n"
        )
        self.proc = _spawn(
            [str(binaries / "kube-proxy"), f"--config={config}", f"--hostname-override={node}"],
            self.root / "kube-proxy.log",
        )

    def stop(self) -> None:
        _stop(self.proc)
        if self.proc is not None:
            subprocess.run(
                [str(NODE_CACHE / "kube-proxy"), "--cleanup"], capture_output=True, check=False
            )


class ApiDnsmasq:
    """Cluster DNS: dnsmasq answering for ``cluster.local`` from a hosts file this harness
    rewrites from the API every half second (Services' cluster IPs; headless Services'
    endpoint addresses, and ``<hostname>.<service>`` for those with a hostname)."""

    def __init__(self, k8s: client.ApiClient, listen: str, root: Path) -> None:
        self.core = client.CoreV1Api(k8s)
        self.listen = listen
        self.root = root
        self.hosts = root / "cluster.hosts"
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, name="dns-feed", daemon=True)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.hosts.write_text("")
        self.proc = _spawn(
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                f"--listen-address={self.listen}",
                "--port=53",
                f"--addn-hosts={self.hosts}",
                # names in the cluster domain that we do not know are NXDOMAIN, not forwarded
                f"--local=/{CLUSTER_DOMAIN}/",
                "--domain-needed",
                "--cache-size=0",
                "--user=root",
                f"--pid-file={self.root}/dnsmasq.pid",
                "--log-facility=-",
            ],
            self.root / "dnsmasq.log",
        )
        self._thread.start()

    def _list(self, kind: str) -> list[dict[str, Any]]:
        resp = getattr(self.core, f"list_{kind}_for_all_namespaces")(_preload_content=False)
        items: list[dict[str, Any]] = json.loads(resp.data)["items"]
        return items

    def records(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        headless: set[tuple[str, str]] = set()
        for svc in self._list("service"):
            ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
            ip = svc["spec"].get("clusterIP")
            if ip in (None, "None"):
                headless.add((ns, name))
            else:
                out.append((ip, f"{name}.{ns}.svc.{CLUSTER_DOMAIN}"))
        for ep in self._list("endpoints"):
            ns, name = ep["metadata"]["namespace"], ep["metadata"]["name"]
            if (ns, name) not in headless:
                continue
            fqdn = f"{name}.{ns}.svc.{CLUSTER_DOMAIN}"
            for subset in ep.get("subsets") or []:
                for addr in (subset.get("addresses") or []) + (
                    subset.get("notReadyAddresses") or []
                ):
                    out.append((addr["ip"], fqdn))
                    if addr.get("hostname"):
                        out.append((addr["ip"], f"{addr['hostname']}.{fqdn}"))
        return out

    def _feed(self) -> None:
        last = ""
        while not self._stop.wait(0.5):
            try:
                text = "".join(f"{ip} {name}\n" for ip, name in sorted(self.records()))
            except Exception:
                continue
            if text != last and self.proc is not None:
                tmp = self.hosts.with_suffix(".tmp")
                tmp.write_text(text)
                tmp.replace(self.hosts)
                self.proc.send_signal(signal.SIGHUP)
                last = text

    def stop(self) -> None:
        self._stop.set()
        _stop(self.proc)


def node_ready(core: client.CoreV1Api, name: str) -> bool:
    try:
        node: Any = core.read_node(name)
    except client.ApiException:
        return False
    for c in node.status.conditions or []:
        if c.type == "Ready":
            return bool(c.status == "True")
    return False
