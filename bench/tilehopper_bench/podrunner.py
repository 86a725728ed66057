"""The bench's kubelet stand-in: runs the Pods the controllers create as local processes.

The bench's control plane has no scheduler and no kubelet, so the Pods that the Job and ReplicaSet
controllers create would stay Pending forever. PodRunner plays node "bench" for the Pods matching a
label selector: it binds each new Pod to that node (pods/binding), starts every container as a
local process, and reports pods/status the way a kubelet does, so the controllers see Running,
Ready, Succeeded or Failed Pods and react as in a real cluster (a Job completes, a Deployment is
available, scale-to-0 stops consumers).

How a container becomes a process (what a container runtime would do, and what we do instead):

- argv is `command + args`, with Kubernetes `$(VAR)` expansion from the container's environment.
  The image's entry points are console scripts in the venv, so `command[0]` is looked up in the
  directory of `python` first, then on PATH. A container without `command` runs `args` as argv.
- Environment: `envFrom` (ConfigMap/Secret), then `env` (literal values with `$(VAR)` expansion,
  `secretKeyRef`, `configMapKeyRef`, `fieldRef`). Nothing of this process's own environment is
  passed on except a few basics (PATH with python's bin folder first, HOME, locale), plus
  HOSTNAME=<pod>, PYTHONUNBUFFERED=1 (as the image sets it) and the runner's `extra_env`:
  in particular never our admin KUBECONFIG.
- Credentials: the Pod's ServiceAccount gets a TokenRequest token bound to the Pod, written into
  a kubeconfig that the process finds through KUBECONFIG. The product loads in-cluster config when
  it exists and KUBECONFIG otherwise, so it runs with exactly the RBAC the chart grants it.
- Volumes: a process cannot mount anything, so a volumeMount's mountPath is rewritten to a host
  folder wherever it appears in args, env values and workingDir: a hostPath volume maps to its
  host path (or where `host_paths` sends it, e.g. a kind node's /tiles to the repo's ./tiles),
  emptyDir to a fresh folder, configMap/secret volumes to a folder holding their keys.
  Paths compiled into the program are not rewritten.
- Probes, resources, security contexts and lifecycle hooks are ignored; a started container is
  Ready at once. Every Pod's IP is 127.0.0.1.
- Logs go to <workdir>/logs/<namespace>_<pod>_<container>.log, PIDs to <workdir>/pids/.

Deletion works like a kubelet's: a Pod with a deletionTimestamp gets SIGTERM (by PID), then
SIGKILL after its grace period, then a terminal status and a delete with gracePeriodSeconds=0.
A Pod that vanishes (force-deleted) has its processes stopped the same way, with a short grace.

CLI: `python -m tilehopper_bench.podrunner --kubeconfig K --workdir D [--namespace N]
[--selector S]` runs until SIGTERM or ^C.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tilehopper_bench import procs

log = logging.getLogger("tilehopper_bench.podrunner")

NODE_NAME = "bench"
POD_IP = "127.0.0.1"
DEFAULT_SELECTOR = "app.kubernetes.io/managed-by=tilehopper"

# A kubelet backs off 10 s doubling to 5 min; the bench wants restarts it can watch in a test.
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
# A container that ran this long starts its next crash loop from the first backoff again.
BACKOFF_RESET_AFTER_S = 60.0
# A force-deleted Pod has no grace period left to honour; its processes still get a SIGTERM first.
VANISHED_GRACE_S = 2.0
# Never wait longer than this for a process at stop(), whatever the Pod's grace period says.
STOP_GRACE_MAX_S = 10.0
HEARTBEAT_EVERY_S = 10.0
# Tokens are not refreshed as a kubelet would; one day outlasts any bench run.
TOKEN_SECONDS = 24 * 3600
# Environment variables a container image would provide anyway; nothing else is inherited.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME")
STRATEGIC = "application/strategic-merge-patch+json"


class ContainerConfigError(Exception):
    """A container cannot start yet (missing Secret key, unknown field...): retried like a kubelet."""


# ---------------------------------------------------------------------------------------------
# Turning a container spec into argv and environment (pure functions)

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: `$$` is a literal `$`, unknown references stay as written."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return _REFERENCE.sub(replace, text)


def rewrite_paths(text: str, mounts: Mapping[str, Path]) -> str:
    """Replace each mountPath (as a whole path prefix, anywhere in text) with its host folder.

    `--tiles=/tiles/z20` becomes `--tiles=<host>/z20`, while `/tilesets` and `/data/tiles` are left
    alone. Longer mount paths win, so a mount inside another mount maps to its own folder.
    """
    for mount_path in sorted(mounts, key=len, reverse=True):
        prefix = mount_path.rstrip("/") or "/"
        pattern = re.compile(r"(?<![\w.\-/])" + re.escape(prefix) + r"(?=/|$|[^\w.\-])")
        text = pattern.sub(lambda _m, host=str(mounts[mount_path]): host, text)
    return text


def resolve_executable(name: str, *, python: str) -> str:
    """The image's entry points are console scripts: look next to `python` first, then on PATH."""
    candidates = [Path(python).parent / Path(name).name]
    if "/" in name:
        candidates.insert(0, Path(name))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(Path(name).name)
    if found is None:
        raise FileNotFoundError(f"executable {name!r} not found next to {python} nor on PATH")
    return found


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """The fieldRef paths a container may ask for, answered for a Pod on the bench's node."""
    meta = pod.get("metadata", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", "default"),
        "spec.nodeName": NODE_NAME,
        "status.podIP": POD_IP,
        "status.podIPs": POD_IP,
        "status.hostIP": POD_IP,
        "status.hostIPs": POD_IP,
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    raise ContainerConfigError(f"unsupported fieldRef {path!r}")


@dataclass(frozen=True)
class Volumes:
    """Where each volume of a Pod lives on the host (None: a kind the bench cannot provide)."""

    folders: Mapping[str, Path | None]

    def mounts(self, container: Mapping[str, Any]) -> dict[str, Path]:
        """mountPath -> host folder for one container (subPath honoured)."""
        result: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            folder = self.folders.get(mount["name"])
            if folder is not None:
                result[mount["mountPath"]] = folder / mount.get("subPath", "")
        return result


# ---------------------------------------------------------------------------------------------
# What runs


@dataclass
class ContainerRun:
    name: str
    spec: dict[str, Any]
    init: bool = False
    proc: procs.Proc | None = None
    started_at: str | None = None
    started_mono: float = 0.0
    restart_count: int = 0
    backoff_s: float = 0.0
    next_start: float = 0.0  # monotonic time of the next (re)start attempt
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    last_terminated: dict[str, Any] | None = None
    done: bool = False  # terminated for good (no restart will follow)

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def exit_code(self) -> int | None:
        return None if self.last_terminated is None else int(self.last_terminated["exitCode"])


@dataclass
class PodRun:
    namespace: str
    name: str
    uid: str
    pod: dict[str, Any]
    folder: Path
    volumes: Volumes
    kubeconfig: Path | None
    init_containers: list[ContainerRun]
    containers: list[ContainerRun]
    start_time: str
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    last_status: dict[str, Any] | None = None
    terminating: bool = False
    kill_at: float = 0.0
    tell_api: bool = True  # False once the Pod object is gone

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def restart_policy(self) -> str:
        return str(self.pod.get("spec", {}).get("restartPolicy") or "Always")

    def all_runs(self) -> list[ContainerRun]:
        return self.init_containers + self.containers


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _exit_code(returncode: int) -> int:
    # A container killed by signal N reports 128+N, as runc does.
    return 128 - returncode if returncode < 0 else returncode


# ---------------------------------------------------------------------------------------------
# The runner


class PodRunner:
    """Node "bench": binds matching Pods, runs their containers as processes, reports their status."""

    def __init__(
        self,
        kubeconfig: Path | str,
        workdir: Path | str,
        *,
        namespace: str | None = None,
        label_selector: str = DEFAULT_SELECTOR,
        host_paths: Mapping[str, Path | str] | None = None,
        python: str = sys.executable,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """host_paths maps a hostPath volume's path (and everything below it) to another host
        folder, e.g. a kind node's /tiles to the repo's ./tiles; extra_env is added to every
        process below the Pod's own env (the place for what an image would bake in)."""
        self.kubeconfig = Path(kubeconfig)
        self.workdir = Path(workdir)
        self.namespace = namespace
        self.label_selector = label_selector
        self.host_paths = {str(k): Path(v) for k, v in (host_paths or {}).items()}
        self.python = python
        self.extra_env = dict(extra_env or {})
        self.log_dir = self.workdir / "logs"
        self.pid_dir = self.workdir / "pids"
        self.pods_dir = self.workdir / "pods"
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._pods: dict[str, PodRun] = {}  # by Pod uid
        self._finished: set[str] = set()  # uids handed back to the apiserver for good
        self._watcher: threading.Thread | None = None
        self._supervisor: threading.Thread | None = None
        self._last_heartbeat = 0.0

    @property
    def env(self) -> dict[str, str]:
        return {}

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        for folder in (self.log_dir, self.pid_dir, self.pods_dir):
            folder.mkdir(parents=True, exist_ok=True)
        api = self._api()
        self._register_node(api)
        self._watcher = threading.Thread(target=self._watch_loop, name="podrunner-watch", daemon=True)
        self._supervisor = threading.Thread(
            target=self._supervise_loop, name="podrunner-supervise", daemon=True
        )
        self._watcher.start()
        self._supervisor.start()

    def stop(self) -> None:
        """Stop watching and terminate every process this runner started (by PID)."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=30)
        if self._watcher is not None:
            # It may sit in a watch for a few more seconds; it only feeds a queue, so let it go.
            self._watcher.join(timeout=1)
        self._supervisor = self._watcher = None
        self._terminate_everything()

    def __enter__(self) -> PodRunner:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def processes(self) -> dict[str, procs.Proc]:
        """The processes running now, by "<namespace>/<pod>/<container>"."""
        with self._lock:
            return {
                f"{run.key}/{c.name}": c.proc
                for run in self._pods.values()
                for c in run.all_runs()
                if c.proc is not None and c.running()
            }

    # -- Kubernetes access ------------------------------------------------------------------

    def _api(self) -> client.CoreV1Api:
        # One client per thread: each gets its own connection pool.
        return client.CoreV1Api(config.new_client_from_config(config_file=str(self.kubeconfig)))

    def _register_node(self, api: client.CoreV1Api) -> None:
        """Node "bench", Ready: the pod GC deletes Pods bound to a node that does not exist."""
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": NODE_NAME,
                "labels": {"kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux"},
            },
        }
        try:
            api.create_node(body)
        except ApiException as error:
            if error.status != 409:
                raise
        self._heartbeat(api)

    def _heartbeat(self, api: client.CoreV1Api) -> None:
        """Keep the node controller from marking the node NotReady and evicting its Pods."""
        self._last_heartbeat = time.monotonic()  # a failed beat is retried at the next period
        now = _now()
        status = {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "tilehopper bench podrunner is running",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "addresses": [
                    {"type": "InternalIP", "address": POD_IP},
                    {"type": "Hostname", "address": NODE_NAME},
                ],
                "capacity": {"cpu": "64", "memory": "256Gi", "pods": "1000"},
                "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "1000"},
            }
        }
        api.patch_node_status(NODE_NAME, status, _content_type=STRATEGIC)
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": NODE_NAME, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": NODE_NAME,
                "leaseDurationSeconds": 40,
                "renewTime": _micro_now(),
            },
        }
        leases = client.CoordinationV1Api(api.api_client)
        try:
            leases.patch_namespaced_lease(
                NODE_NAME, "kube-node-lease", {"spec": lease["spec"]}, _content_type=STRATEGIC
            )
        except ApiException as error:
            if error.status != 404:
                raise
            leases.create_namespaced_lease("kube-node-lease", lease)

    # -- watching ---------------------------------------------------------------------------

    def _list_pods(self, api: client.CoreV1Api, **kwargs: Any) -> Any:
        if self.namespace:
            return api.list_namespaced_pod(self.namespace, label_selector=self.label_selector, **kwargs)
        return api.list_pod_for_all_namespaces(label_selector=self.label_selector, **kwargs)

    def _watch_loop(self) -> None:
        """List (to learn which Pods vanished) then watch, over and over; events go to a queue."""
        api = self._api()
        func = api.list_namespaced_pod if self.namespace else api.list_pod_for_all_namespaces
        args = (self.namespace,) if self.namespace else ()
        while not self._stopping.is_set():
            try:
                listing = json.loads(self._list_pods(api, _preload_content=False).data)
                items = listing.get("items", [])
                for pod in items:
                    self._events.put(("SYNC", pod))
                self._events.put(("PRESENT", {p["metadata"]["uid"] for p in items}))
                version = listing["metadata"]["resourceVersion"]
                stream = watch.Watch().stream(
                    func,
                    *args,
                    label_selector=self.label_selector,
                    resource_version=version,
                    timeout_seconds=5,
                )
                for event in stream:
                    self._events.put((event["type"], event["raw_object"]))
                    if self._stopping.is_set():
                        break
            except Exception as error:  # noqa: BLE001 - the apiserver may restart; keep trying
                if self._stopping.is_set():
                    return
                log.warning("watching pods failed (%s); listing again", error)
                self._stopping.wait(1)

    # -- supervising (all state changes happen on this one thread) --------------------------

    def _supervise_loop(self) -> None:
        api = self._api()
        while not self._stopping.is_set():
            try:
                try:
                    kind, obj = self._events.get(timeout=0.2)
                    self._on_event(api, kind, obj)
                    while True:
                        kind, obj = self._events.get_nowait()
                        self._on_event(api, kind, obj)
                except queue.Empty:
                    pass
                for run in list(self._pods.values()):
                    self._tick(api, run)
                if time.monotonic() - self._last_heartbeat > HEARTBEAT_EVERY_S:
                    self._heartbeat(api)
            except Exception:  # noqa: BLE001 - one bad Pod or API hiccup must not stop the node
                log.exception("podrunner step failed; continuing")
                self._stopping.wait(0.5)

    def _on_event(self, api: client.CoreV1Api, kind: str, obj: Any) -> None:
        if kind == "PRESENT":
            for run in list(self._pods.values()):
                if run.uid not in obj and run.tell_api:
                    self._vanished(run)
            return
        if kind in ("BOOKMARK", "ERROR") or not isinstance(obj, dict):
            return
        meta, spec = obj.get("metadata", {}), obj.get("spec", {})
        uid = meta.get("uid", "")
        run = self._pods.get(uid)
        if kind == "DELETED":
            if run is not None:
                self._vanished(run)
            return
        if run is not None:
            run.pod = obj
            if meta.get("deletionTimestamp") and not run.terminating:
                grace = meta.get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = spec.get("terminationGracePeriodSeconds", 30)
                self._begin_termination(run, grace_s=float(grace))
            return
        node = spec.get("nodeName")
        phase = obj.get("status", {}).get("phase")
        if uid in self._finished or (node and node != NODE_NAME) or phase in ("Succeeded", "Failed"):
            return
        if meta.get("deletionTimestamp"):
            if node == NODE_NAME:  # ours from an earlier runner, nothing runs: finish the deletion
                self._delete_for_good(api, meta["namespace"], meta["name"], uid)
            return
        self._admit(api, obj)

    def _vanished(self, run: PodRun) -> None:
        log.info("pod %s vanished: stopping its processes", run.key)
        run.tell_api = False
        if not run.terminating:
            self._begin_termination(run, grace_s=VANISHED_GRACE_S)

    # -- admitting a Pod ----------------------------------------------------------------------

    def _admit(self, api: client.CoreV1Api, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        if not spec.get("nodeName"):
            binding = {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": name, "namespace": namespace, "uid": uid},
                "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME},
            }
            try:
                # The client cannot parse the Status this answers with: take the raw response.
                api.create_namespaced_pod_binding(name, namespace, binding, _preload_content=False)
            except ApiException as error:
                if error.status in (404, 409):  # gone, or bound already (to us or anyone)
                    return
                raise
        folder = self.pods_dir / f"{namespace}_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        volumes = self._volumes(api, pod, folder)
        kubeconfig = None
        if spec.get("automountServiceAccountToken", True):
            kubeconfig = folder / "kubeconfig"
        run = PodRun(
            namespace=namespace,
            name=name,
            uid=uid,
            pod=pod,
            folder=folder,
            volumes=volumes,
            kubeconfig=kubeconfig,
            init_containers=[
                ContainerRun(name=c["name"], spec=c, init=True) for c in spec.get("initContainers") or []
            ],
            containers=[ContainerRun(name=c["name"], spec=c) for c in spec.get("containers") or []],
            start_time=_now(),
        )
        with self._lock:
            self._pods[uid] = run
        log.info("pod %s bound to %s", run.key, NODE_NAME)
        self._tick(api, run)

    def _volumes(self, api: client.CoreV1Api, pod: dict[str, Any], folder: Path) -> Volumes:
        namespace = pod["metadata"]["namespace"]
        folders: dict[str, Path | None] = {}
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            here = folder / "volumes" / name
            if "hostPath" in volume:
                path = volume["hostPath"]["path"]
                host = Path(rewrite_paths(path, self.host_paths))
                if volume["hostPath"].get("type", "") in ("", "Directory", "DirectoryOrCreate"):
                    host.mkdir(parents=True, exist_ok=True)  # as a container runtime would
                folders[name] = host
            elif "emptyDir" in volume:
                here.mkdir(parents=True, exist_ok=True)
                folders[name] = here
            elif "configMap" in volume or "secret" in volume:
                folders[name] = here
                self._fill_key_volume(api, namespace, volume, here)
            else:
                folders[name] = None  # projected token volumes etc.: KUBECONFIG stands in
        return Volumes(folders=folders)

    def _fill_key_volume(
        self, api: client.CoreV1Api, namespace: str, volume: dict[str, Any], here: Path
    ) -> None:
        source = volume.get("configMap") or volume.get("secret") or {}
        is_secret = "secret" in volume
        try:
            if is_secret:
                data = _secret_data(api, namespace, source["secretName"])
            else:
                data = _config_map_data(api, namespace, source["name"])
        except ApiException as error:
            if error.status == 404 and source.get("optional"):
                data = {}
            else:
                raise
        here.mkdir(parents=True, exist_ok=True)
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] in data:
                target = here / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[item["key"]])

    # -- one step for one Pod -------------------------------------------------------------------

    def _tick(self, api: client.CoreV1Api, run: PodRun) -> None:
        now = time.monotonic()
        for container in run.all_runs():
            self._reap(run, container, now)
        if run.terminating:
            self._step_termination(api, run, now)
            return
        pending_init = [c for c in run.init_containers if not (c.done and c.exit_code() == 0)]
        if pending_init:
            first = pending_init[0]
            if not first.running() and not first.done and now >= first.next_start:
                self._start_container(api, run, first)
        else:
            for container in run.containers:
                if not container.running() and not container.done and now >= container.next_start:
                    self._start_container(api, run, container)
        self._report(api, run)
        if self._phase(run) in ("Succeeded", "Failed"):
            # A terminal Pod keeps its object (the Job controller reads it); we are done with it.
            self._forget(run)

    def _reap(self, run: PodRun, container: ContainerRun, now: float) -> None:
        """Notice a process that exited."""
        if container.proc is None or container.proc.alive():
            return
        proc, container.proc = container.proc, None
        assert proc.popen is not None
        _sweep_group(proc.pid)
        log.info("%s/%s exited with %s", run.key, container.name, proc.popen.returncode)
        code = _exit_code(proc.popen.returncode)
        self._exited(run, container, code=code, reason="", now=now, container_id=f"bench://{proc.pid}")

    def _exited(
        self,
        run: PodRun,
        container: ContainerRun,
        *,
        code: int,
        reason: str,
        now: float,
        container_id: str = "",
    ) -> None:
        """Record the end of one run of a container and decide whether it restarts (restartPolicy)."""
        container.last_terminated = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": container.started_at or _now(),
            "finishedAt": _now(),
            "containerID": container_id,
        }
        policy = run.restart_policy
        restarts = policy == "Always" or (policy == "OnFailure" and code != 0)
        if container.init:
            restarts = code != 0 and policy != "Never"
        if run.terminating or not restarts:
            container.done = True
            return
        if now - container.started_mono > BACKOFF_RESET_AFTER_S:
            container.backoff_s = 0.0
        container.backoff_s = min(
            RESTART_BACKOFF_MAX_S, container.backoff_s * 2 if container.backoff_s else RESTART_BACKOFF_S
        )
        container.next_start = now + container.backoff_s
        container.restart_count += 1
        container.waiting_reason = "CrashLoopBackOff"
        container.waiting_message = f"back-off {container.backoff_s:.0f}s restarting failed container"

    def _start_container(self, api: client.CoreV1Api, run: PodRun, container: ContainerRun) -> None:
        try:
            argv, env, cwd = self._process_spec(api, run, container)
        except ContainerConfigError as error:
            # Like a kubelet: the container waits and the start is retried (the Secret may come).
            container.waiting_reason = "CreateContainerConfigError"
            container.waiting_message = str(error)
            container.next_start = time.monotonic() + 2.0
            log.warning("%s/%s cannot start yet: %s", run.key, container.name, error)
            return
        name = f"{run.namespace}_{run.name}_{container.name}"
        log_path = self.log_dir / f"{name}.log"
        container.started_at = _now()
        container.started_mono = time.monotonic()
        try:
            argv[0] = resolve_executable(argv[0], python=self.python)
            with open(log_path, "ab") as out:
                popen = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,  # its own process group, swept when it exits
                )
        except OSError as error:
            # runc's StartError: exit code 128, then restartPolicy decides like for any exit.
            with open(log_path, "a") as out:
                out.write(f"podrunner: cannot start {argv!r}: {error}\n")
            log.warning("%s/%s cannot start: %s", run.key, container.name, error)
            self._exited(run, container, code=128, reason="StartError", now=time.monotonic())
            return
        (self.pid_dir / f"{name}.pid").write_text(str(popen.pid))
        container.proc = procs.Proc(name=name, pid=popen.pid, log=log_path, popen=popen)
        container.waiting_reason = ""
        container.waiting_message = ""
        log.info("%s/%s started: pid %d: %s", run.key, container.name, popen.pid, " ".join(argv))

    def _process_spec(
        self, api: client.CoreV1Api, run: PodRun, container: ContainerRun
    ) -> tuple[list[str], dict[str, str], str]:
        spec = container.spec
        mounts = run.volumes.mounts(spec)
        try:
            pod_env = self._container_env(api, run, spec)
            kubeconfig = self._write_kubeconfig(api, run)
        except (ApiException, KeyError, OSError) as error:
            raise ContainerConfigError(f"{type(error).__name__}: {error}".splitlines()[0]) from None
        pod_env = {key: rewrite_paths(value, mounts) for key, value in pod_env.items()}
        words = (spec.get("command") or []) + (spec.get("args") or [])
        argv = [rewrite_paths(expand(word, pod_env), mounts) for word in words]
        if not argv:
            raise ContainerConfigError("no command and no args: the image's entry point is unknown")
        cwd = rewrite_paths(spec["workingDir"], mounts) if spec.get("workingDir") else str(run.folder)
        if not Path(cwd).is_dir():
            raise ContainerConfigError(f"workingDir {cwd} does not exist on the host")
        env = {key: os.environ[key] for key in INHERITED_ENV if key in os.environ}
        env["PATH"] = os.pathsep.join([str(Path(self.python).parent), env.get("PATH", os.defpath)])
        env["HOSTNAME"] = run.name
        env["PYTHONUNBUFFERED"] = "1"  # the image sets it, so `kubectl logs` is live
        env.update(self.extra_env)
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        env.update(pod_env)
        return argv, env, cwd

    def _container_env(
        self, api: client.CoreV1Api, run: PodRun, spec: dict[str, Any]
    ) -> dict[str, str]:
        """envFrom first, then env in order, each value able to refer to the ones before it."""
        namespace = run.namespace
        env: dict[str, str] = {}
        for source in spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref, read = source["configMapRef"], _config_map_data
            elif "secretRef" in source:
                ref, read = source["secretRef"], _secret_data
            else:
                continue
            try:
                data = read(api, namespace, ref["name"])
            except ApiException as error:
                if error.status == 404 and ref.get("optional"):
                    continue
                raise ContainerConfigError(f"envFrom {ref['name']}: {error.reason}") from None
            env.update({prefix + key: value for key, value in data.items()})
        for var in spec.get("env") or []:
            source = var.get("valueFrom")
            if source is None:
                env[var["name"]] = expand(var.get("value", ""), env)
                continue
            value = self._value_from(api, run, source)
            if value is not None:
                env[var["name"]] = value
        return env

    def _value_from(self, api: client.CoreV1Api, run: PodRun, source: dict[str, Any]) -> str | None:
        if "fieldRef" in source:
            return field_value(run.pod, source["fieldRef"]["fieldPath"])
        for kind, read in (("secretKeyRef", _secret_data), ("configMapKeyRef", _config_map_data)):
            if kind in source:
                ref = source[kind]
                try:
                    data = read(api, run.namespace, ref["name"])
                except ApiException as error:
                    if error.status == 404 and ref.get("optional"):
                        return None
                    raise ContainerConfigError(f"{kind} {ref['name']}: {error.reason}") from None
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise ContainerConfigError(f"{kind} {ref['name']} has no key {ref['key']!r}")
                return data[ref["key"]]
        if "resourceFieldRef" in source:
            return "0"  # no limits on the bench
        raise ContainerConfigError(f"unsupported valueFrom {sorted(source)}")

    def _write_kubeconfig(self, api: client.CoreV1Api, run: PodRun) -> Path | None:
        """The Pod's ServiceAccount token (bound to the Pod, as a kubelet's projected token is)."""
        if run.kubeconfig is None or run.kubeconfig.exists():
            return run.kubeconfig
        account = run.pod["spec"].get("serviceAccountName") or "default"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [],  # empty: the apiserver's own audience
                "expirationSeconds": TOKEN_SECONDS,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": run.name, "uid": run.uid},
            },
        }
        answer = api.create_namespaced_service_account_token(
            account, run.namespace, request, _preload_content=False
        )
        token = json.loads(answer.data)["status"]["token"]
        return write_token_kubeconfig(
            run.kubeconfig,
            admin_kubeconfig=self.kubeconfig,
            user=f"system:serviceaccount:{run.namespace}:{account}",
            token=token,
        )

    # -- status -------------------------------------------------------------------------------

    def _phase(self, run: PodRun) -> str:
        if any(c.done and c.exit_code() != 0 for c in run.init_containers):
            return "Failed"
        if any(not (c.done and c.exit_code() == 0) for c in run.init_containers):
            return "Pending"
        if run.containers and all(c.done for c in run.containers):
            return "Succeeded" if all(c.exit_code() == 0 for c in run.containers) else "Failed"
        if any(c.running() or c.last_terminated for c in run.containers):
            return "Running"
        return "Pending"

    def _container_status(self, run: PodRun, container: ContainerRun) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": container.name,
            "image": container.spec.get("image", ""),
            "imageID": "",
            "restartCount": container.restart_count,
            "ready": container.running() and not run.terminating,
            "started": container.running(),
        }
        if container.running():
            assert container.proc is not None
            status["state"] = {"running": {"startedAt": container.started_at}}
            status["containerID"] = f"bench://{container.proc.pid}"
        elif container.done and container.last_terminated is not None:
            status["state"] = {"terminated": container.last_terminated}
            status["containerID"] = container.last_terminated["containerID"]
        else:
            waiting = {"reason": container.waiting_reason or "ContainerCreating"}
            if container.waiting_message:
                waiting["message"] = container.waiting_message
            status["state"] = {"waiting": waiting}
        if container.last_terminated is not None and not container.done:
            status["lastState"] = {"terminated": container.last_terminated}
        return status

    def _condition(self, run: PodRun, kind: str, value: bool) -> dict[str, Any]:
        text = "True" if value else "False"
        before = run.transitions.get(kind)
        if before is None or before[0] != text:
            run.transitions[kind] = (text, _now())
        return {"type": kind, "status": text, "lastTransitionTime": run.transitions[kind][1]}

    def _status(self, run: PodRun) -> dict[str, Any]:
        phase = self._phase(run)
        initialized = all(c.done and c.exit_code() == 0 for c in run.init_containers)
        ready = phase == "Running" and all(c.running() for c in run.containers) and not run.terminating
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": run.start_time,
            "conditions": [
                self._condition(run, "PodScheduled", True),
                self._condition(run, "Initialized", initialized),
                self._condition(run, "ContainersReady", ready),
                self._condition(run, "Ready", ready),
            ],
            "containerStatuses": [self._container_status(run, c) for c in run.containers],
        }
        if run.init_containers:
            status["initContainerStatuses"] = [
                self._container_status(run, c) for c in run.init_containers
            ]
        return status

    def _report(self, api: client.CoreV1Api, run: PodRun) -> None:
        """Patch pods/status when it changed since the last report."""
        if not run.tell_api:
            return
        status = self._status(run)
        if status == run.last_status:
            return
        try:
            api.patch_namespaced_pod_status(
                run.name, run.namespace, {"status": status}, _content_type=STRATEGIC
            )
        except ApiException as error:
            if error.status == 404:
                run.tell_api = False
                return
            raise
        run.last_status = status

    # -- termination --------------------------------------------------------------------------

    def _begin_termination(self, run: PodRun, *, grace_s: float) -> None:
        log.info("pod %s terminating (grace %.0fs)", run.key, grace_s)
        run.terminating = True
        run.kill_at = time.monotonic() + grace_s
        for container in run.all_runs():
            if container.running():
                assert container.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(container.proc.pid, signal.SIGTERM)
            elif not container.done:
                container.done = True  # a pending restart or first start never happens

    def _step_termination(self, api: client.CoreV1Api, run: PodRun, now: float) -> None:
        alive = [c for c in run.all_runs() if c.running()]
        if alive and now >= run.kill_at:
            for container in alive:
                assert container.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(container.proc.pid, signal.SIGKILL)
        if alive:
            return
        if run.tell_api:
            self._report(api, run)
            self._delete_for_good(api, run.namespace, run.name, run.uid)
        self._forget(run)

    def _delete_for_good(self, api: client.CoreV1Api, namespace: str, name: str, uid: str) -> None:
        """The kubelet's last word on a deleted Pod: its processes are gone, remove the object."""
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            api.delete_namespaced_pod(name, namespace, body=body, grace_period_seconds=0)
        except ApiException as error:
            if error.status not in (404, 409):
                raise
        self._finished.add(uid)

    def _forget(self, run: PodRun) -> None:
        with self._lock:
            self._pods.pop(run.uid, None)
        self._finished.add(run.uid)
        for container in run.all_runs():
            (self.pid_dir / f"{run.namespace}_{run.name}_{container.name}.pid").unlink(missing_ok=True)
        shutil.rmtree(run.folder, ignore_errors=True)  # emptyDirs and the token go with the Pod

    def _terminate_everything(self) -> None:
        """stop(): SIGTERM every process we started, wait, SIGKILL what is left; by PID only."""
        runs = list(self._pods.values())
        running = [(run, c) for run in runs for c in run.all_runs() if c.running()]
        for _, container in running:
            assert container.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(container.proc.pid, signal.SIGTERM)
        grace = max(
            [float(run.pod["spec"].get("terminationGracePeriodSeconds", 30)) for run in runs] or [0]
        )
        deadline = time.monotonic() + min(grace, STOP_GRACE_MAX_S)
        for _, container in running:
            assert container.proc is not None
            procs.stop_pid(
                container.proc.pid,
                timeout=max(0.0, deadline - time.monotonic()),
                popen=container.proc.popen,
            )
            _sweep_group(container.proc.pid)
        for run in runs:
            self._forget(run)


def _sweep_group(pid: int) -> None:
    """Kill what a container's process left behind in its own group, as a cgroup teardown would.

    The group was created by us (start_new_session), its id is the PID we started, and a group id
    is not reused while any member lives, so this reaches nothing but that container's children.
    """
    if pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _config_map_data(api: client.CoreV1Api, namespace: str, name: str) -> dict[str, str]:
    return dict(api.read_namespaced_config_map(name, namespace).data or {})


def _secret_data(api: client.CoreV1Api, namespace: str, name: str) -> dict[str, str]:
    data = api.read_namespaced_secret(name, namespace).data or {}
    return {key: base64.b64decode(value).decode() for key, value in data.items()}


def write_token_kubeconfig(path: Path, *, admin_kubeconfig: Path, user: str, token: str) -> Path:
    """A kubeconfig for the same cluster as admin_kubeconfig that authenticates with token.

    ControlPlane.service_account_kubeconfig does the same from a ControlPlane object; the runner
    only has a kubeconfig (also as a CLI), so it asks TokenRequest itself and copies the cluster.
    """
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    context_name = admin.get("current-context")
    context = next(c["context"] for c in admin["contexts"] if c["name"] == context_name)
    cluster = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "pod", "context": {"cluster": cluster["name"], "user": user}}],
        "current-context": "pod",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(yaml.safe_dump(kubeconfig, sort_keys=False))
    partial.chmod(0o600)
    partial.rename(path)  # never a half-written file for a starting process
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tilehopper_bench.podrunner",
        description="Run the Pods the bench's controllers create as local processes, until SIGTERM.",
    )
    parser.add_argument("--kubeconfig", type=Path, default=os.environ.get("KUBECONFIG"), required=False)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--namespace", default=None, help="only this namespace (default: all)")
    parser.add_argument("--selector", default=DEFAULT_SELECTOR, help="label selector of the Pods to run")
    args = parser.parse_args(argv)
    if args.kubeconfig is None:
        parser.error("--kubeconfig is required (or KUBECONFIG)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s podrunner %(message)s")
    done = threading.Event()
    handler: Callable[[int, Any], None] = lambda *_: done.set()  # noqa: E731
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    runner = PodRunner(
        args.kubeconfig, args.workdir, namespace=args.namespace, label_selector=args.selector
    )
    runner.start()
    try:
        done.wait()
    finally:
        runner.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
