"""Failed-authentication limits for the agents' TCP door (`input-policy.md`, "Identity and
abuse"): secrets and tokens cannot be guessed at line rate. Pure: no Django, no sockets.

Every failed `auth` or `enroll` costs its peer one token from a bucket of `burst` tokens that
refills at `per_minute`. A peer whose bucket runs dry is locked out for `lockout` seconds, twice
as long for each lockout in a row (up to `lockout_max`); while locked out every attempt is
refused unchecked, the right credentials included, so a guesser learns nothing. A peer that
stays quiet after a lockout for as long as a full refill takes starts over (and is forgotten).
Successful attempts cost nothing, so a fleet of healthy agents behind one address never meets
the limit. In the long run one address gets `burst` judged guesses per `lockout_max`.

Peers are keyed by IP address, an IPv6 address by its /64 (one subscriber's block). One
limiter is shared by every connection of a server process; methods are thread-safe because
the event loop (a cheap pre-check) and the event writer's thread (the check that counts) both
use it.
"""

import ipaddress
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


def peer_key(address: str) -> str:
    """The limiter key of a socket address: the IP itself, or the /64 of an IPv6 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(slots=True)
class _Peer:
    tokens: float
    stamp: float
    locked_until: float = 0.0
    strikes: int = 0


@dataclass(frozen=True)
class Lockout:
    """A lockout that just started (what the log line says)."""

    key: str
    seconds: float
    strikes: int


class FailureLimiter:
    """Per-peer token bucket of failed attempts with an escalating lockout (see the module)."""

    def __init__(
        self,
        *,
        burst: int,
        per_minute: float,
        lockout: float,
        lockout_max: float,
        max_peers: int = 100_000,
        on_lockout: Callable[[Lockout], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = float(max(1, burst))
        self.rate = max(0.0, per_minute) / 60.0
        self.lockout = max(0.0, lockout)
        self.lockout_max = max(self.lockout, lockout_max)
        self.max_peers = max_peers
        self.on_lockout = on_lockout
        self.clock = clock
        self.forgive_after = self.burst / self.rate if self.rate else self.lockout_max
        """quiet seconds after a lockout that reset the escalation (a full refill)"""
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()

    def _refill(self, peer: _Peer, now: float) -> None:
        peer.tokens = min(self.burst, peer.tokens + (now - peer.stamp) * self.rate)
        peer.stamp = now
        if self._forgiven(peer, now):
            peer.strikes = 0

    def _forgiven(self, peer: _Peer, now: float) -> bool:
        return peer.tokens >= self.burst and now >= peer.locked_until + self.forgive_after

    def retry_after(self, key: str) -> float:
        """Seconds until `key` may try again; 0 when an attempt may be checked now."""
        with self._lock:
            peer = self._peers.get(key)
            if peer is None:
                return 0.0
            now = self.clock()
            self._refill(peer, now)
            if now < peer.locked_until:
                return peer.locked_until - now
            if peer.tokens < 1:
                return (1 - peer.tokens) / self.rate if self.rate else math.inf
            return 0.0

    def failed(self, key: str) -> Lockout | None:
        """Charge one failed attempt to `key`; returns the lockout it started, if any."""
        with self._lock:
            now = self.clock()
            peer = self._peers.get(key)
            if peer is None:
                if len(self._peers) >= self.max_peers:
                    self._prune(now)
                peer = self._peers[key] = _Peer(tokens=self.burst, stamp=now)
            self._refill(peer, now)
            peer.tokens = max(0.0, peer.tokens - 1)
            if peer.tokens >= 1 or now < peer.locked_until:
                return None
            seconds = min(self.lockout_max, self.lockout * (2**peer.strikes))
            peer.strikes += 1
            peer.locked_until = now + seconds
            lockout = Lockout(key=key, seconds=seconds, strikes=peer.strikes)
        if self.on_lockout is not None:
            self.on_lockout(lockout)
        return lockout

    def prune(self) -> int:
        """Forget peers that are back to a full bucket and forgiven (they are like peers never
        seen); returns how many are still tracked."""
        with self._lock:
            self._prune(self.clock())
            return len(self._peers)

    def _prune(self, now: float) -> None:
        for key, peer in list(self._peers.items()):
            self._refill(peer, now)
            if self._forgiven(peer, now):
                del self._peers[key]
        if len(self._peers) >= self.max_peers:
            # Still full of peers in the middle of failing: the oldest are dropped, so memory
            # stays bounded (documented: a guesser with more addresses than this gets more).
            for key in sorted(self._peers, key=lambda k: self._peers[k].stamp)[
                : len(self._peers) - self.max_peers + 1
            ]:
                del self._peers[key]
