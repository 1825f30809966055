"""Who is calling: the client address used by rate limits and login lockouts.

`input-policy.md`: client IPs come from the socket unless a trusted-proxy setting names the
proxy hops. With `TRUSTED_PROXY_HOPS = n > 0` (n reverse proxies in front, each appending the
address it saw to `X-Forwarded-For`), the client is the n-th address from the right, the one
the outermost trusted proxy recorded; anything to its left was written by the client and is
ignored. DRF's throttles follow the same rule through `NUM_PROXIES` (config/settings.py).
"""

import functools
import ipaddress

from django.conf import settings
from django.http import HttpRequest


def _address(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


def client_ip(request: HttpRequest) -> str | None:
    """The caller's IP address as a string; None when the socket gave none (a Unix socket,
    the test client), which django-axes then stores as an unknown address."""
    remote = _address(str(request.META.get("REMOTE_ADDR", "")))
    hops = int(getattr(settings, "TRUSTED_PROXY_HOPS", 0))
    forwarded = str(request.META.get("HTTP_X_FORWARDED_FOR", ""))
    if hops <= 0 or not forwarded:
        return remote
    chain = [part for part in forwarded.split(",") if part.strip()]
    if not chain:
        return remote
    return _address(chain[-min(hops, len(chain))]) or remote


@functools.lru_cache(maxsize=4096)
def client_key(ip: str | None) -> str:
    """The rate-limit identity of an address: the IPv4 address, or the /64 of an IPv6 one (the
    smallest block one subscriber gets, so cycling through its addresses mints no new budgets);
    `ip:unknown`, one shared budget, when the socket gave no address."""
    try:
        address = ipaddress.ip_address(ip or "")
    except ValueError:
        return "ip:unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ip:{address.ipv4_mapped}"
        return f"ip6:{ipaddress.IPv6Network((address, 64), strict=False).network_address}"
    return f"ip:{address}"
