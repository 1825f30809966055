"""The polling lease: which `run_docbot --mode polling` process may call getUpdates for a bot.

Telegram serves one getUpdates loop per bot (a second gets 409 Conflict and the two would share
and re-fetch each other's batches), so polling is single-active: a poller claims the lease and
renews it while it polls; the others stand by, claiming now and then, and one of them takes over
once the lease has expired (a killed poller never renews, so within the TTL). The lease lives in
Redis when REDIS_URL is set (one key, its expiry Redis's own), otherwise in the `PollerLease`
row (a conditional UPDATE judged on the database's clock). Either way every time is the
server's, so the processes need no clock agreement.
"""

import threading
from datetime import timedelta
from typing import Any

import redis
from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.db.models import DateTimeField, ExpressionWrapper, Q
from django.db.models.functions import Now

from docbot.models import PollerLease

# KEYS: the lease. ARGV: holder, ttl ms. Takes a free lease or renews our own; 1 when held.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS: the lease. ARGV: holder. Deletes the lease only if it is ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_REDIS_TIMEOUT_SECONDS = 2.0

_client: redis.Redis | None = None
_client_lock = threading.Lock()


def _redis() -> redis.Redis:
    global _client
    with _client_lock:
        if _client is None:
            _client = redis.Redis.from_url(
                settings.REDIS_URL,
                socket_connect_timeout=_REDIS_TIMEOUT_SECONDS,
                socket_timeout=_REDIS_TIMEOUT_SECONDS,
            )
        return _client


def _key(bot: str) -> str:
    # The cache's prefix and version, so installations sharing a Redis stay apart.
    return str(cache.make_and_validate_key(f"docbot:poll-lease:{bot}"))


def poll_lease_claim(*, bot: str, holder: str, ttl_seconds: float) -> bool:
    """Take the lease of `bot` (the bot id) for `holder` when it is free or has expired, or
    renew it when `holder` has it; either way it then lasts `ttl_seconds` from the server's
    now. Returns False while another holder's lease runs. Idempotent for the holder. Raises
    redis or database errors (the caller treats them as "not renewed")."""
    if settings.REDIS_URL:
        ttl_ms = str(max(1, int(ttl_seconds * 1000)))
        claimed: Any = _redis().eval(_CLAIM, 1, _key(bot), holder, ttl_ms)
        return int(claimed) == 1
    until = ExpressionWrapper(Now() + timedelta(seconds=ttl_seconds), output_field=DateTimeField())
    taken = (
        PollerLease.objects.filter(bot=bot)
        .filter(Q(holder=holder) | Q(expires_at__lt=Now()))
        .update(holder=holder, expires_at=until)
    )
    if taken:
        return True
    try:
        with transaction.atomic():
            PollerLease.objects.create(bot=bot, holder=holder, expires_at=until)
    except IntegrityError:  # the row exists: another holder's lease is running
        return False
    return True


def poll_lease_release(*, bot: str, holder: str) -> None:
    """Give up `holder`'s lease of `bot` (a stopping poller), so a standby takes over at its
    next claim instead of after the TTL. Does nothing when `holder` does not hold it. Raises
    redis or database errors."""
    if settings.REDIS_URL:
        _redis().eval(_RELEASE, 1, _key(bot), holder)
        return
    PollerLease.objects.filter(bot=bot, holder=holder).delete()
