"""Token buckets: how many client commands a connection, or a user, may send, and how
many streams a user may open."""

from __future__ import annotations

import math
import time
from collections import OrderedDict


def command_burst(rate: float) -> float:
    """How many commands a client may send at once: twice its rate per second."""
    return max(2 * rate, 1)


def opening_burst(rate: float, max_connections_per_user: int) -> float:
    """How many streams a user may open at once: all they may hold (a page that reloads
    with every stream of the user open), and at least twice the rate."""
    return max(2 * rate, max_connections_per_user)


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`; each command takes one."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._updated = time.monotonic()

    def _refill(self, now: float) -> None:
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now

    def take(self) -> bool:
        self._refill(time.monotonic())
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def reserve(self, max_wait_s: float) -> float | None:
        """Take a token now or, when none is left, the next one to come: the seconds to
        wait for it; None, taking nothing, when that is more than `max_wait_s`."""
        self._refill(time.monotonic())
        wait = max(0.0, (1 - self._tokens) / self._rate)
        if wait > max_wait_s:
            return None
        self._tokens -= 1
        return wait

    def give_back(self) -> None:
        """Return a token taken for what did not happen after all."""
        self._tokens = min(self._burst, self._tokens + 1)

    def charge(self, tokens: float) -> None:
        """Take more for what turned out to cost more; the balance may go below zero,
        and commands are refused until it has refilled."""
        self._tokens -= tokens

    def retry_after_s(self) -> int:
        """Whole seconds until the next command would be accepted (at least 1)."""
        self._refill(time.monotonic())
        return max(1, math.ceil((1 - self._tokens) / self._rate))

    def full_at(self) -> float:
        """The monotonic time at which the bucket is full again: from then on it is
        the same as a new one."""
        return self._updated + max(0.0, self._burst - self._tokens) / self._rate


class BucketsByKey:
    """One TokenBucket per key (a user), for requests that are not one connection.

    At most `max_size` buckets are kept. A bucket that has refilled is the same as a new
    one, so it is dropped (idle users cost nothing); beyond `max_size` the least
    recently used bucket goes first, which at worst gives that user a new burst early.
    """

    def __init__(self, rate: float, burst: float, max_size: int = 10_000) -> None:
        self._rate = rate
        self._burst = burst
        self._max_size = max_size
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def get(self, key: str) -> TokenBucket:
        """The key's bucket (a new, full one if it had none); call `take()` on it."""
        self._evict_idle(time.monotonic())
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self._rate, self._burst)
            while len(self._buckets) >= self._max_size:
                self._buckets.popitem(last=False)
        self._buckets[key] = bucket  # most recently used last
        return bucket

    def _evict_idle(self, now: float) -> None:
        """Drop full buckets from the least recently used end, up to the first one that
        is not full yet (the others are dropped by a later call, or by `max_size`)."""
        while self._buckets:
            key, bucket = next(iter(self._buckets.items()))
            if bucket.full_at() > now:
                return
            del self._buckets[key]
