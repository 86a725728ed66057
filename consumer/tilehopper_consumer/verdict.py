"""What an answer means for the tile: keep it, a ban, missing, try again, or give up. Pure.

A tile is good only if the answer is 200, says it is an image, starts with an image signature,
is not empty and is complete (as long as its Content-Length said).
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass

from tilehopper_consumer.fetch import Answer

IMAGE_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
)


class Kind(enum.Enum):
    OK = "ok"
    BAN = "ban"  # the proxy's address is banned: requeue, report, wait for the next generation
    MISSING = "missing"  # the server has no such tile: dead-letter at once
    RETRY = "retry"  # maybe next time: bounded retries, then dead-letter
    REJECT = "reject"  # no retry will help: dead-letter at once


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    reason: str = ""


OK = Verdict(Kind.OK)


def is_image(body: bytes) -> bool:
    return body.startswith(IMAGE_SIGNATURES) or (body[:4] == b"RIFF" and body[8:12] == b"WEBP")


def judge(answer: Answer, ban_codes: Collection[int]) -> Verdict:
    status = answer.status
    if status in ban_codes:
        return Verdict(Kind.BAN, f"{status} (ban)")
    if status == 200:
        if answer.complete is False:
            got = len(answer.body)
            return Verdict(Kind.RETRY, f"truncated: {got} of {answer.headers.get('content-length')} bytes")
        if not answer.body:
            return Verdict(Kind.RETRY, "empty body")
        content_type = answer.headers.get("content-type", "")
        if not content_type.lower().startswith("image/"):
            return Verdict(Kind.RETRY, f"not an image: content-type {content_type[:60]!r}")
        if not is_image(answer.body):
            return Verdict(Kind.RETRY, "not an image: no PNG/JPEG/GIF/WebP signature")
        return OK
    if status == 404:
        return Verdict(Kind.MISSING, "404 not found")
    if status in (408, 429) or status >= 500:
        return Verdict(Kind.RETRY, f"{status} from server or proxy")
    if status == 407:
        # The proxy refused our credentials: perhaps the Secret is about to change. Retry.
        return Verdict(Kind.RETRY, "407 proxy authentication required")
    return Verdict(Kind.REJECT, f"{status} answer")
