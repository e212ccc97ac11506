"""Per-client token buckets: each key (or client address) may send `burst` requests at once and
`rate` per second after that. A bucket refills continuously, so a client that slows down gets
its allowance back without waiting for a window to end."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

MAX_CLIENTS = 10_000  # least recently seen buckets are forgotten past this (a full bucket each)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # until the bucket is full again
    retry_after_s: int  # until one request is allowed (0 when allowed now)

    def headers(self) -> dict[str, str]:
        """The IETF RateLimit header fields, plus Retry-After on a refusal."""
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


class RateLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def take(self, client: str) -> Decision:
        now = time.monotonic()
        tokens, then = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self.buckets[client] = (tokens, now)
        if len(self.buckets) > MAX_CLIENTS:
            self.buckets.popitem(last=False)
        return Decision(
            allowed=allowed,
            limit=self.burst,
            remaining=math.floor(tokens),
            reset_s=math.ceil((self.burst - tokens) / self.rate),
            retry_after_s=0 if allowed else math.ceil((1 - tokens) / self.rate),
        )
