"""Where the consumer learns which proxy to use, and where it reports a ban.

One small interface, three sources:
- KubernetesProxySource: the operator's ConfigMap <job>-proxy, watched through the API (a switch
  reaches the consumer as soon as the watch event does), credentials from the Secret
  <job>-proxy-credentials, bans merge-patched into the ConfigMap <job>-bans (contracts.ban_patch);
- FileProxySource: a JSON file with the ConfigMap's data plus username/password, re-read when it
  changes; bans go to <file>.bans. Local runs and the tests drive rotations through it;
- StaticProxySource: one fixed proxy URL with credentials; a ban there pauses for good.

A source calls on_change(view) from its own thread with every new announcement; the consumer
moves it onto its event loop. A ProxyView never shows its password in repr or logs.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from tilehopper.contracts import (
    SECRET_PASSWORD,
    SECRET_USERNAME,
    ProxyAnnouncement,
    ProxyState,
    ban_configmap_name,
    ban_key,
    ban_patch,
    proxy_configmap_name,
    proxy_secret_name,
)

log = logging.getLogger(__name__)

OnChange = Callable[["ProxyView"], None]


@dataclass(frozen=True)
class ProxyView:
    """The proxy to use right now, with its credentials."""

    url: str  # http://host:port, never with credentials
    generation: int
    state: str
    ban_status_codes: frozenset[int] | None = None  # None: use the consumer's configured codes
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)

    @property
    def usable(self) -> bool:
        return self.state == ProxyState.ACTIVE and bool(self.host)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80

    @property
    def authorization(self) -> str | None:
        if not self.username:
            return None
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"

    @classmethod
    def from_announcement(cls, ann: ProxyAnnouncement, *, username: str, password: str,
                          codes_given: bool) -> ProxyView:
        return cls(url=ann.url, generation=ann.generation, state=ann.state,
                   ban_status_codes=ann.ban_status_codes if codes_given else None,
                   username=username, password=password)

    @classmethod
    def from_data(cls, data: dict[str, Any], *, username: str = "", password: str = "") -> ProxyView:
        strings = {k: str(v) for k, v in data.items()}
        ann = ProxyAnnouncement.from_data(strings)
        return cls.from_announcement(ann, username=username, password=password,
                                     codes_given="banStatusCodes" in strings)


PAUSED = ProxyView(url="", generation=0, state=ProxyState.PAUSED)


class ProxySource(ABC):
    @abstractmethod
    def start(self, on_change: OnChange) -> None:
        """Begin watching; on_change gets the first view as soon as it is known."""

    @abstractmethod
    def report_ban(self, *, generation: int, status: int, reporter: str) -> None:
        """Say "generation G got a ban"; blocking (the consumer calls it off its event loop)."""

    def stop(self) -> None:
        pass


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class StaticProxySource(ProxySource):
    """TILEHOPPER_PROXY_URL=http://user:pass@host:port; a ban cannot rotate it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("TILEHOPPER_PROXY_URL must be http://user:pass@host:port")
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.view = ProxyView(url=f"http://{host}", generation=1, state=ProxyState.ACTIVE,
                              username=unquote(parts.username or ""), password=unquote(parts.password or ""))

    def start(self, on_change: OnChange) -> None:
        on_change(self.view)

    def report_ban(self, *, generation: int, status: int, reporter: str) -> None:
        log.error("proxy %s got %d; a fixed proxy cannot rotate: pausing for good", self.view.url, status)


class FileProxySource(ProxySource):
    """A JSON file {url, generation, state, banStatusCodes?, username, password}, polled."""

    def __init__(self, path: str | Path, *, poll_s: float = 0.1) -> None:
        self.path = Path(path)
        self.bans_path = Path(f"{self.path}.bans")
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: tuple[int, int, int] | None = None

    def read(self) -> ProxyView:
        doc = json.loads(self.path.read_text())
        username = str(doc.pop("username", ""))
        password = str(doc.pop("password", ""))
        return ProxyView.from_data(doc, username=username, password=password)

    def start(self, on_change: OnChange) -> None:
        self._thread = threading.Thread(target=self._watch, args=(on_change,), name="proxy-file", daemon=True)
        self._thread.start()

    def _watch(self, on_change: OnChange) -> None:
        while not self._stop.is_set():
            try:
                st = os.stat(self.path)
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
                if key != self._seen:
                    view = self.read()
                    self._seen = key
                    on_change(view)
            except (OSError, ValueError) as exc:
                # A half-written file or none yet: keep the last view, look again shortly.
                log.debug("proxy file not readable yet: %s", exc)
            self._stop.wait(self.poll_s)

    def report_ban(self, *, generation: int, status: int, reporter: str) -> None:
        with open(self.bans_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # several consumer processes share the file
            handle.seek(0)
            text = handle.read()
            data = json.loads(text) if text.strip() else {}
            data.update(ban_patch(generation, reporter, status, _now())["data"])
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(data))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


class KubernetesProxySource(ProxySource):
    """The operator's ConfigMap, watched; the Secret read at every new generation."""

    def __init__(self, *, namespace: str, job: str) -> None:
        from kubernetes import client, config  # only this source needs the client

        try:
            config.load_incluster_config()
        except config.ConfigException:
            # Runs outside a pod. The client reads KUBECONFIG once, at import: read it now.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        self._api = client.CoreV1Api()
        self.namespace = namespace
        self.job = job
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._credentials: tuple[str, str] = ("", "")
        self._credentials_generation = -1
        self._watch: Any = None

    def _read_credentials(self, generation: int) -> tuple[str, str]:
        if generation != self._credentials_generation:
            secret = self._api.read_namespaced_secret(proxy_secret_name(self.job), self.namespace)
            data = secret.data or {}
            self._credentials = (
                base64.b64decode(data.get(SECRET_USERNAME, "")).decode(),
                base64.b64decode(data.get(SECRET_PASSWORD, "")).decode(),
            )
            self._credentials_generation = generation
        return self._credentials

    def _view(self, data: dict[str, str] | None) -> ProxyView:
        ann = ProxyAnnouncement.from_data(data)
        username, password = self._read_credentials(ann.generation) if ann.usable else ("", "")
        return ProxyView.from_announcement(ann, username=username, password=password,
                                           codes_given="banStatusCodes" in (data or {}))

    def start(self, on_change: OnChange) -> None:
        self._thread = threading.Thread(target=self._run, args=(on_change,), name="proxy-watch", daemon=True)
        self._thread.start()

    def _run(self, on_change: OnChange) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        name = proxy_configmap_name(self.job)
        while not self._stop.is_set():
            try:
                # List first (the current state, and a resourceVersion), then watch from there.
                listing = self._api.list_namespaced_config_map(self.namespace, field_selector=f"metadata.name={name}")
                items = listing.items or []
                on_change(self._view(items[0].data) if items else PAUSED)
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    self._api.list_namespaced_config_map, self.namespace,
                    field_selector=f"metadata.name={name}",
                    resource_version=listing.metadata.resource_version, timeout_seconds=300,
                ):
                    if self._stop.is_set():
                        break
                    obj = event["object"]
                    on_change(PAUSED if event["type"] == "DELETED" else self._view(obj.data))
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: our resourceVersion is too old; list again
                    log.warning("watching ConfigMap %s/%s failed (%s); retrying", self.namespace, name, exc.status)
                    self._stop.wait(1.0)
            except Exception as exc:  # noqa: BLE001 - a watch must outlive any API hiccup
                log.warning("watching ConfigMap %s/%s failed: %s; retrying", self.namespace, name, exc)
                self._stop.wait(1.0)

    def report_ban(self, *, generation: int, status: int, reporter: str) -> None:
        from kubernetes.client.exceptions import ApiException

        body = ban_patch(generation, reporter, status, _now())
        name = ban_configmap_name(self.job)
        try:
            self._api.patch_namespaced_config_map(name, self.namespace, body,
                                                  _content_type="application/merge-patch+json")
        except ApiException as exc:
            if exc.status != 404:
                raise
            # The operator has not created it (yet): create it with our one key.
            from kubernetes import client

            with contextlib.suppress(ApiException):
                self._api.create_namespaced_config_map(
                    self.namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data=body["data"]))
        log.info("reported ban %s (%d) to ConfigMap %s", ban_key(generation), status, name)

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()


def source_from_config(*, namespace: str, job: str, proxy_url: str, proxy_file: str) -> ProxySource:
    if namespace and job:
        return KubernetesProxySource(namespace=namespace, job=job)
    if proxy_file:
        return FileProxySource(proxy_file)
    return StaticProxySource(proxy_url)
