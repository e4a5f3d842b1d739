"""Token buckets, as pure functions over a bucket's state: a budget's Throttle and a tier's
rate limits (requests/s, tokens/min) judge with the same arithmetic, in process or in Redis's
script (which mirrors it line for line).

A bucket holds at most `size` tokens and refills at `rate` per second from the moment it was last
counted. Taking `cost` either succeeds or says how long until `cost` tokens will be there; giving
back (a request that used fewer tokens than it was charged) never fills past `size`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Bucket:
    """A token bucket's state: tokens left and when they were counted."""

    tokens: float
    at: float


def level(bucket: Bucket | None, rate: float, size: float, now: float) -> float:
    """Tokens in the bucket at `now` (a bucket never seen is full)."""
    if bucket is None:
        return size
    return min(size, bucket.tokens + max(now - bucket.at, 0.0) * rate)


def take(bucket: Bucket | None, rate: float, size: float, cost: float, now: float) -> tuple[bool, Bucket, float]:
    """Take `cost` tokens. Returns (allowed, the bucket after, seconds until `cost` is there).
    A cost above the size is charged as the whole bucket: it waits for a full one, never forever."""
    have = level(bucket, rate, size, now)
    cost = min(cost, size)
    if have >= cost:
        return True, Bucket(have - cost, now), 0.0
    return False, Bucket(have, now), (cost - have) / rate


def give(bucket: Bucket | None, rate: float, size: float, amount: float, now: float) -> Bucket:
    """Add `amount` tokens (negative: charge more after the fact, down to a debt of one bucket)."""
    return Bucket(max(-size, min(size, level(bucket, rate, size, now) + amount)), now)
