"""A real Kubernetes control plane on 127.0.0.1 for integration tests and benchmarks.

etcd + kube-apiserver + kube-controller-manager + kube-scheduler, started from an envtest-style
assets directory: ``$KUBEBUILDER_ASSETS`` when set (any recent version from setup-envtest),
otherwise the v1.20.2 binaries that ``hack/build-control-plane.sh`` builds once and caches.
There is no kubelet: pods are scheduled and bound but never run; ``graft.testing.kubelet``
drives their status.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[4]
DEFAULT_CACHE = Path.home() / ".cache" / "graft" / "k8s-v1.20.2"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
ADMIN_TOKEN = "graft-admin-token"

# Controllers that need a cloud provider or a kubelet; the rest run for real.
_DISABLED_CONTROLLERS = (
    "nodeipam",
    "nodelifecycle",
    "cloud-node-lifecycle",
    "service",
    "route",
    "attachdetach",
    "persistentvolume-expander",
    "ttl",
)


class ControlPlaneError(RuntimeError):
    """The control plane could not start; the message says what to do."""


def find_assets() -> Path:
    """The directory holding etcd and the Kubernetes binaries."""
    env = os.environ.get("KUBEBUILDER_ASSETS")
    candidates = [Path(env)] if env else [Path(os.environ.get("GRAFT_K8S_CACHE", DEFAULT_CACHE))]
    for c in candidates:
        if all((c / b).exists() for b in BINARIES):
            return c
        if all((c / b).exists() for b in BINARIES[1:]) and shutil.which("etcd"):
            return c
    raise ControlPlaneError(
        f"no control-plane binaries in {candidates[0]}: run `hack/build-control-plane.sh` "
        "(builds them once, ~5 min) or set KUBEBUILDER_ASSETS to a setup-envtest directory"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(assets: Path, name: str) -> str:
    p = assets / name
    if p.exists():
        return str(p)
    found = shutil.which(name)
    if not found:
        raise ControlPlaneError(f"{name} not found in {assets} or on PATH")
    return found


def _help(binary: str) -> str:
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, check=False)
    return out.stdout + out.stderr


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass
class ControlPlane:
    """One running control plane; use as a context manager or call start()/stop()."""

    assets: Path
    state_dir: Path
    controllers: bool = True
    #: Where the apiserver listens and what it advertises. Loopback for the process-kubelet
    #: tiers; a test bridge's address when real kubelets run pods that must reach it.
    address: str = "127.0.0.1"
    #: Real kubelets post node status: run the node lifecycle controller (NotReady after
    #: ``node_grace_seconds`` without a heartbeat) and keep the admission plugins that
    #: fake nodes cannot satisfy.
    real_nodes: bool = False
    node_grace_seconds: int = 16
    api_port: int = field(default_factory=free_port)
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "pki" / "ca.crt"

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG for this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _pki(self) -> None:
        pki = self.state_dir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        if (pki / "apiserver.crt").exists():
            return
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "30",
            "-subj",
            "/CN=graft-test-ca",
            cwd=pki,
        )
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "apiserver.key",
            "-out",
            "apiserver.csr",
            "-subj",
            "/CN=kube-apiserver",
            cwd=pki,
        )
        (pki / "ext.cnf").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc,IP:10.0.0.1"
            + ("" if self.address == "127.0.0.1" else f",IP:{self.address}")
            + "\n"
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "apiserver.crt",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
            cwd=pki,
        )
        (pki / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"\n')

    def client_kubeconfig(self, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig with a client certificate for ``user`` (and ``groups``) signed by the
        cluster's CA: how a kubelet (``system:node:<name>`` in ``system:nodes``) or kube-proxy
        (``system:kube-proxy``) authenticates, with the rights Kubernetes gives those names."""
        pki = self.state_dir / "pki"
        stem = "client-" + "".join(c if c.isalnum() else "-" for c in user)
        subj = "".join(f"/O={g}" for g in groups) + f"/CN={user}"
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{stem}.key",
            "-out", f"{stem}.csr", "-subj", subj, cwd=pki,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{stem}.crt", "-days", "30", cwd=pki,
        )  # fmt: skip
        path = self.state_dir / f"{stem}.kubeconfig"
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: graft-test, cluster: {{server: '{self.server}', "
            f"certificate-authority: '{self.ca_file}'}}}}]\n"
            f"users: [{{name: u, user: {{client-certificate: '{pki / stem}.crt', "
            f"client-key: '{pki / stem}.key'}}}}]\n"
            "contexts: [{name: graft-test, context: {cluster: graft-test, user: u}}]\n"
            "current-context: graft-test\n"
        )
        return path

    def _write_kubeconfig(self) -> None:
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: graft-test, cluster: {{server: '{self.server}', "
            f"certificate-authority: '{self.ca_file}'}}}}]\n"
            f"users: [{{name: admin, user: {{token: {ADMIN_TOKEN}}}}}]\n"
            "contexts: [{name: graft-test, context: {cluster: graft-test, user: admin}}]\n"
            "current-context: graft-test\n"
        )

    @property
    def _loopback(self) -> bool:
        return self.address.startswith("127.")

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        logs = self.state_dir / "logs"
        logs.mkdir(exist_ok=True)
        out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self._procs[name] = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.state_dir,
            start_new_session=True,
        )

    def _wait(self, what: str, ok: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    log = (self.state_dir / "logs" / f"{name}.log").read_text(errors="replace")
                    raise ControlPlaneError(f"{name} exited ({p.returncode}):\n{log[-3000:]}")
            if ok():
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"{what} not ready after {timeout:.0f}s; logs in {self.state_dir}")

    def _kubectl_ok(self, *args: str) -> bool:
        r = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            check=False,
        )
        return r.returncode == 0

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._pki()
        self._write_kubeconfig()
        pki = self.state_dir / "pki"
        etcd = _binary(self.assets, "etcd")
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client_url = f"http://127.0.0.1:{self.etcd_port}"
        etcd_args = [
            etcd,
            "--data-dir",
            str(self.state_dir / "etcd"),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"default={peer}",
        ]
        if "--unsafe-no-fsync" in _help(etcd):
            etcd_args.append("--unsafe-no-fsync")  # a throw-away test store
        self._spawn("etcd", etcd_args)
        apiserver = _binary(self.assets, "kube-apiserver")
        api_help = _help(apiserver)
        api_args = [
            apiserver,
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--bind-address={self.address}",
            f"--secure-port={self.api_port}",
            f"--advertise-address={self.address}",
            f"--tls-cert-file={pki}/apiserver.crt",
            f"--tls-private-key-file={pki}/apiserver.key",
            f"--client-ca-file={pki}/ca.crt",
            f"--token-auth-file={pki}/tokens.csv",
            "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={pki}/sa.pub",
            f"--service-account-signing-key-file={pki}/sa.key",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.0.0.0/24",
            # 127.0.0.1 is refused as an endpoint IP of the kubernetes Service
            "--endpoint-reconciler-type=" + ("none" if self._loopback else "lease"),
            "--allow-privileged=true",
            f"--cert-dir={pki}/gen",
            "--v=1",
        ]
        if "--insecure-port" in api_help:
            api_args.append("--insecure-port=0")
        # without a kubelet, fake nodes would keep a not-ready taint
        disabled = [
            p
            for p in ("TaintNodesByCondition", "StorageObjectInUseProtection")
            if p in api_help and not self.real_nodes
        ]
        if disabled:
            api_args.append("--disable-admission-plugins=" + ",".join(disabled))
        self._spawn("apiserver", api_args)
        self._wait("kube-apiserver", lambda: self._kubectl_ok("get", "--raw", "/readyz"), 90)
        if not self.controllers:
            return
        kcm = _binary(self.assets, "kube-controller-manager")
        kcm_args = [
            kcm,
            f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            f"--service-account-private-key-file={pki}/sa.key",
            f"--root-ca-file={pki}/ca.crt",
            "--use-service-account-credentials=true",
            "--leader-elect=false",
            "--v=1",
            "--controllers=*,"
            + ",".join(
                f"-{c}"
                for c in _DISABLED_CONTROLLERS
                if not (self.real_nodes and c == "nodelifecycle")
            ),
        ]
        if self.real_nodes:
            kcm_args += [
                f"--node-monitor-grace-period={self.node_grace_seconds}s",
                "--node-monitor-period=2s",
            ]
        if re.search(r"--port int", _help(kcm)):
            kcm_args.append("--port=0")
        self._spawn("controller-manager", kcm_args)
        sched = _binary(self.assets, "kube-scheduler")
        sched_args = [
            sched,
            f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            "--leader-elect=false",
            "--v=1",
        ]
        if re.search(r"--port int", _help(sched)):
            sched_args.append("--port=0")
        self._spawn("scheduler", sched_args)
        # the controller-manager creates each namespace's default ServiceAccount
        self._wait(
            "kube-controller-manager",
            lambda: self._kubectl_ok("get", "serviceaccount", "default", "-n", "default"),
            90,
        )

    @contextlib.contextmanager
    def frozen(self, component: str) -> Iterator[None]:
        """SIGSTOP one component (``controller-manager``, ``scheduler``) for the block, as a
        busy or lagging controller would be; SIGCONT after."""
        proc = self._procs[component]
        proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for name in ("scheduler", "controller-manager", "apiserver", "etcd"):
            p = self._procs.pop(name, None)
            if p is None:
                continue
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            input=input,
            check=False,
        )
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
        return r


def start_control_plane(state_dir: Path | None = None, *, controllers: bool = True) -> ControlPlane:
    cp = ControlPlane(
        assets=find_assets(),
        state_dir=state_dir or Path(tempfile.mkdtemp(prefix="graft-cp-")),
        controllers=controllers,
    )
    cp.start()
    return cp
