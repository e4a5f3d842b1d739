"""Where a budget's spend lives in Redis: the key layout the sidecars' scripts write and the
operator's budget controller reads, and how a spend hash is summed over a period. One hash tag
(`{budgets}`) puts every key in one Redis Cluster slot, as one script's keys must be."""

from __future__ import annotations

from collections.abc import Mapping

from tierwise.budgetrules import Amount
from tierwise.periods import Window

PREFIX = "tierwise:{budgets}:"


def spend_key(budget: str, w: Window) -> str:
    """The hash of settled spend of `budget` ("namespace/name") in the period `w`: fields `u` and
    `t` (micro-dollars, tokens) for a calendar period, `<bucket>:u` and `<bucket>:t` for a rolling one."""
    return f"{PREFIX}spend:{budget}@{w.id}"


def hold_keys(budget: str) -> tuple[str, str, str, str]:
    """held (in-flight amounts, fields u and t), leases (id -> expiry), lease (id -> amounts),
    bucket (the throttle's token bucket)."""
    return f"{PREFIX}held:{budget}", f"{PREFIX}leases:{budget}", f"{PREFIX}lease:{budget}", f"{PREFIX}bucket:{budget}"


def applied_key(instance: str) -> str:
    """The bitmap of settle sequence numbers a sidecar instance has had counted."""
    return f"{PREFIX}applied:{instance}"


def spend_of(fields: Mapping[bytes, bytes], w: Window) -> Amount:
    """The settled spend in a spend hash, counting only the buckets still inside a rolling window."""
    micros = tokens = 0
    for f, v in fields.items():
        name = f.decode()
        if w.rolling:
            bucket, _, unit = name.partition(":")
            if int(bucket) < w.first_bucket:
                continue
        else:
            unit = name
        if unit == "u":
            micros += int(v)
        elif unit == "t":
            tokens += int(v)
    return Amount(micros, tokens)


def held_of(values: tuple[bytes | None, bytes | None] | list[bytes | None]) -> Amount:
    """What requests in flight hold, from HMGET held u t."""
    return Amount(int(values[0] or 0), int(values[1] or 0))
