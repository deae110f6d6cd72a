"""Rate limits counted in Redis (fixed windows), so every gateway replica enforces the same budget."""

from __future__ import annotations

import time

import redis
import redis.asyncio as aioredis

from emili_core.errors import DependencyUnavailable
from emili_gateway.errors import RateLimited


class RateLimiter:
    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix

    async def hit(self, bucket: str, key: str, limit: int, window_seconds: int, what: str) -> None:
        """Count one event; raise RateLimited when ``key`` had more than ``limit`` in this window."""
        now = time.time()
        window = int(now // window_seconds)
        redis_key = f"{self.prefix}:rl:{bucket}:{key}:{window}"
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.incr(redis_key)
            pipe.expire(redis_key, window_seconds + 1)
            count, _ = await pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise DependencyUnavailable(f"Redis is unavailable: {exc}") from exc
        if int(count) > limit:
            retry = max(1, int((window + 1) * window_seconds - now) + 1)
            raise RateLimited(f"too many {what}: at most {limit} per {window_seconds} s; try again in {retry} s", retry)


class TokenBucket:
    """An in-process limit for one connection's frames: dropping extras is cheaper than counting them in Redis."""

    def __init__(self, rate_per_second: float, burst: float | None = None) -> None:
        self.rate = rate_per_second
        self.capacity = burst if burst is not None else max(1.0, rate_per_second)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
