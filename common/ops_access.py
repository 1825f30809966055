"""Who may read the operational endpoints (`/metrics`, the detail of `/readyz`).

`input-policy.md`: operational endpoints are not public by default. Allowed callers: a staff
user (admin session or API token), or a scraper presenting `Authorization: Bearer
<METRICS_BEARER_TOKEN>` (compared in constant time). `OPS_ENDPOINTS_PUBLIC=true` opens them
for a closed lab network.
"""

import hmac

from django.conf import settings
from django.http import HttpRequest
from rest_framework.exceptions import AuthenticationFailed

from common.authentication import TokenAuthentication


def ops_access_allowed(request: HttpRequest) -> bool:
    """True when the caller may see operational detail; runs at most one token lookup."""
    if settings.OPS_ENDPOINTS_PUBLIC:
        return True
    header = request.headers.get("Authorization", "")
    expected = settings.METRICS_BEARER_TOKEN
    scheme, _, credentials = header.partition(" ")
    if (
        expected
        and scheme.lower() == "bearer"
        and hmac.compare_digest(credentials.strip().encode(), expected.encode())
    ):
        return True
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return bool(user.is_staff)
    if not header:
        return False
    try:
        # Reads only the Authorization header, which a plain HttpRequest has too.
        result = TokenAuthentication().authenticate(request)  # type: ignore[arg-type]
    except AuthenticationFailed:
        return False
    return bool(result and result[0].is_staff)
