"""The bench's real Kubernetes: etcd + kube-apiserver + kube-controller-manager, plus kubectl and helm.

Every binary is built from the Go modules pinned in tools/bench-bin (one `go install tool`), cached
under cache_dir()/bin/<hash of the pins>, so a rebuild happens only when a pin changes. There is no
scheduler and no kubelet: Pods are created (by the Deployment/ReplicaSet/Job controllers) and stay
Pending, which is all the operator's tests need from them.

CLI: `python -m tilehopper_bench.kube build` builds (or finds) the binaries and prints their folder.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tilehopper_bench import procs

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")
# `go install` names a binary after its package's last path element: etcd's is go.etcd.io/etcd/server/v3.
_INSTALLED_AS = {"etcd": "server"}
# Started in this order, stopped in the reverse one.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"  # only allocated from: nothing ever sends traffic to it
ADMIN_USER = "tilehopper-bench-admin"


# ---------------------------------------------------------------------------------------------
# Building the binaries


def pins_dir() -> Path:
    return procs.repo_root() / "tools" / "bench-bin"


def pinned_version(module: str) -> str:
    """The version tools/bench-bin/go.mod pins a Go module at."""
    go_mod = (pins_dir() / "go.mod").read_text()
    match = re.search(rf"^\s*{re.escape(module)}\s+(v\S+)", go_mod, re.MULTILINE)
    if not match:
        raise RuntimeError(f"{module} is not pinned in {pins_dir() / 'go.mod'}")
    return match.group(1)


def _ldflags() -> str:
    """Stamp the release versions a `go install` leaves out.

    Without them kube-apiserver reports v0.0.0-master, which fails a chart's `kubeVersion`
    constraint in helm and makes kubectl warn about version skew. -X only changes the link step,
    so the compiled packages in GOCACHE stay valid.
    """
    kube = pinned_version("k8s.io/kubernetes")
    helm = pinned_version("helm.sh/helm/v4")
    major, minor = kube.lstrip("v").split(".")[:2]
    flags = []
    for package in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version"):
        flags += [
            f"-X {package}.gitVersion={kube}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
        ]
    flags.append(f"-X helm.sh/helm/v4/internal/version.version={helm}")
    return " ".join(flags)


def _pins() -> tuple[str, str]:
    """(hash of the build recipe, its ldflags): the hash names the cache folder."""
    go_mod = (pins_dir() / "go.mod").read_bytes()
    go_sum = (pins_dir() / "go.sum").read_bytes()
    ldflags = _ldflags()
    digest = hashlib.sha256(go_mod + b"\0" + go_sum + b"\0" + ldflags.encode())
    return digest.hexdigest()[:12], ldflags


def bin_dir() -> Path:
    return procs.cache_dir() / "bin" / _pins()[0]


def _complete(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in BINARIES)


def _say(message: str) -> None:
    print(f"[tilehopper-bench] {message}", file=sys.stderr, flush=True)


def ensure_binaries() -> dict[str, Path]:
    """Build the five binaries unless this set of pins was built before; return name -> path."""
    digest, ldflags = _pins()
    target = procs.cache_dir() / "bin" / digest
    if not _complete(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        # One build at a time, also across processes (parallel test sessions, bench-up).
        with open(target.parent / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _complete(target):
                _build(target, ldflags=ldflags)
    return {name: target / name for name in BINARIES}


def _build(target: Path, *, ldflags: str) -> None:
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("the bench builds its Kubernetes binaries with Go: put `go` on PATH")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _say(
        f"building {', '.join(BINARIES)} from {pins_dir()} into {target} "
        "(a cold build takes 15-30 minutes on 2 cores; later builds of the same pins are instant)"
    )
    began = time.monotonic()
    env = dict(os.environ, GOBIN=str(staging))
    # Output goes straight to our stderr so a long cold build shows that it is alive.
    subprocess.run(
        [go, "install", "-v", f"-ldflags={ldflags}", "tool"],
        cwd=pins_dir(),
        env=env,
        check=True,
        stdout=sys.stderr,
    )
    for name, installed in _INSTALLED_AS.items():
        (staging / installed).rename(staging / name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    _say(f"built in {time.monotonic() - began:.0f}s")


def versions(binaries: dict[str, Path] | None = None) -> dict[str, str]:
    """The version each built binary reports about itself."""
    binaries = binaries or ensure_binaries()

    def first_line(*argv: str) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.strip().splitlines()[0]

    return {
        "etcd": first_line(str(binaries["etcd"]), "--version"),
        "kube-apiserver": first_line(str(binaries["kube-apiserver"]), "--version"),
        "kube-controller-manager": first_line(str(binaries["kube-controller-manager"]), "--version"),
        "kubectl": first_line(str(binaries["kubectl"]), "version", "--client"),
        "helm": first_line(str(binaries["helm"]), "version", "--short"),
    }


# ---------------------------------------------------------------------------------------------
# Certificates and kubeconfigs


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _ec_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)


def _signed_cert(
    pki: Path, name: str, *, subject: str, extensions: str, ca: str = "ca"
) -> None:
    """<name>.key + <name>.crt signed by the bench's own CA."""
    _ec_key(pki / f"{name}.key")
    _openssl("req", "-new", "-key", pki / f"{name}.key", "-subj", subject, "-out", pki / f"{name}.csr")
    (pki / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", pki / f"{name}.csr", "-CA", pki / f"{ca}.crt",
        "-CAkey", pki / f"{ca}.key", "-CAcreateserial", "-days", "3650", "-sha256",
        "-extfile", pki / f"{name}.ext", "-out", pki / f"{name}.crt",
    )  # fmt: skip


def make_pki(pki: Path) -> None:
    """A CA, the apiserver's serving cert, client certs, and the service-account signing key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    _ec_key(pki / "ca.key")
    _openssl(
        "req", "-x509", "-new", "-key", pki / "ca.key", "-subj", "/CN=tilehopper-bench-ca",
        "-days", "3650", "-sha256", "-out", pki / "ca.crt",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )  # fmt: skip
    first_service_ip = SERVICE_CLUSTER_IP_RANGE.split("/")[0].rsplit(".", 1)[0] + ".1"
    _signed_cert(
        pki,
        "apiserver",
        subject="/CN=kube-apiserver",
        extensions=(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,"
            f"DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:{first_service_ip}\n"
        ),
    )
    client = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    _signed_cert(pki, "admin", subject=f"/O=system:masters/CN={ADMIN_USER}", extensions=client)
    # system:masters as well: with --use-service-account-credentials=false every controller acts
    # as this one user, and the bootstrap role of system:kube-controller-manager alone is too narrow.
    _signed_cert(
        pki,
        "controller-manager",
        subject="/O=system:masters/CN=system:kube-controller-manager",
        extensions=client,
    )
    _ec_key(pki / "service-account.key")
    _openssl("pkey", "-in", pki / "service-account.key", "-pubout", "-out", pki / "service-account.pub")


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(
    path: Path, *, server: str, ca: Path, user: str, credentials: dict[str, str]
) -> Path:
    """A one-context kubeconfig with everything embedded, so it can be copied anywhere."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "tilehopper-bench", "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [
            {"name": "tilehopper-bench", "context": {"cluster": "tilehopper-bench", "user": user}}
        ],
        "current-context": "tilehopper-bench",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------------------------------------
# The control plane


class ControlPlane:
    """etcd, kube-apiserver and kube-controller-manager on 127.0.0.1, started and stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.pki = self.workdir / "pki"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.log_dir = self.workdir / "logs"
        self.pid_dir = self.workdir / "pids"
        self.server = ""
        self.binaries: dict[str, Path] = {}
        self.procs: dict[str, procs.Proc] = {}
        # Seconds each step of the last start() took; `make benchmark` reports them.
        self.timings: dict[str, float] = {}

    @property
    def bin_dir(self) -> Path:
        return self.binaries["kubectl"].parent if self.binaries else bin_dir()

    @property
    def env(self) -> dict[str, str]:
        # PATH is left alone: whoever writes .bench/env prepends TILEHOPPER_BENCH_BIN to it.
        return {"KUBECONFIG": str(self.kubeconfig), "TILEHOPPER_BENCH_BIN": str(self.bin_dir)}

    def start(self) -> None:
        began = time.monotonic()
        self.binaries = ensure_binaries()
        self.timings = {"binaries": time.monotonic() - began}
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - began

    def _start_all(self) -> None:
        step = time.monotonic()
        # A fresh cluster every start: nothing from an earlier run leaks into a test.
        for stale in (self.pki, self.workdir / "etcd", self.workdir / "controller-manager"):
            shutil.rmtree(stale, ignore_errors=True)
        make_pki(self.pki)
        self.timings["pki"] = time.monotonic() - step

        step = time.monotonic()
        etcd_url = self._start_etcd()
        self.timings["etcd"] = time.monotonic() - step

        step = time.monotonic()
        self._start_apiserver(etcd_url)
        self.timings["kube-apiserver"] = time.monotonic() - step

        step = time.monotonic()
        self._start_controller_manager()
        # The default ServiceAccount is made by the controller-manager: once it exists, Pods can be
        # admitted and TokenRequest works for freshly made accounts too.
        procs.wait_for(
            lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default") is not None,
            timeout=90,
            what="default ServiceAccount",
            proc=self.procs["kube-controller-manager"],
        )
        self.timings["kube-controller-manager"] = time.monotonic() - step

    def _start(self, name: str, argv: list[str]) -> procs.Proc:
        proc = procs.start(name, argv, log_dir=self.log_dir, pid_dir=self.pid_dir, cwd=self.workdir)
        self.procs[name] = proc
        return proc

    def _start_etcd(self) -> str:
        client, peer = procs.free_port(), procs.free_port()
        client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        proc = self._start(
            "etcd",
            [
                str(self.binaries["etcd"]),
                "--name=bench",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=bench={peer_url}",
                "--initial-cluster-state=new",
                # A throwaway cluster: durability buys nothing and fsync costs seconds per test run.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        procs.wait_for(
            lambda: _http_json(f"{client_url}/health").get("health") == "true",
            timeout=30,
            what="etcd",
            proc=proc,
        )
        return client_url

    def _start_apiserver(self, etcd_url: str) -> None:
        port = procs.free_port()
        self.server = f"https://127.0.0.1:{port}"
        pki = self.pki
        proc = self._start(
            "kube-apiserver",
            [
                str(self.binaries["kube-apiserver"]),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # The reconciler refuses a loopback address for the `kubernetes` Endpoints, and
                # nothing in the bench runs inside a Pod that would need them.
                "--endpoint-reconciler-type=none",
                f"--secure-port={port}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={pki / 'service-account.pub'}",
                f"--service-account-signing-key-file={pki / 'service-account.key'}",
                f"--api-audiences={self.server}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )
        write_kubeconfig(
            self.kubeconfig,
            server=self.server,
            ca=pki / "ca.crt",
            user=ADMIN_USER,
            credentials={
                "client-certificate-data": _b64(pki / "admin.crt"),
                "client-key-data": _b64(pki / "admin.key"),
            },
        )
        procs.wait_for(
            lambda: self._get("/readyz", raw=True) == b"ok",
            timeout=120,
            what="kube-apiserver /readyz",
            proc=proc,
        )
        procs.wait_for(
            lambda: self._get("/api/v1/namespaces/default") is not None,
            timeout=60,
            what="default namespace",
            proc=proc,
        )

    def _start_controller_manager(self) -> None:
        pki = self.pki
        kubeconfig = write_kubeconfig(
            self.workdir / "controller-manager" / "kubeconfig",
            server=self.server,
            ca=pki / "ca.crt",
            user="system:kube-controller-manager",
            credentials={
                "client-certificate-data": _b64(pki / "controller-manager.crt"),
                "client-key-data": _b64(pki / "controller-manager.key"),
            },
        )
        self._start(
            "kube-controller-manager",
            [
                str(self.binaries["kube-controller-manager"]),
                f"--kubeconfig={kubeconfig}",
                # No authentication/authorization kubeconfig: nothing scrapes its secure port, and
                # delegated auth would log errors about the front-proxy CA the bench does not have.
                "--bind-address=127.0.0.1",
                f"--secure-port={procs.free_port()}",
                f"--cert-dir={self.workdir / 'controller-manager'}",
                "--controllers=*",
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={pki / 'service-account.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
        )

    def stop(self) -> None:
        """Stop the three processes by PID: ours, or those recorded in pids/ by another process."""
        for name in reversed(COMPONENTS):
            proc = self.procs.pop(name, None)
            if proc is not None:
                proc.stop()
                continue
            pid_file = self.pid_dir / f"{name}.pid"
            with contextlib.suppress(FileNotFoundError, ValueError):
                pid = int(pid_file.read_text())
                if _runs(pid, name):
                    procs.stop_pid(pid)
        for name in COMPONENTS:
            (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- talking to it ------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        out = subprocess.run(
            [str(self.binaries["kubectl"]), *args],
            input=input,
            capture_output=True,
            text=True,
            env=dict(os.environ, **self.env),
            timeout=60,
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout

    def service_account_kubeconfig(
        self, namespace: str, sa: str, path: Path, *, duration_s: int = 3600
    ) -> Path:
        """A kubeconfig that acts as ServiceAccount namespace/sa, with a token from TokenRequest."""
        token = self.kubectl(
            "create", "token", sa, f"--namespace={namespace}", f"--duration={duration_s}s"
        ).strip()
        return write_kubeconfig(
            Path(path),
            server=self.server,
            ca=self.pki / "ca.crt",
            user=f"system:serviceaccount:{namespace}:{sa}",
            credentials={"token": token},
        )

    def _ssl(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return context

    def _get(self, path: str, *, raw: bool = False) -> Any:
        """GET as the admin: the body (raw bytes or JSON), or None on 404."""
        try:
            with urllib.request.urlopen(self.server + path, context=self._ssl(), timeout=5) as resp:
                body = resp.read()
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise
        return body if raw else json.loads(body)


def _http_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return dict(json.loads(resp.read()))


def _runs(pid: int, name: str) -> bool:
    """Is pid still the binary we started (and not some later process that reused the number)?"""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return Path(argv0).name == name


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["build"]:
        print(ensure_binaries()["kubectl"].parent)
        return 0
    if args == ["versions"]:
        print(json.dumps(versions(), indent=2))
        return 0
    print("usage: python -m tilehopper_bench.kube build|versions", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
