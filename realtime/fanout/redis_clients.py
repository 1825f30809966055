"""Options of every realtime Redis client (presence, publish, subscription)."""

from typing import Any

from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry


def redis_client_options(timeout: float) -> dict[str, Any]:
    """Connection options of every realtime Redis client: bounded waits and one immediate retry
    (a pooled connection broken by a Redis restart), instead of redis-py's default of three
    retries with backoff of up to 10 s, which would stall a publish for seconds in an outage."""
    return {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 1),
    }


def async_redis_client_options(timeout: float) -> dict[str, Any]:
    """`redis_client_options` for redis.asyncio clients."""
    return {**redis_client_options(timeout), "retry": AsyncRetry(NoBackoff(), 1)}
