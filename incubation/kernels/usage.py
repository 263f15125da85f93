"""Which kernel of an op served each call, and why (e.g. the linear forward: the TMA kernel or
the pointer one), for `incubation backends` and the tests."""
from __future__ import annotations

import collections
from typing import Optional

__all__ = ["record", "last", "report"]

_counts: collections.Counter = collections.Counter()   # (op, device type, kernel, reason) -> calls
_last: dict[str, tuple[str, Optional[str]]] = {}        # op -> (kernel, reason) of its latest call


def record(op: str, device_type: str, kernel: str, reason: Optional[str]) -> None:
    _counts[(op, device_type, kernel, reason)] += 1
    _last[op] = (kernel, reason)


def last(op: str) -> tuple[str, Optional[str]]:
    """(kernel, why) of the latest call of `op`; ("", None) before any."""
    return _last.get(op, ("", None))


def report(op: str, device_type: str) -> dict[str, int]:
    """{kernel (and why, when it says): calls} of `op` on this device type since import."""
    return {kernel + (f" ({reason})" if reason else ""): n
            for (name, dev, kernel, reason), n in sorted(_counts.items(), key=str) if name == op and dev == device_type}
