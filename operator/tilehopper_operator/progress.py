"""How far a job is: queue counts from RabbitMQ's management API (without its statistics lag)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from tilehopper.amqp import dead_queue_name


@dataclass(frozen=True)
class QueueCounts:
    ready: int
    unacked: int

    @property
    def total(self) -> int:
        return self.ready + self.unacked


class RabbitApi:
    def __init__(self, api_url: str, vhost: str = "/") -> None:
        parts = urlsplit(api_url)
        self.auth = (parts.username or "guest", parts.password or "guest")
        netloc = parts.hostname or "localhost"
        if parts.port:
            netloc += f":{parts.port}"
        self.base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.vhost = quote(vhost, safe="")
        self.session = requests.Session()

    def all_counts(self) -> dict[str, QueueCounts]:
        """Every queue's counts. Only the list endpoint honours enable_queue_totals together with
        disable_stats (the single-queue endpoint then returns no counts at all)."""
        answer = self.session.get(
            f"{self.base}/api/queues/{self.vhost}",
            params={"disable_stats": "true", "enable_queue_totals": "true"},
            auth=self.auth,
            timeout=5,
        )
        answer.raise_for_status()
        return {
            doc["name"]: QueueCounts(
                ready=int(doc.get("messages_ready", 0) or 0),
                unacked=int(doc.get("messages_unacknowledged", 0) or 0),
            )
            for doc in answer.json()
        }

    def counts(self, queue: str) -> QueueCounts | None:
        """None when the queue does not exist (yet)."""
        return self.all_counts().get(queue)

    def job_counts(self, queue: str) -> tuple[QueueCounts | None, QueueCounts | None]:
        counts = self.all_counts()
        return counts.get(queue), counts.get(dead_queue_name(queue))

    def delete_queue(self, queue: str) -> None:
        url = f"{self.base}/api/queues/{self.vhost}/{quote(queue, safe='')}"
        answer = self.session.delete(url, auth=self.auth, timeout=5)
        if answer.status_code not in (204, 404):
            answer.raise_for_status()
