"""When and how long the Replicate client side waits before trying again: one policy for API
calls and output downloads alike."""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass


def retryable(status: int) -> bool:
    """Whether an HTTP status is worth another try: 408, 425, 429 and 5xx."""
    return status >= 500 or status in (408, 425, 429)


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried: 429 (its ``Retry-After`` honoured, up to
    `max_wait`), 408, 425, 5xx, connection errors and timeouts, `attempts` tries in all,
    waiting about `backoff`, 2×, 4×... seconds (each scaled by a random factor between 0.5
    and 1, at most `max_wait`) in between."""

    attempts: int = 8
    backoff: float = 1.0
    max_wait: float = 120.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed try number `attempt` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_wait)
        base = self.backoff * 2 ** (attempt - 1)
        return min(base * random.uniform(0.5, 1.0), self.max_wait)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())
