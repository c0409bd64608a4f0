"""Retry schedule: exponential backoff with full jitter (AWS architecture blog's
"full jitter": sleep = random(0, min(cap, base * 2**attempt)))."""

from __future__ import annotations

from ..clock import Random


def full_jitter(attempt: int, *, base: float, cap: float, rnd: Random) -> float:
    """Delay in seconds before retrying after failed attempt number `attempt` (1-based)."""
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    # 2**attempt grows without bound; clamp the exponent before it overflows a float.
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 62))
    return rnd.random() * ceiling
