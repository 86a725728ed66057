"""tilehopper-consumer: download the tiles of a job's queue through its active proxy.

Configuration comes from the environment (tilehopper_consumer.config documents every field).
On exit the last line on stdout is one JSON object with what this process did (done, skipped,
dead_lettered, bans, seconds, cpu_s, ...): benchmarks read it. Exit codes: 0 after a clean stop
(SIGTERM, SIGINT, or idle with TILEHOPPER_EXIT_WHEN_IDLE_S), 2 for a bad configuration.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

from tilehopper_consumer.config import ConfigError, ConsumerConfig
from tilehopper_consumer.proxy import ProxySource, source_from_config
from tilehopper_consumer.service import Consumer, RunSummary


def run_consumer(config: ConsumerConfig, source: ProxySource | None = None) -> RunSummary:
    """Run one consumer until it is stopped (or idle, if configured): the benchmark's entry point."""
    if source is None:
        source = source_from_config(namespace=config.namespace, job=config.job,
                                    proxy_url=config.proxy_url, proxy_file=config.proxy_file)
    if config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port, addr=config.metrics_addr)
    return Consumer(config, source).run()


def main(environ: Mapping[str, str] | None = None) -> int:
    try:
        config = ConsumerConfig.from_env(environ)
    except ConfigError as exc:
        print(f"tilehopper-consumer: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    try:
        summary = run_consumer(config)
    except ValueError as exc:  # a proxy source that cannot be set up (bad URL, no kubeconfig)
        print(f"tilehopper-consumer: {exc}", file=sys.stderr)
        return 2
    print(summary.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
