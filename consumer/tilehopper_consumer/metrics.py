"""The consumer's Prometheus metrics (served by prometheus-client when a port is configured)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TILES_DONE = Counter("tilehopper_tiles_done_total", "Tiles downloaded and saved")
TILES_SKIPPED = Counter("tilehopper_tiles_skipped_total", "Tiles acked at once because they were on disk")
TILES_FAILED = Counter("tilehopper_tiles_failed_total", "Tiles dead-lettered after retries or rejected", ["reason"])
TILES_MISSING = Counter("tilehopper_tiles_missing_total", "Tiles the server does not have (404)")
MALFORMED = Counter("tilehopper_messages_malformed_total", "Queue messages that were not tiles")
RETRIES = Counter("tilehopper_retries_total", "Download attempts that will be retried", ["reason"])
BANS = Counter("tilehopper_bans_total", "Ban answers seen (each requeues its tile)")
BYTES = Counter("tilehopper_bytes_total", "Bytes of tiles saved")
LATENCY = Histogram(
    "tilehopper_download_seconds",
    "Time from sending a request through the proxy to having the whole answer",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
GENERATION = Gauge("tilehopper_proxy_generation", "The proxy generation this consumer uses")
PAUSED = Gauge("tilehopper_paused", "1 while the consumer waits for a usable proxy")
IN_FLIGHT = Gauge("tilehopper_in_flight", "Tiles taken from the queue and not yet settled")


def failure_label(reason: str) -> str:
    """A low-cardinality label from a free-text reason ("503 from server" -> "503")."""
    head = reason.split(" ", 1)[0].rstrip(":")
    return head if head.isdigit() or head.isalpha() else "other"
