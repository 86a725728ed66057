"""The consumer's configuration: one typed object read from the environment.

Every field is documented where it is declared; `ConsumerConfig.from_env()` reads it. Field
`proxy_url` and friends choose the proxy source (see tilehopper_consumer.proxy): the operator's
ConfigMap (namespace + job), a fixed URL, or a JSON file, in that order of preference.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tilehopper.amqp import check_queue_name
from tilehopper.contracts import DEFAULT_URL_TEMPLATE, queue_name


class ConfigError(ValueError):
    pass


def _codes(text: str) -> frozenset[int]:
    try:
        return frozenset(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise ConfigError(f"TILEHOPPER_BAN_STATUS_CODES must be comma-separated integers, got {text!r}") from None


@dataclass(frozen=True)
class ConsumerConfig:
    # AMQP_URL: the broker, amqp://user:pass@host:port/vhost (never logged with its password).
    amqp_url: str
    # TILEHOPPER_QUEUE: the job queue; default tilehopper.<namespace>.<job> when both are set.
    queue: str
    # TILEHOPPER_TILES_DIR: where tiles are saved as <x>_<y>_<zoom>.png (default ./tiles).
    tiles_dir: Path = Path("tiles")
    # TILEHOPPER_THREADS: downloads in flight at once in this process (the TileJob's
    # consumers.threads). Downloads run on one event loop, so this costs sockets, not threads.
    threads: int = 64
    # TILEHOPPER_PREFETCH: unacknowledged messages the broker hands this process (default 2 x threads,
    # so the next tile is already here when a download ends).
    prefetch: int = 0
    # TILEHOPPER_URL_TEMPLATE: the tile source, with {x}, {y}, {z} (or {zoom}).
    url_template: str = DEFAULT_URL_TEMPLATE
    # TILEHOPPER_NAMESPACE and TILEHOPPER_JOB: watch the operator's ConfigMap <job>-proxy there.
    namespace: str = ""
    job: str = ""
    # TILEHOPPER_PROXY_URL: a fixed proxy for local runs, http://user:pass@host:port.
    proxy_url: str = ""
    # TILEHOPPER_PROXY_FILE: a JSON file holding the ConfigMap's data plus username/password;
    # re-read whenever it changes. Ban reports go to <file>.bans (JSON object, same keys as the
    # ban ConfigMap).
    proxy_file: str = ""
    # TILEHOPPER_REPORTER: the name this consumer signs ban reports with (default:
    # TILEHOPPER_POD_NAME, which the operator's Deployment sets, else the host name).
    reporter: str = field(default_factory=lambda: os.uname().nodename)
    # TILEHOPPER_METRICS_PORT: Prometheus metrics on this port; 0 turns them off.
    metrics_port: int = 0
    # TILEHOPPER_METRICS_ADDR: the address the metrics listen on.
    metrics_addr: str = "0.0.0.0"
    # TILEHOPPER_MAX_RETRIES: attempts after the first for timeouts, 5xx, connection errors and
    # truncated or non-image answers, before the tile is dead-lettered with the reason.
    max_retries: int = 4
    # TILEHOPPER_RETRY_BASE_S: the first backoff; each retry doubles it, with full jitter.
    retry_base_s: float = 0.5
    # TILEHOPPER_RETRY_MAX_S: the longest backoff.
    retry_max_s: float = 10.0
    # TILEHOPPER_TIMEOUT_S: a whole request (connect, send, answer) through the proxy.
    timeout_s: float = 20.0
    # TILEHOPPER_BAN_STATUS_CODES: codes that mean "this proxy is banned" (comma-separated);
    # the ConfigMap's banStatusCodes, when present, win.
    ban_status_codes: frozenset[int] = frozenset({403})
    # TILEHOPPER_FSYNC: fsync a tile before renaming it into place (1) or trust the page cache (0).
    # docs/benchmarks.md has the cost; the default keeps a tile through a power cut.
    fsync: bool = True
    # TILEHOPPER_EXIT_WHEN_IDLE_S: exit 0 once the queue gave nothing for this long (0: never);
    # for benchmarks and one-off local runs, not for the Deployment.
    exit_when_idle_s: float = 0.0
    # TILEHOPPER_DRAIN_S: on SIGTERM, how long in-flight downloads may finish before they are
    # handed back to the queue.
    drain_s: float = 10.0
    # TILEHOPPER_LOG_LEVEL: DEBUG, INFO, WARNING.
    log_level: str = "INFO"

    @property
    def effective_prefetch(self) -> int:
        return self.prefetch or 2 * self.threads

    def __repr__(self) -> str:  # never print credentials
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("amqp_url", "proxy_url")}
        return f"ConsumerConfig({shown}, amqp_url=***, proxy_url={'***' if self.proxy_url else ''})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ConsumerConfig:
        env = dict(os.environ if environ is None else environ)

        def get(name: str, default: str = "") -> str:
            return env.get(name, "").strip() or default

        def number(name: str, kind: type, default: Any) -> Any:
            text = get(name)
            if not text:
                return default
            try:
                value = kind(text)
            except ValueError:
                raise ConfigError(f"{name} must be a {kind.__name__}, got {text!r}") from None
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {text!r}")
            return value

        namespace, job = get("TILEHOPPER_NAMESPACE"), get("TILEHOPPER_JOB")
        queue = get("TILEHOPPER_QUEUE") or (queue_name(namespace, job) if namespace and job else "")
        values: dict[str, Any] = dict(
            amqp_url=get("AMQP_URL") or get("TILEHOPPER_AMQP_URL"),
            queue=queue,
            tiles_dir=Path(get("TILEHOPPER_TILES_DIR", "tiles")),
            threads=number("TILEHOPPER_THREADS", int, 64),
            prefetch=number("TILEHOPPER_PREFETCH", int, 0),
            url_template=get("TILEHOPPER_URL_TEMPLATE", DEFAULT_URL_TEMPLATE),
            namespace=namespace,
            job=job,
            proxy_url=get("TILEHOPPER_PROXY_URL"),
            proxy_file=get("TILEHOPPER_PROXY_FILE"),
            reporter=get("TILEHOPPER_REPORTER") or get("TILEHOPPER_POD_NAME", os.uname().nodename),
            metrics_port=number("TILEHOPPER_METRICS_PORT", int, 0),
            metrics_addr=get("TILEHOPPER_METRICS_ADDR", "0.0.0.0"),
            max_retries=number("TILEHOPPER_MAX_RETRIES", int, 4),
            retry_base_s=number("TILEHOPPER_RETRY_BASE_S", float, 0.5),
            retry_max_s=number("TILEHOPPER_RETRY_MAX_S", float, 10.0),
            timeout_s=number("TILEHOPPER_TIMEOUT_S", float, 20.0),
            ban_status_codes=_codes(get("TILEHOPPER_BAN_STATUS_CODES", "403")),
            fsync=get("TILEHOPPER_FSYNC", "1") not in ("0", "false", "no"),
            exit_when_idle_s=number("TILEHOPPER_EXIT_WHEN_IDLE_S", float, 0.0),
            drain_s=number("TILEHOPPER_DRAIN_S", float, 10.0),
            log_level=get("TILEHOPPER_LOG_LEVEL", "INFO").upper(),
        )
        values.update(overrides)
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        if not self.amqp_url:
            raise ConfigError("AMQP_URL is required")
        if not self.queue:
            raise ConfigError("TILEHOPPER_QUEUE (or TILEHOPPER_NAMESPACE + TILEHOPPER_JOB) is required")
        try:
            check_queue_name(self.queue)
        except ValueError as exc:
            raise ConfigError(f"TILEHOPPER_QUEUE: {exc}") from None
        if self.threads < 1:
            raise ConfigError("TILEHOPPER_THREADS must be >= 1")
        if not any(k in self.url_template for k in ("{x}",)) or "{y}" not in self.url_template:
            raise ConfigError("TILEHOPPER_URL_TEMPLATE must contain {x}, {y} and {z}")
        if not self.url_template.startswith("http://"):
            raise ConfigError("TILEHOPPER_URL_TEMPLATE must be a plain http:// URL (https is not supported yet)")
        sources = [s for s in (self.namespace and self.job, self.proxy_url, self.proxy_file) if s]
        if not sources:
            raise ConfigError(
                "no proxy source: set TILEHOPPER_NAMESPACE + TILEHOPPER_JOB, TILEHOPPER_PROXY_URL or "
                "TILEHOPPER_PROXY_FILE (the consumer never downloads without a proxy)"
            )
