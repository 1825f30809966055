"""Per-user dialog state, dedupe of update ids and flood windows, in the Django cache: Redis
when REDIS_URL is set (shared by every web worker and surviving restarts), local memory on the
embedded default. python-telegram-bot's own persistence is per process, so it is not used."""

import time
from typing import Any

from django.core.cache import caches

_PREFIX = "docbot"


class DialogStore:
    def __init__(self, *, ttl_seconds: int, alias: str = "default") -> None:
        self._cache = caches[alias]
        self._ttl = ttl_seconds

    async def get(self, user_id: int) -> dict[str, Any]:
        state = await self._cache.aget(f"{_PREFIX}:state:{user_id}")
        return dict(state) if isinstance(state, dict) else {}

    async def set(self, user_id: int, state: dict[str, Any]) -> None:
        await self._cache.aset(f"{_PREFIX}:state:{user_id}", state, self._ttl)

    async def clear(self, user_id: int) -> None:
        await self._cache.adelete(f"{_PREFIX}:state:{user_id}")

    async def first_delivery(self, update_id: int) -> bool:
        """True only for the first caller with this update id, across processes (add())."""
        added: bool = await self._cache.aadd(f"{_PREFIX}:update:{update_id}", 1, 24 * 3600)
        return added

    async def first_group_notice(self, chat_id: int, *, ttl_seconds: int = 24 * 3600) -> bool:
        """True for the first caller per group chat and `ttl_seconds` (across processes): the
        group gets one "use me in a private chat" reply, not one per message."""
        added: bool = await self._cache.aadd(f"{_PREFIX}:group-told:{chat_id}", 1, ttl_seconds)
        return added

    async def flood_check(self, user_id: int, max_per_second: int) -> str:
        """`ok`, `warn` (first excess in a burst: reply once) or `drop`."""
        window = int(time.time())
        key = f"{_PREFIX}:flood:{user_id}:{window}"
        await self._cache.aadd(key, 0, 5)
        try:
            count = await self._cache.aincr(key)
        except ValueError:
            await self._cache.aset(key, 1, 5)
            count = 1
        if count <= max_per_second:
            return "ok"
        warned: bool = await self._cache.aadd(f"{_PREFIX}:flood-warned:{user_id}", 1, 3)
        return "warn" if warned else "drop"
