"""The product's path on the bench, shared by `make demo` and the end-to-end test.

helm install of the chart into the bench apiserver → the podrunner runs every pod the cluster
would run (the chart's operator, under the chart's ServiceAccount token; the generator Job and the
consumer Deployment the operator creates, exactly as their templates say) → kubectl apply of a
TileJob → watch → leftovers in moto and the apiserver → kubectl delete.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tilehopper import contracts
from tilehopper_bench import procs
from tilehopper_bench.podrunner import PodRunner
from tilehopper_bench.stack import Bench, process_env

CHART = procs.repo_root() / "deploy" / "helm" / "tilehopper"
RELEASE = "tilehopper"
TILES_MOUNT = "/tiles"  # the chart's default tiles.hostPath; the podrunner maps it to a host folder


@dataclass
class Deployment:
    """One helm release of the chart on the bench, with the podrunner playing the kubelet."""

    bench: Bench
    namespace: str
    tiles_dir: Path
    workdir: Path
    runner: PodRunner | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Extra TILEHOPPER_* (or other) variables for the operator's container, through the chart.
    operator_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = process_env(self.bench.env)
        self.tiles_dir.mkdir(parents=True, exist_ok=True)

    # -- commands --

    def kubectl(self, *args: str, input_: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        answer = subprocess.run(
            ["kubectl", *args], env=self.env, input=input_, text=True, capture_output=True, timeout=120
        )
        if check and answer.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args[:3])} failed: {answer.stderr.strip()}")
        return answer

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        answer = subprocess.run(["helm", *args], env=self.env, text=True, capture_output=True, timeout=300)
        if answer.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args[:2])} failed: {answer.stderr.strip()}")
        return answer

    def values(self) -> dict[str, Any]:
        env = self.bench.env
        return {
            "image": {"repository": "tilehopper", "tag": "bench"},
            "operator": {
                "logLevel": "info",
                "addressMode": "private",  # the bench's instances have loopback private IPs
                "subnetId": env["TILEHOPPER_BENCH_SUBNET_ID"],
                "livenessPort": 0,  # nothing on the bench may listen beyond loopback
                "env": {"TILEHOPPER_DRAIN_SECONDS": "1", "TILEHOPPER_ORPHAN_SWEEP_SECONDS": "10",
                        **self.operator_env},
            },
            "aws": {
                "region": env["AWS_DEFAULT_REGION"],
                "endpointUrl": env["AWS_ENDPOINT_URL"],
                # moto takes any key; the chart's schema wants the shape of a real one.
                "accessKeyId": "AKIATILEHOPPERBENCH0",
                "secretAccessKey": "bench" * 8,
            },
            "rabbitmq": {"external": {"url": env["AMQP_URL"], "apiUrl": env["RABBITMQ_API_URL"]}},
            "tiles": {"mode": "hostPath", "hostPath": TILES_MOUNT},
        }

    def install(self) -> None:
        values = self.workdir / "values.yaml"
        self.workdir.mkdir(parents=True, exist_ok=True)
        values.write_text(yaml.safe_dump(self.values()))
        self.helm("upgrade", "--install", RELEASE, str(CHART), "--namespace", self.namespace,
                  "--create-namespace", "--values", str(values))

    def start_runner(self) -> PodRunner:
        self.runner = PodRunner(
            self.env["KUBECONFIG"],
            self.workdir / "pods",
            namespace=self.namespace,
            label_selector="app.kubernetes.io/name=tilehopper",
            host_paths={TILES_MOUNT: self.tiles_dir},
        )
        self.runner.start()
        return self.runner

    def operator_pid(self) -> int | None:
        """PID of the operator's container process (the podrunner restarts it if it dies)."""
        if self.runner is None:
            return None
        for key, proc in self.runner.processes().items():
            if "-operator-" in key and proc.alive():
                return proc.pid
        return None

    def scale_operator(self, replicas: int) -> None:
        self.kubectl("scale", "deployment", f"{RELEASE}-operator", "-n", self.namespace, f"--replicas={replicas}")

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner = None

    # -- the job --

    def apply(self, manifest: dict[str, Any]) -> None:
        # JSON, not YAML: the apiserver reads a bare YAML key `y` as true.
        self.kubectl("apply", "-n", self.namespace, "-f", "-", input_=json.dumps(manifest))

    def get_job(self, name: str) -> dict[str, Any] | None:
        answer = self.kubectl("get", "tilejob", name, "-n", self.namespace, "-o", "json", check=False)
        if answer.returncode != 0:
            return None
        return json.loads(answer.stdout)

    def wait_job(self, name: str, done: Callable[[dict[str, Any]], bool], *, timeout: float,
                 on_poll: Callable[[dict[str, Any]], None] | None = None, interval: float = 1.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.get_job(name)
            if job is not None:
                last = job
                if on_poll:
                    on_poll(job)
                if done(job):
                    return job
            time.sleep(interval)
        raise TimeoutError(f"TileJob {name} not done after {timeout:.0f}s; status: {json.dumps(last.get('status', {}))[:2000]}")

    def delete_job(self, name: str, *, timeout: float = 120) -> None:
        self.kubectl("delete", "tilejob", name, "-n", self.namespace, "--wait=true", f"--timeout={int(timeout)}s")

    def operator_log(self) -> str:
        if self.runner is None:
            return ""
        texts = []
        for path in sorted(self.runner.log_dir.glob("*operator*.log")):
            texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def all_logs(self) -> str:
        if self.runner is None:
            return ""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.runner.log_dir.glob("*.log")))


def tilejob(name: str, *, url_template: str, tiles: dict[str, Any], rotate_every: str = "20s",
            replicas: int = 2, threads: int = 8) -> dict[str, Any]:
    return {
        "apiVersion": f"{contracts.API_GROUP}/{contracts.API_VERSION}",
        "kind": contracts.TILEJOB_KIND,
        "metadata": {"name": name},
        "spec": {
            "tiles": tiles,
            "source": {"urlTemplate": url_template},
            "consumers": {"replicas": replicas, "threads": threads},
            "proxy": {
                "rotateEvery": rotate_every,
                # The bench's consumers reach the proxies from 127.0.0.1.
                "allowedCidrs": ["127.0.0.0/8"],
                "addressMode": "private",
            },
        },
    }


def ec2(bench: Bench) -> Any:
    """An EC2 client on the bench's moto, made the product's way."""
    from tilehopper_operator import aws

    env = bench.env
    client, _ = aws.make_clients(region=env["AWS_DEFAULT_REGION"], endpoint_url=env["AWS_ENDPOINT_URL"],
                                 access_key_id=env["AWS_ACCESS_KEY_ID"], secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    return client


def aws_leftovers(bench: Bench, job_uid: str | None = None) -> dict[str, int]:
    """What moto still holds that tilehopper created (of one job, or of any)."""
    from tilehopper_operator import aws

    return aws.leftovers(ec2(bench), job_uid)


def kube_leftovers(deployment: Deployment, job: str) -> dict[str, int]:
    """Objects labelled for the job still in the apiserver (ConfigMaps, Secrets, workloads, RBAC)."""
    counts = {}
    selector = f"{contracts.LABEL_JOB}={job}"
    for kind in ("configmaps", "secrets", "deployments", "jobs", "serviceaccounts", "roles", "rolebindings"):
        answer = deployment.kubectl("get", kind, "-n", deployment.namespace, "-l", selector, "-o", "name", check=False)
        counts[kind] = len([line for line in answer.stdout.splitlines() if line.strip()])
    return counts
