"""DRF throttles keyed like every other rate limit of the platform (`common.network`): the
socket address unless TRUSTED_PROXY_HOPS, IPv6 grouped per /64."""

from rest_framework import throttling
from rest_framework.request import Request

from common.network import client_ip, client_key


class _ClientKeyMixin:
    def get_ident(self, request: Request) -> str:
        return client_key(client_ip(request._request))


class AnonRateThrottle(_ClientKeyMixin, throttling.AnonRateThrottle):
    """Anonymous callers per client address (`anon` rate)."""


class UserRateThrottle(_ClientKeyMixin, throttling.UserRateThrottle):
    """Signed-in users per id, anonymous ones per client address (`user` rate)."""


class ScopedRateThrottle(_ClientKeyMixin, throttling.ScopedRateThrottle):
    """Per view `throttle_scope` (login, register), per user or client address."""
