"""Per-client token buckets, shared by every worker process of a pod: each key (or client
address) may send `burst` requests at once and `rate` per second after that, and, with a token
limit, spend so many tokens of text a minute. A bucket refills continuously, so a client that
slows down gets its allowance back without waiting for a window to end.

Buckets kept in each worker would let a pod of N workers allow N times the rate (the kernel
spreads connections over the workers). So they live in one fixed table in a file that every
worker maps (mmap) and locks (flock) for each take: about 10 µs, and no server to run.
BentoML gives the workers of one server a directory to share, PROMETHEUS_MULTIPROC_DIR, and
empties it when the server starts; without it (one process, in-process tests) the table is
private to the process. Pods do not share buckets: see docs/security.md."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SLOTS = 32_768  # clients remembered (1 MiB); forgetting one gives it a full bucket
PROBES = 8  # the slots a client may sit in; when all are taken the least recently used goes
# A client's 64-bit hash (0: an empty slot), when it was last seen (time.monotonic(), which is
# the same clock in every process on Linux) and what it has used of each bucket since a full
# one. A zeroed slot is thus a pair of full buckets, and "used" may grow past the capacity (debt).
SLOT = struct.Struct("<Qd2d")
BUCKETS = ("requests", "tokens")  # the order of the used amounts in a slot
FILE_NAME = "rate-limits.buckets"  # not *.db: prometheus_client reads those as its own


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # until the bucket is full again
    retry_after_s: int  # until the request is allowed (0 when allowed now)
    policy: str  # "requests" or "tokens"
    window_s: int  # an empty bucket is full again after this

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


def policy_headers(decisions: Iterable[Decision]) -> dict[str, str]:
    """The structured fields of the IETF draft (draft-ietf-httpapi-ratelimit-headers), one item
    per policy: its quota `q` per window `w` (seconds), what remains of it `r`, and `t`, the
    seconds until it is whole again. A token bucket of capacity q refilling at q/w a second
    allows the same average."""
    decisions = list(decisions)
    return {
        "RateLimit-Policy": ", ".join(
            f'"{d.policy}";q={d.limit};w={d.window_s}' for d in decisions
        ),
        "RateLimit": ", ".join(f'"{d.policy}";r={d.remaining};t={d.reset_s}' for d in decisions),
    }


@dataclass(frozen=True)
class Limit:
    """One bucket per client: `capacity` units, refilled at `per_second`."""

    policy: str
    capacity: int
    per_second: float

    def decide(self, used: float, cost: float) -> tuple[float, Decision]:
        """Charge `cost` to a bucket that has `used` so much: what it has used after, and the
        decision. A cost larger than the whole bucket passes when the bucket is full and leaves
        it in debt: it is never refused for ever, and the average rate holds."""
        need = min(cost, self.capacity)
        allowed = self.capacity - used >= need
        if allowed:
            used += cost
        return used, Decision(
            allowed=allowed,
            limit=self.capacity,
            remaining=max(0, math.floor(self.capacity - used)),
            reset_s=math.ceil(used / self.per_second),
            retry_after_s=0
            if allowed
            else math.ceil((used + need - self.capacity) / self.per_second),
            policy=self.policy,
            window_s=math.ceil(self.capacity / self.per_second),
        )


class BucketTable:
    """The slots, mapped from a file: open addressing on a hash that is the same in every process
    (blake2b; Python's hash() is salted per process), at most PROBES slots from the client's
    home slot. Every read and write happens under `locked()`."""

    def __init__(self, directory: Path | None, slots: int = SLOTS) -> None:
        self.slots, size = slots, slots * SLOT.size
        if directory is None:
            self.fd, private = tempfile.mkstemp(prefix="kubesentiment-rate-limits-")
            os.unlink(private)
        else:
            self.fd = os.open(directory / FILE_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        with self.locked():  # the first worker sizes it; the others find it sized
            found = os.fstat(self.fd).st_size
            if found == 0:
                os.ftruncate(self.fd, size)
            elif found != size:
                raise ValueError(f"{directory} holds a rate limit table of another size")
        self.map = mmap.mmap(self.fd, size)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The table to oneself: flock excludes other processes, and other tables opened on the
        same file in this one. (Each worker serves from one event loop: no threads to exclude.)"""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    @staticmethod
    def key(client: str) -> int:
        digest = hashlib.blake2b(client.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") or 1

    def find(self, key: int) -> tuple[int, float | None, list[float]]:
        """The client's slot, when it was last seen and what it has used; or, for a client not
        in the table (None), the slot to give it: an empty one, else the least recently used
        of the window, whose client is forgotten."""
        home = key % self.slots
        free, oldest = home, math.inf
        for probe in range(PROBES):
            index = (home + probe) % self.slots
            found, seen, *used = SLOT.unpack_from(self.map, index * SLOT.size)
            if found == key:
                return index, seen, used
            if seen < oldest:
                free, oldest = index, seen
        return free, None, [0.0] * len(BUCKETS)

    def write(self, index: int, key: int, seen: float, used: list[float]) -> None:
        SLOT.pack_into(self.map, index * SLOT.size, key, seen, *used)


class RateLimiter:
    """The requests bucket (`rate` > 0) and the tokens bucket (`tokens_per_minute` > 0) of each
    client, in the table of `directory` (shared by every limiter opened on it) or a private one."""

    def __init__(
        self,
        rate: float,
        burst: int,
        tokens_per_minute: int = 0,
        directory: Path | None = None,
        slots: int = SLOTS,
    ) -> None:
        self.limits: dict[str, Limit] = {}  # the limits that are on, by policy
        if rate > 0:
            self.limits["requests"] = Limit("requests", burst, rate)
        if tokens_per_minute > 0:
            self.limits["tokens"] = Limit("tokens", tokens_per_minute, tokens_per_minute / 60)
        self.table = BucketTable(directory, slots)

    def take(self, client: str) -> Decision:
        """One request."""
        return self.charge(client, "requests", 1)

    def charge(self, client: str, policy: str, cost: float) -> Decision:
        """Charge `cost` to one of the client's buckets (a cost of 0 only looks at it)."""
        key = self.table.key(client)
        with self.table.locked():
            now = time.monotonic()
            index, seen, used = self.table.find(key)
            elapsed = 0.0 if seen is None else now - seen
            for i, name in enumerate(BUCKETS):  # both refill, so that one time stamp serves
                if (limit := self.limits.get(name)) is not None:
                    used[i] = max(0.0, used[i] - elapsed * limit.per_second)
            which = BUCKETS.index(policy)
            used[which], decision = self.limits[policy].decide(used[which], cost)
            self.table.write(index, key, now, used)
        return decision
