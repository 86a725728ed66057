"""How the job queue is declared, and the few RabbitMQ helpers the generator, the consumer and the
operator share.

RabbitMQ refuses a second declaration of a queue with different arguments (PRECONDITION_FAILED and a
closed channel), so every component declares the job queue through `declare_job_queue` and nothing
else. The names themselves come from tilehopper.contracts.

Dead letters: the consumer publishes a tile it gives up on to `<queue>.dead` itself, with the reason
in the header contracts.DEAD_LETTER_REASON_HEADER (RabbitMQ's own dead-lettering cannot carry a reason
of ours). The job queue is still declared with the dead queue as its dead-letter target, so a message
rejected by anything else (an original-design consumer, a human with the management UI) lands there
too, with RabbitMQ's x-death header, instead of vanishing.
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from tilehopper.contracts import DEAD_LETTER_REASON_HEADER

DEAD_SUFFIX: Final = ".dead"
# Written by the generator once every tile of the job is confirmed by the broker (see
# tilehopper_generator: a re-run that finds it publishes nothing unless forced).
PUBLISHED_SUFFIX: Final = ".published"

PERSISTENT: Final = 2  # AMQP delivery mode: the broker writes the message to disk
ATTEMPTS_HEADER: Final = "x-tilehopper-attempts"


def dead_queue_name(queue: str) -> str:
    return f"{queue}{DEAD_SUFFIX}"


def published_marker_name(queue: str) -> str:
    return f"{queue}{PUBLISHED_SUFFIX}"


def job_queue_names(queue: str) -> list[str]:
    """Every queue a job owns; the operator deletes exactly these when the job is removed."""
    return [queue, dead_queue_name(queue), published_marker_name(queue)]


def job_queue_arguments(queue: str) -> dict[str, Any]:
    """The arguments of the job queue; the same everywhere, or RabbitMQ refuses the declaration."""
    return {
        "x-dead-letter-exchange": "",  # the default exchange routes by queue name
        "x-dead-letter-routing-key": dead_queue_name(queue),
    }


def declare_job_queue(channel: Any, queue: str) -> int:
    """Declare the durable job queue and its dead queue on a pika BlockingChannel.

    Returns the number of ready messages in the job queue.
    """
    channel.queue_declare(queue=dead_queue_name(queue), durable=True)
    result = channel.queue_declare(queue=queue, durable=True, arguments=job_queue_arguments(queue))
    return int(result.method.message_count)


def dead_letter_headers(reason: str, attempts: int, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    merged = dict(headers or {})
    merged[DEAD_LETTER_REASON_HEADER] = reason
    merged[ATTEMPTS_HEADER] = attempts
    return merged


def redact_url(url: str) -> str:
    """The URL without its password, for logs: amqp://guest:***@host/ ."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


_QUEUE_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


def check_queue_name(queue: str) -> str:
    if not _QUEUE_RE.match(queue):
        raise ValueError(f"queue name must be 1-200 of [A-Za-z0-9_.:-], got {queue!r}")
    return queue
