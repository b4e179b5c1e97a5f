"""Client-side rate limiting: an async token bucket for requests and tokens per minute."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Async token bucket: ``per_minute`` tokens refill continuously; capacity one second's worth (>= 1)."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.last = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now

    async def acquire(self, n: float = 1.0) -> None:
        n = min(n, self.capacity)
        # Holding the lock while waiting makes waiters FIFO: no request starves behind smaller ones.
        async with self._lock:
            while True:
                self._refill()
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)

    def adjust(self, delta: float) -> None:
        """Charge (positive) or refund (negative) tokens after the fact; may go negative (a debt)."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens - delta)
