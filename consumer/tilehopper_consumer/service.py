"""The consumer: queue -> download through the active proxy -> tiles/ -> ack.

Everything runs on one asyncio event loop: pika's AsyncioConnection, the downloads (fetch.py) and
the bookkeeping. pika is not thread-safe; here only the loop's thread ever touches the channel.
Proxy sources and file writes live in threads and hand their results back to the loop
(call_soon_threadsafe / run_in_executor), never to pika directly.

Per message:
- not a tile -> dead-letter "malformed: ...";
- its file already on disk -> ack at once;
- download through the proxy of the current generation, at most `threads` at once:
  - a good image -> temp file, rename, ack (store.py says how durable);
  - a ban code -> nack(requeue), report "generation G got a ban" once, pause until a newer
    generation arrives; while paused (or the ConfigMap says paused) nothing is fetched, and
    there is never a direct connection;
  - 404 -> dead-letter "404 not found";
  - timeouts, 5xx, connection errors, truncated or non-image answers -> retry with full-jitter
    exponential backoff, up to max_retries, then dead-letter with the last reason.
A dead-letter is a copy in <queue>.dead with the reason header, published with a broker confirm;
the original is acked only once the copy is confirmed, so a dead tile is never simply dropped.

SIGTERM: cancel the consumer (no new messages), let downloads in flight finish for drain_s, hand
back (nack) the rest, close the connection, exit 0.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import random
import resource
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.asyncio_connection import AsyncioConnection

from tilehopper.amqp import PERSISTENT, dead_letter_headers, dead_queue_name, declare_job_queue, redact_url
from tilehopper.contracts import MalformedMessage, Tile, decode_tile
from tilehopper_consumer import metrics
from tilehopper_consumer.config import ConsumerConfig
from tilehopper_consumer.fetch import FetchError, fetch
from tilehopper_consumer.proxy import PAUSED, ProxySource, ProxyView
from tilehopper_consumer.store import TileStore
from tilehopper_consumer.verdict import Kind, Verdict, judge

log = logging.getLogger("tilehopper_consumer")


class _Stopping(Exception):
    """The consumer is shutting down: hand the message back."""


@dataclass
class Delivery:
    channel: pika.channel.Channel
    tag: int
    body: bytes
    properties: pika.spec.BasicProperties
    settled: bool = False


@dataclass
class RunSummary:
    done: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    missing: int = 0
    bans: int = 0
    requeued: int = 0
    retries: int = 0
    bytes: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Consumer:
    def __init__(self, config: ConsumerConfig, source: ProxySource, *, store: TileStore | None = None) -> None:
        self.config = config
        self.source = source
        self.store = store or TileStore(config.tiles_dir, fsync=config.fsync)
        self.summary = RunSummary()
        self._proxy: ProxyView = PAUSED
        self._banned_generation = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proxy_changed: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._connection: AsyncioConnection | None = None
        self._channel: pika.channel.Channel | None = None
        self._consumer_tag: str | None = None
        self._closed: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Dead-letter copies awaiting the broker's confirm: publish sequence -> original delivery.
        self._confirming: collections.OrderedDict[int, Delivery] = collections.OrderedDict()
        self._publish_seq = 0
        self._last_activity = time.monotonic()
        self._disk = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tile-disk")
        self._reports = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ban-report")

    # --- entry points --------------------------------------------------------------------------

    def run(self) -> RunSummary:
        """Blocking: consume until SIGTERM/SIGINT (or idle, when configured); returns the summary."""
        return asyncio.run(self.run_async())

    def request_stop(self) -> None:
        """Thread-safe: begin the graceful shutdown."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def run_async(self, *, handle_signals: bool = True) -> RunSummary:
        started, cpu0 = time.monotonic(), _cpu_seconds()
        loop = self._loop = asyncio.get_running_loop()
        self._proxy_changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.threads)
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
        removed = self.store.sweep_temp()
        if removed:
            log.info("removed %d temp files left by killed consumers", removed)
        self.source.start(lambda view: loop.call_soon_threadsafe(self._set_proxy, view))
        await loop.run_in_executor(None, self._declare_queues)
        idle_watch = asyncio.create_task(self._watch_idle()) if self.config.exit_when_idle_s else None
        try:
            while not self._stop.is_set():
                try:
                    await self._connect()
                except (pika.exceptions.AMQPError, OSError) as exc:
                    log.warning("cannot reach RabbitMQ at %s: %r; retrying", redact_url(self.config.amqp_url), exc)
                    await self._sleep_unless_stopped(2.0)
                    continue
                assert self._closed is not None
                stop_wait = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait([self._closed, stop_wait], return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                if not self._stop.is_set():
                    log.warning("connection to RabbitMQ lost; reconnecting (unacked tiles return to the queue)")
                    await self._sleep_unless_stopped(1.0)
            await self._shutdown()
        finally:
            if idle_watch:
                idle_watch.cancel()
            self.source.stop()
            self._disk.shutdown(wait=True)
            self._reports.shutdown(wait=False)
        self.summary.seconds = round(time.monotonic() - started, 3)
        self.summary.cpu_s = round(_cpu_seconds() - cpu0, 3)
        return self.summary

    # --- broker ----------------------------------------------------------------------------------

    def _declare_queues(self) -> None:
        with pika.BlockingConnection(pika.URLParameters(self.config.amqp_url)) as connection:
            declare_job_queue(connection.channel(), self.config.queue)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        self._closed = loop.create_future()
        closed = self._closed

        def on_open(connection: Any) -> None:
            connection.channel(on_open_callback=on_channel)

        def on_open_error(_connection: Any, error: BaseException) -> None:
            if not opened.done():
                opened.set_exception(pika.exceptions.AMQPConnectionError(repr(error)))

        def on_close(_connection: Any, reason: BaseException) -> None:
            if not opened.done():
                opened.set_exception(pika.exceptions.AMQPConnectionError(repr(reason)))
            if not closed.done():
                closed.set_result(None)
            self._channel = None

        def on_channel(channel: pika.channel.Channel) -> None:
            self._channel = channel
            channel.add_on_close_callback(on_channel_closed)
            channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _f: on_confirm_mode(channel))

        def on_confirm_mode(channel: pika.channel.Channel) -> None:
            self._publish_seq = 0
            self._confirming.clear()
            channel.basic_qos(prefetch_count=self.config.effective_prefetch, callback=lambda _f: on_qos(channel))

        def on_qos(channel: pika.channel.Channel) -> None:
            self._consumer_tag = channel.basic_consume(self.config.queue, self._on_message, auto_ack=False)
            if not opened.done():
                opened.set_result(None)

        def on_channel_closed(_channel: Any, reason: BaseException) -> None:
            self._channel = None
            if not opened.done():
                opened.set_exception(pika.exceptions.AMQPChannelError(repr(reason)))
            if not self._stop or not self._stop.is_set():
                log.warning("channel closed: %r", reason)
            if self._connection is not None and self._connection.is_open:
                self._connection.close()

        self._connection = AsyncioConnection(
            pika.URLParameters(self.config.amqp_url),
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=on_close,
            custom_ioloop=loop,
        )
        await opened
        log.info("consuming %s on %s (threads=%d, prefetch=%d)", self.config.queue,
                 redact_url(self.config.amqp_url), self.config.threads, self.config.effective_prefetch)

    def _on_message(self, channel: pika.channel.Channel, method: pika.spec.Basic.Deliver,
                    properties: pika.spec.BasicProperties, body: bytes) -> None:
        self._last_activity = time.monotonic()
        delivery = Delivery(channel=channel, tag=method.delivery_tag, body=body, properties=properties)
        task = asyncio.ensure_future(self._handle(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _usable_channel(self, delivery: Delivery) -> pika.channel.Channel | None:
        """The delivery's channel if it is still the open one (tags of a dead channel mean nothing)."""
        if delivery.settled:
            return None
        channel = delivery.channel
        if channel is not self._channel or not channel.is_open:
            delivery.settled = True  # the broker has requeued it already
            return None
        return channel

    def _ack(self, delivery: Delivery) -> None:
        channel = self._usable_channel(delivery)
        if channel is not None:
            delivery.settled = True
            channel.basic_ack(delivery.tag)

    def _nack(self, delivery: Delivery) -> None:
        channel = self._usable_channel(delivery)
        if channel is not None:
            delivery.settled = True
            channel.basic_nack(delivery.tag, requeue=True)
            self.summary.requeued += 1

    def _dead_letter(self, delivery: Delivery, reason: str, attempts: int) -> None:
        channel = self._usable_channel(delivery)
        if channel is None:
            return
        log.warning("dead-lettering %r: %s", delivery.body[:100], reason)
        props = delivery.properties
        headers = dead_letter_headers(reason, attempts, props.headers)
        channel.basic_publish(
            exchange="",
            routing_key=dead_queue_name(self.config.queue),
            body=delivery.body,
            properties=pika.BasicProperties(delivery_mode=PERSISTENT, content_type=props.content_type,
                                            headers=headers),
        )
        self._publish_seq += 1
        self._confirming[self._publish_seq] = delivery
        self.summary.dead_lettered += 1
        metrics.TILES_FAILED.labels(metrics.failure_label(reason)).inc()

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        tag = method.delivery_tag
        if method.multiple:
            settled = []
            while self._confirming and next(iter(self._confirming)) <= tag:
                settled.append(self._confirming.popitem(last=False)[1])
        else:
            one = self._confirming.pop(tag, None)
            settled = [one] if one else []
        nacked = isinstance(method, pika.spec.Basic.Nack)
        for delivery in settled:
            # A nacked copy is not in the dead queue: the original goes back to the queue instead.
            self._nack(delivery) if nacked else self._ack(delivery)

    # --- one message -----------------------------------------------------------------------------

    async def _handle(self, delivery: Delivery) -> None:
        metrics.IN_FLIGHT.inc()
        try:
            try:
                tile = decode_tile(delivery.body)
            except MalformedMessage as exc:
                metrics.MALFORMED.inc()
                self._dead_letter(delivery, f"malformed: {exc}", 0)
                return
            if self.store.has(tile):
                metrics.TILES_SKIPPED.inc()
                self.summary.skipped += 1
                self._ack(delivery)
                return
            await self._download(tile, delivery)
        except (_Stopping, asyncio.CancelledError):
            self._nack(delivery)
        except Exception:  # noqa: BLE001 - one bad tile must never stop the consumer
            log.exception("unexpected error on %r; handing it back to the queue", delivery.body[:100])
            self._nack(delivery)
        finally:
            metrics.IN_FLIGHT.dec()
            self._last_activity = time.monotonic()

    def _url(self, tile: Tile) -> str:
        return self.config.url_template.format(x=tile.x, y=tile.y, z=tile.zoom, zoom=tile.zoom)

    async def _download(self, tile: Tile, delivery: Delivery) -> None:
        assert self._slots is not None and self._loop is not None
        url = self._url(tile)
        attempt = 0
        while True:
            await self._usable_proxy()
            async with self._slots:
                if self._stop is not None and self._stop.is_set():
                    raise _Stopping
                if not self._proxy_ready():
                    continue  # banned or paused while we waited for a slot
                proxy = self._proxy
                codes = proxy.ban_status_codes or self.config.ban_status_codes
                started = time.monotonic()
                try:
                    answer = await fetch(url, proxy, timeout=self.config.timeout_s)
                except FetchError as exc:
                    verdict = Verdict(Kind.RETRY, exc.reason)
                else:
                    metrics.LATENCY.observe(time.monotonic() - started)
                    verdict = judge(answer, codes)
                    if verdict.kind is Kind.OK:
                        if self.store.fsync:
                            await self._loop.run_in_executor(self._disk, self.store.save, tile, answer.body)
                        else:
                            self.store.save(tile, answer.body)  # ~0.1 ms: cheaper than a thread hop
                        self._ack(delivery)
                        metrics.TILES_DONE.inc()
                        metrics.BYTES.inc(len(answer.body))
                        self.summary.done += 1
                        self.summary.bytes += len(answer.body)
                        return
            attempt += 1
            if verdict.kind is Kind.BAN:
                self._on_ban(proxy, answer.status)
                self._nack(delivery)
                return
            if verdict.kind is Kind.MISSING:
                metrics.TILES_MISSING.inc()
                self.summary.missing += 1
                self._dead_letter(delivery, verdict.reason, attempt)
                return
            if verdict.kind is Kind.REJECT or attempt > self.config.max_retries:
                self._dead_letter(delivery, f"{verdict.reason} (after {attempt} attempts)", attempt)
                return
            metrics.RETRIES.labels(metrics.failure_label(verdict.reason)).inc()
            self.summary.retries += 1
            backoff = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** (attempt - 1))
            await self._sleep_unless_stopped(random.uniform(0, backoff), raise_on_stop=True)

    # --- proxy -----------------------------------------------------------------------------------

    def _set_proxy(self, view: ProxyView) -> None:
        old = self._proxy
        self._proxy = view
        if (view.generation, view.state, view.url) != (old.generation, old.state, old.url):
            log.info("proxy generation %d: %s %s", view.generation, view.state, view.url or "-")
        metrics.GENERATION.set(view.generation)
        assert self._proxy_changed is not None
        self._proxy_changed.set()

    def _proxy_ready(self) -> bool:
        return self._proxy.usable and self._proxy.generation > self._banned_generation

    async def _usable_proxy(self) -> ProxyView:
        """The proxy to fetch through; waits (never goes direct) while there is none."""
        assert self._proxy_changed is not None and self._stop is not None
        if not self._proxy_ready():
            metrics.PAUSED.set(1)
            while not self._proxy_ready():
                if self._stop.is_set():
                    raise _Stopping
                self._proxy_changed.clear()
                changed = asyncio.ensure_future(self._proxy_changed.wait())
                stopping = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait([changed, stopping], return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                stopping.cancel()
            metrics.PAUSED.set(0)
        return self._proxy

    def _on_ban(self, proxy: ProxyView, status: int) -> None:
        metrics.BANS.inc()
        self.summary.bans += 1
        if proxy.generation <= self._banned_generation:
            return  # already reported; this was another request in flight on the same proxy
        self._banned_generation = proxy.generation
        log.warning("proxy generation %d banned (%d): pausing until a newer generation", proxy.generation, status)
        assert self._loop is not None
        report = functools.partial(self.source.report_ban, generation=proxy.generation, status=status,
                                   reporter=self.config.reporter)
        future = self._loop.run_in_executor(self._reports, report)
        future.add_done_callback(self._report_done)

    @staticmethod
    def _report_done(future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("ban report failed: %r", future.exception())

    # --- time and shutdown -----------------------------------------------------------------------

    async def _sleep_unless_stopped(self, seconds: float, *, raise_on_stop: bool = False) -> None:
        assert self._stop is not None
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            return
        if raise_on_stop:
            raise _Stopping

    async def _watch_idle(self) -> None:
        assert self._stop is not None
        limit = self.config.exit_when_idle_s
        while not self._stop.is_set():
            await asyncio.sleep(min(0.2, limit))
            if not self._tasks and not self._confirming and time.monotonic() - self._last_activity >= limit:
                log.info("queue idle for %.1fs: stopping", limit)
                self._stop.set()

    async def _shutdown(self) -> None:
        channel = self._channel
        if channel is not None and channel.is_open and self._consumer_tag:
            channel.basic_cancel(self._consumer_tag)  # no new messages from here on
        if self._tasks:
            log.info("stopping: %d tiles in flight, waiting up to %.0fs", len(self._tasks), self.config.drain_s)
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.config.drain_s)
            for task in pending:
                task.cancel()  # each hands its message back (nack) as it unwinds
            if pending:
                await asyncio.wait(pending, timeout=2)
        deadline = time.monotonic() + 5
        while self._confirming and time.monotonic() < deadline and self._channel is not None:
            await asyncio.sleep(0.02)  # dead-letter copies still waiting for their confirm
        if self._connection is not None and self._connection.is_open:
            self._connection.close()
            if self._closed is not None:
                await asyncio.wait([self._closed], timeout=5)
