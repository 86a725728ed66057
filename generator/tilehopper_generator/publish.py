"""Publishing tiles to the job queue with publisher confirms, streaming.

A BlockingChannel in confirm mode waits for the broker after every message (one round trip each),
which is slower than publishing without confirms. Here an asynchronous pika connection keeps a
window of unconfirmed messages in flight instead: the broker acknowledges them in batches, a
nacked message is published again, and the run ends only when every tile is confirmed. Memory
stays bounded by the window, whatever the number of tiles.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pika
import pika.channel
import pika.frame
import pika.spec
from pika.adapters.select_connection import SelectConnection

from tilehopper.amqp import PERSISTENT
from tilehopper.contracts import Tile, encode_tile

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 4000


class PublishError(RuntimeError):
    """The broker did not take every tile (connection lost, queue missing)."""


@dataclass
class PublishProgress:
    published: int = 0  # confirmed by the broker
    sent: int = 0
    republished: int = 0  # nacked by the broker and sent again
    started: float = 0.0

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


class ConfirmedPublisher:
    """Publish every tile of an iterator to one queue; returns when all are confirmed."""

    def __init__(
        self,
        *,
        amqp_url: str,
        queue: str,
        tiles: Iterator[Tile],
        window: int = DEFAULT_WINDOW,
        on_progress: Callable[[PublishProgress], None] | None = None,
        progress_every_s: float = 2.0,
    ) -> None:
        self._params = pika.URLParameters(amqp_url)
        self._queue = queue
        self._tiles = tiles
        self._window = window
        self._on_progress = on_progress
        self._progress_every_s = progress_every_s
        self._last_progress = 0.0
        # delivery tag -> tile, in tag order: the broker confirms in order ("multiple" acks).
        self._unconfirmed: collections.OrderedDict[int, Tile] = collections.OrderedDict()
        self._retry: collections.deque[Tile] = collections.deque()
        self._next_tag = 1
        self._exhausted = False
        self._channel: pika.channel.Channel | None = None
        self._connection: SelectConnection | None = None
        self._error: str | None = None
        self._properties = pika.BasicProperties(delivery_mode=PERSISTENT, content_type="application/json")
        self.progress = PublishProgress()

    def run(self) -> PublishProgress:
        self.progress.started = time.monotonic()
        self._connection = SelectConnection(
            parameters=self._params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_connection_closed,
        )
        self._connection.ioloop.start()
        if self._error:
            raise PublishError(self._error)
        return self.progress

    # --- connection lifecycle ----------------------------------------------------------------

    def _on_open_error(self, _connection: Any, error: BaseException) -> None:
        self._error = f"cannot connect to RabbitMQ: {error}"
        assert self._connection is not None
        self._connection.ioloop.stop()

    def _on_connection_open(self, connection: SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_closed(self, _connection: Any, reason: BaseException) -> None:
        if not self._finished():
            self._error = self._error or f"connection closed with {len(self._unconfirmed)} tiles unconfirmed: {reason}"
        assert self._connection is not None
        self._connection.ioloop.stop()

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _frame: self._fill())

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if not self._finished():
            self._error = self._error or f"channel closed: {reason}"
        assert self._connection is not None
        if self._connection.is_open:
            self._connection.close()

    def _on_return(self, _channel: Any, _method: Any, _props: Any, body: bytes) -> None:
        # mandatory=True: the broker returns a message no queue took (the queue was deleted).
        self._error = f"queue {self._queue!r} does not exist (message {body!r} returned)"
        assert self._channel is not None
        self._channel.close()

    # --- publishing ----------------------------------------------------------------------------

    def _finished(self) -> bool:
        return self._exhausted and not self._unconfirmed and not self._retry

    def _next_tile(self) -> Tile | None:
        if self._retry:
            return self._retry.popleft()
        if self._exhausted:
            return None
        tile = next(self._tiles, None)
        if tile is None:
            self._exhausted = True
        return tile

    def _fill(self) -> None:
        channel = self._channel
        assert channel is not None
        while len(self._unconfirmed) < self._window and self._error is None:
            tile = self._next_tile()
            if tile is None:
                break
            channel.basic_publish(
                exchange="",
                routing_key=self._queue,
                body=encode_tile(tile),
                properties=self._properties,
                mandatory=True,
            )
            self._unconfirmed[self._next_tag] = tile
            self._next_tag += 1
            self.progress.sent += 1
        if self._finished() and channel.is_open:
            channel.close()  # closing the channel closes the connection (above)

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        tag = method.delivery_tag
        settled = []
        if method.multiple:
            while self._unconfirmed:
                first = next(iter(self._unconfirmed))
                if first > tag:
                    break
                settled.append(self._unconfirmed.popitem(last=False)[1])
        elif tag in self._unconfirmed:
            settled.append(self._unconfirmed.pop(tag))
        if isinstance(method, pika.spec.Basic.Nack):
            log.warning("broker nacked %d tiles; publishing them again", len(settled))
            self._retry.extend(settled)
            self.progress.republished += len(settled)
        else:
            self.progress.published += len(settled)
        self._report()
        self._fill()

    def _report(self) -> None:
        now = time.monotonic()
        if self._on_progress and now - self._last_progress >= self._progress_every_s:
            self._last_progress = now
            self._on_progress(self.progress)
