"""Does a live object still hold everything the operator declared? (pure)

A server-side apply that changes nothing is still a write request; the operator skips it when the
live object already covers the desired one. "Covers" is semantic: fields other managers added
(defaults, annotations, extra containers) are fine, values the API server normalises (quantities)
compare by value, and list items with a `name` match by name.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip


def quantity(value: object) -> Decimal | None:
    """A Kubernetes quantity ("500m", "2Gi", "1e3", 4) as a number; None if it is not one."""
    text = str(value).strip()
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        suffix, number = "", text
    try:
        return Decimal(number) * Decimal(str(_SUFFIX[suffix]))
    except (InvalidOperation, ValueError):
        return None


def _empty(v: object) -> bool:
    return v is None or v in ("", [], {})


def covers(live: Any, want: Any, path: str = "") -> bool:
    if isinstance(want, dict):
        if not isinstance(live, dict):
            return _empty(want) and _empty(live)
        return all(covers(live.get(k), v, f"{path}.{k}") for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(live, list):
            return _empty(want) and _empty(live)
        if want and all(isinstance(w, dict) and "name" in w for w in want):
            by_name = {i.get("name"): i for i in live if isinstance(i, dict)}
            return all(w["name"] in by_name and covers(by_name[w["name"]], w, path) for w in want)
        return len(live) == len(want) and all(covers(a, b, path) for a, b in zip(live, want, strict=True))
    if _empty(want):
        return _empty(live)
    if live == want:
        return True
    if path.split(".")[-2:-1] in (["requests"], ["limits"]):
        a, b = quantity(live), quantity(want)
        return a is not None and a == b
    return False
