"""One GET through an HTTP proxy, on the event loop, with as little Python per request as we can.

Why not requests: at ~1-2 ms of CPU per request (Session or not), requests alone would use the
whole CPU budget of a tile, and a thread pool of Sessions is held to one core by the GIL
(issue 3 measured ~335 tiles/s). tinyproxy closes the client connection after every plain-HTTP
request anyway, so a connection pool buys nothing: each fetch opens one connection, sends one
request with `Connection: close`, and reads the answer until its Content-Length is in (or the
proxy closes). A fresh connection per request also means we never write into a socket the proxy
has already closed. Many fetches run at once; concurrency, not keep-alive, hides the latency.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

from tilehopper_consumer.proxy import ProxyView

MAX_HEAD = 64 * 1024
MAX_BODY = 32 * 1024 * 1024
USER_AGENT = "tilehopper/0.1"
LINGER_S = 2.0


class FetchError(Exception):
    """The request did not produce an answer: the reason says why (timeout, connection, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    # The body ended where the answer said it would (Content-Length or last chunk); False for a
    # body cut short, None when the answer gave no length (it then ends when the proxy closes).
    complete: bool | None


class _Exchange(asyncio.Protocol):
    """Send one request, collect the answer; resolves `done` once it is all here or the peer closes."""

    __slots__ = ("request", "done", "transport", "buffer", "head_end", "length")

    def __init__(self, request: bytes, done: asyncio.Future[tuple[bytes, int, int | None]]) -> None:
        self.request = request
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head_end = -1
        self.length: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.head_end < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._finish(FetchError("answer head too large"))
                return
            self.head_end = end + 4
            self.length = _content_length(bytes(buffer[:end]))
        if self.length is not None and len(buffer) - self.head_end >= self.length:
            self._finish(None, close=False)
        elif len(buffer) > MAX_BODY:
            self._finish(FetchError("answer too large"))

    def eof_received(self) -> bool:
        self._finish(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.done.done():
            self.done.set_exception(FetchError(f"connection lost: {exc!r}"))
        self._finish(None)

    def _finish(self, error: FetchError | None, *, close: bool = True) -> None:
        if not self.done.done():
            if error is not None:
                self.done.set_exception(error)
            else:
                self.done.set_result((bytes(self.buffer), self.head_end, self.length))
        if close and self.transport is not None:
            self.transport.close()


def _content_length(head: bytes) -> int | None:
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        return None
    end = lower.find(b"\r\n", at + 2)
    try:
        return int(lower[at + 17 : end if end > 0 else None].strip())
    except ValueError:
        return None


def build_request(url: str, proxy: ProxyView) -> bytes:
    """The request line and headers a forward proxy expects: the absolute URL, Proxy-Authorization."""
    host = urlsplit(url).netloc
    lines = [
        f"GET {url} HTTP/1.1",
        f"Host: {host}",
        f"User-Agent: {USER_AGENT}",
        "Accept: image/*",
        "Connection: close",
        "Proxy-Connection: close",
    ]
    auth = proxy.authorization
    if auth:
        lines.append(f"Proxy-Authorization: {auth}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_answer(raw: bytes, head_end: int, length: int | None) -> Answer:
    if head_end < 0:
        raise FetchError("connection closed before the answer's head" if not raw else "answer head incomplete")
    head = raw[: head_end - 4].decode("latin-1")
    status_line, _, rest = head.partition("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise FetchError(f"not an HTTP answer: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in rest.split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    body = raw[head_end:]
    complete: bool | None = None
    if length is not None:
        complete = len(body) >= length
        body = body[:length]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body, complete = _dechunk(body)
    return Answer(status=int(parts[1]), headers=headers, body=body, complete=complete)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return bytes(out), False
        try:
            size = int(data[pos:end].split(b";")[0], 16)
        except ValueError:
            return bytes(out), False
        if size == 0:
            return bytes(out), True
        start = end + 2
        if start + size > len(data):
            out += data[start:]
            return bytes(out), False
        out += data[start : start + size]
        pos = start + size + 2


async def fetch(url: str, proxy: ProxyView, *, timeout: float) -> Answer:
    """GET url through the proxy; FetchError when no answer came (the caller retries)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[bytes, int, int | None]] = loop.create_future()
    request = build_request(url, proxy)
    transport = None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(lambda: _Exchange(request, done), proxy.host, proxy.port)
            raw, head_end, length = await done
    except TimeoutError:
        raise FetchError(f"timeout after {timeout:g}s") from None
    except OSError as exc:
        raise FetchError(f"connection to proxy failed: {exc.strerror or exc!r}") from None
    except BaseException:
        if transport is not None:
            transport.close()
        raise
    if not transport.is_closing():
        # The whole answer is in; the proxy closes its end next (we asked for Connection: close).
        # Letting it close first keeps TIME_WAIT on its side, not on our ephemeral ports, which
        # pile up within seconds at thousands of connections a second. A proxy that keeps the
        # connection open anyway is closed by us shortly after.
        loop.call_later(LINGER_S, transport.close)
    return parse_answer(raw, head_end, length)
